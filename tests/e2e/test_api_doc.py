"""The curl examples of docs/api.md work when pasted, against a real sidecar."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable

import pytest

from tests.conftest import ROOT, Sidecar

# Run between the page's two blocks: "once that delivery has finished".
_UNTIL_FINISHED = """
for _ in $(seq 100); do
    curl -s "$OUTBOX_API/api/v1/webhooks/$HOOK" -H "$AUTH" | jq -e '.pending == 0' && break
    sleep 0.05
done
"""


def _examples() -> list[str]:
    page = (ROOT / "docs" / "api.md").read_text()
    section = page[page.index("\n## With curl\n") : page.index("\n## Calls\n")]
    return [block for block in re.findall(r"```sh\n(.*?)```", section, re.S) if "curl" in block]


@pytest.mark.skipif(not (shutil.which("curl") and shutil.which("jq")), reason="needs curl and jq")
def test_the_curl_examples_work(sidecars: Callable[..., Sidecar]) -> None:
    """Both blocks run with bash -e, and every answer is a success: the webhook is
    created, tested, listed, replayed and deleted."""
    # No retries, so the example's delivery (to a host that does not resolve) is
    # finished at once and can be replayed.
    sidecar = sidecars(OUTBOX_RETRY_DELAYS="none")
    blocks = _examples()
    assert len(blocks) == 2
    script = "set -euo pipefail\n" + _UNTIL_FINISHED.join(blocks)
    script = script.replace("http://127.0.0.1:8080", f"http://127.0.0.1:{sidecar.api_port}")
    ran = subprocess.run(
        ["bash", "-c", script],
        env=sidecar.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 0, ran.stderr
    out = ran.stdout
    assert '{"error": {' not in out, out
    assert '"display_name": "Lead Scored"' in out
    assert '"url": "https://crm.example.com/v2/hook"' in out
    assert '"ok": false' in out  # the test payload: crm.example.com does not resolve
    assert '"attempt_log": [{"attempt": 1' in out
    assert '"requeued": ' in out
    assert '"has_secret": false' in out
    assert out.splitlines()[-1] == "204"
