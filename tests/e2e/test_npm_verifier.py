"""Signatures as a receiver written in JavaScript checks them: the npm `standardwebhooks`
package, run by Node.js (``make test`` installs it under tests/node)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from outbox.signing import generate_secret, standard_signature

NODE_VERIFIER = Path(__file__).parent.parent / "node" / "verify.mjs"
BODY = b'{"a":1}'


def node_verify(secret: str, body: bytes, headers: dict[str, str]) -> str:
    """What the npm `standardwebhooks` package says of a request: "ok" or its error."""
    if not (NODE_VERIFIER.parent / "node_modules" / "standardwebhooks").is_dir():
        pytest.skip("the npm verifier is not installed: run `make test` (needs Node.js)")
    done = subprocess.run(
        ["node", str(NODE_VERIFIER)],
        input=json.dumps({"secret": secret, "body": body.decode(), "headers": headers}),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return done.stdout.strip() or done.stderr.strip()


def signed(secret: str, msg_id: str, *older: str) -> dict[str, str]:
    now = int(time.time())
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(now),
        "webhook-signature": standard_signature(secret, msg_id, now, BODY, *older),
    }


class TestNpmVerifier:
    def test_a_generated_secret_verifies_as_given(self) -> None:
        """`new Webhook(secret)`, given the whsec_ string, accepts the request and refuses
        it with another webhook-id."""
        secret = generate_secret()
        headers = signed(secret, "msg_8")
        assert node_verify(secret, BODY, headers) == "ok"
        tampered = headers | {"webhook-id": "msg_9"}
        assert node_verify(secret, BODY, tampered) != "ok"

    def test_during_a_rotation_the_new_secret_verifies(self) -> None:
        """While an old secret still signs beside the new one, the new one verifies."""
        new = generate_secret()
        headers = signed(new, "m", "an-old-typed-secret-0123")
        assert node_verify(new, BODY, headers) == "ok"
