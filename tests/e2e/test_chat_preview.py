"""docs/chat-messages.png, which docs/formats.md shows: a Slack and a Discord message as outbox
renders them, drawn as a static page and photographed with Chromium. A sketch of each
service's look, not a copy of it; the messages are the real output of outbox.formats."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import sync_playwright

from outbox import formats
from outbox.events import sample
from tests.conftest import ROOT
from tests.e2e.test_portal_page import CHROMIUM, CHROMIUM_ARGS

PICTURE = ROOT / "docs" / "chat-messages.png"

pytestmark = pytest.mark.browser
STAMP = "2025-03-05T08:41:17.000Z"


def message(fmt: str, event: str) -> dict[str, Any]:
    raw = formats.render(fmt, event, STAMP, json.dumps(sample(event)))
    parsed: dict[str, Any] = json.loads(raw)
    return parsed


def slack_html(text: str) -> str:
    """Slack mrkdwn (already &-escaped by outbox) as HTML: bold and quotes."""
    lines = []
    for line in html.escape(html.unescape(text)).split("\n"):
        line = re.sub(r"\*([^*\n]+)\*", r"<b>\1</b>", line)
        if line.startswith("&gt; "):
            line = f'<span class="quote">{line[5:]}</span>'
        lines.append(line)
    return "<br>".join(lines)


def discord_html(text: str) -> str:
    """Discord markdown (backslash-escaped by outbox) as HTML: quotes only."""
    lines = []
    for line in text.split("\n"):
        quoted = line.startswith("> ")
        plain = html.escape(re.sub(r"\\(.)", r"\1", line[2:] if quoted else line))
        lines.append(f'<span class="quote">{plain}</span>' if quoted else plain)
    return "<br>".join(lines)


def page() -> str:
    slack = message("slack", "reply.received")
    header, body, facts, context = slack["blocks"]
    fields = "".join(f'<div class="f">{slack_html(f["text"])}</div>' for f in facts["fields"])
    discord = message("discord", "meeting.booked")
    embed = discord["embeds"][0]
    colour = f"#{embed['color']:06x}"
    embed_fields = "".join(
        f'<div class="f"><b>{discord_html(f["name"])}</b><br>{discord_html(f["value"])}</div>'
        for f in embed["fields"]
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><style>
body {{ margin: 0; font: 14px/1.45 system-ui, sans-serif; display: flex; gap: 16px;
       padding: 16px; background: #f3f4f6; width: 1120px; box-sizing: border-box; }}
.pane {{ flex: 1 1 0; min-width: 0; border-radius: 8px; padding: 14px 16px; }}
.f {{ overflow-wrap: anywhere; }}
.label {{ font-size: 11px; text-transform: uppercase; letter-spacing: .06em;
          opacity: .7; margin-bottom: 8px; }}
.slack {{ background: #fff; color: #1d1c1d; border: 1px solid #ddd; }}
.slack h3 {{ margin: 4px 0 6px; font-size: 17px; }}
.slack .quote {{ display: block; border-left: 4px solid #ddd; padding-left: 10px; }}
.grid {{ display: grid; grid-template-columns: 1fr 1fr; gap: 8px 16px; margin: 10px 0; }}
.ctx {{ font-size: 12px; color: #616061; }}
.discord {{ background: #313338; color: #dbdee1; }}
.embed {{ background: #2b2d31; border-left: 4px solid {colour}; border-radius: 4px;
          padding: 10px 14px; margin-top: 8px; }}
.embed h3 {{ margin: 0 0 8px; color: #fff; font-size: 15px; }}
.discord .grid {{ grid-template-columns: 1fr 1fr 1fr; }}
.discord .f b {{ color: #fff; }}
.foot {{ font-size: 12px; color: #949ba4; margin-top: 8px; }}
.bot {{ font-weight: 600; color: #fff; }}
</style></head><body>
<section class="pane slack"><div class="label">Slack · Reply Received</div>
<h3>{html.escape(header["text"]["text"])}</h3>
<div>{slack_html(body["text"]["text"])}</div>
<div class="grid">{fields}</div>
<div class="ctx">{slack_html(context["elements"][0]["text"])}</div></section>
<section class="pane discord"><div class="label">Discord · Meeting Booked</div>
<div class="bot">AutoReach</div><div>{discord_html(discord["content"])}</div>
<div class="embed"><h3>{discord_html(embed["title"])}</h3>
<div class="grid">{embed_fields}</div>
<div class="foot">{discord_html(embed["footer"]["text"])}</div></div></section>
</body></html>"""


def test_chat_preview_picture(tmp_path: Path) -> None:
    """The preview draws both messages; docs/chat-messages.png is replaced only on
    purpose (`make screenshot`), so a test run leaves the work tree clean."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"the browser tests need Debian's Chromium at {CHROMIUM}", pytrace=False)
    source = tmp_path / "chat.html"
    source.write_text(page())
    shot = tmp_path / PICTURE.name
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        view = browser.new_page(viewport={"width": 1120, "height": 400})
        view.goto(source.as_uri())
        assert "Maren Okafor wrote:" in view.inner_text("body")
        view.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shot.stat().st_size > 10_000
    if os.environ.get("OUTBOX_UPDATE_SCREENSHOT") == "1" or not PICTURE.exists():
        shutil.copyfile(shot, PICTURE)
