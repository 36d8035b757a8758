"""README.md is the front page and docs/ the rest: their links lead somewhere, and the
front page's signature check works on what outbox sends."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

from outbox.signing import signature
from tests.conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_CODE_SPAN = re.compile(r"(`+).+?\1", re.S)
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6} +(.+?) *#* *$", re.M)


def _prose(text: str) -> str:
    """The page without its code, where brackets are not links."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def _anchors(path: Path) -> set[str]:
    """The anchors GitHub makes for a page's headings: lower case, punctuation
    dropped, spaces to hyphens, and -1, -2, ... for repeats."""
    seen: dict[str, int] = {}
    anchors = set()
    for heading in _HEADING.findall(_FENCE.sub("", path.read_text())):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _links(page: Path) -> list[str]:
    return [
        target
        for target in _LINK.findall(_prose(page.read_text()))
        if not re.match(r"[a-z][a-z0-9+.-]*:", target)  # http:, https:, mailto:
    ]


class TestLinks:
    """Every relative link of the front page and the docs resolves."""

    @pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
    def test_every_relative_link_leads_to_a_file_and_heading_that_exist(self, page: Path) -> None:
        """A link names a file in the repository (relative to the page), and an anchor
        names a heading of that page."""
        broken = []
        for target in _links(page):
            path, _, anchor = target.partition("#")
            dest = (page.parent / unquote(path)).resolve() if path else page
            if not dest.exists() or (
                anchor and dest.suffix == ".md" and anchor not in _anchors(dest)
            ):
                broken.append(target)
        assert not broken, f"{page.relative_to(ROOT)}: {broken}"

    def test_every_doc_is_linked_from_the_front_page(self) -> None:
        """Nothing in docs/ is reachable only by someone who already knows it is there."""
        linked = {(ROOT / t.partition("#")[0]).resolve() for t in _links(ROOT / "README.md")}
        assert {p.resolve() for p in PAGES[1:]} <= linked

    def test_the_checker_sees_a_broken_link(self, tmp_path: Path) -> None:
        """The check above can fail: a missing file and a missing heading are found,
        while a link inside code is not a link."""
        page = tmp_path / "page.md"
        page.write_text("# Title\n\n[a](gone.md) [b](#nowhere) [c](#title) `[d](x.md)`\n")
        assert _links(page) == ["gone.md", "#nowhere", "#title"]
        assert _anchors(page) == {"title"}


def _python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), re.S)


class TestFrontPageSignature:
    """The front page's standard-library `verify` accepts what outbox signs."""

    def test_the_readme_verify_accepts_outbox_signatures_and_nothing_else(self) -> None:
        """The function as printed, run as it is, says yes to X-Webhook-Signature over
        the raw body and no to a changed body or another secret."""
        (block,) = [b for b in _python_blocks(ROOT / "README.md") if "def verify(" in b]
        scope: dict[str, object] = {}
        exec(compile(block, "README.md", "exec"), scope)  # noqa: S102 - the page's code, as printed
        verify = scope["verify"]
        assert callable(verify)
        secret, body = "a-signing-secret-of-16+-chars", b'{"event": "lead.scored"}'
        header = signature(secret, body)
        assert verify(secret, body, header) is True
        assert verify(secret, body + b" ", header) is False
        assert verify("another-secret-of-16-chars", body, header) is False
