"""The benchmark's events: one deterministic ~2 KB JSON object per sequence number.

Every contender delivers the same objects: the outbox backlog is built in SQL from the
pool table below (so a million rows need no Python), the bare client and pgqueuer build
them here. The text is the one Postgres prints for the jsonb (keys by length, then
bytes; ", " and ": "), so the bodies are byte for byte what `outbox run` sends.
"""

from __future__ import annotations

import json
import random
import time
from functools import cache

from outbox import wire

POOL = 1000
EVENT = "lead.scored"
TIMESTAMP = "2026-11-27T12:00:00.000Z"
SECRET = "whsec_bench_secret_0123456789"
# Total body (event, timestamp, data) of about 2 KB.
BODY_BYTES = 2048

_WORDS = (
    "lead",
    "qualified",
    "pricing",
    "demo",
    "call",
    "follow",
    "up",
    "budget",
    "timeline",
    "decision",
    "maker",
    "integration",
    "webhook",
    "crm",
    "sync",
    "renewal",
    "churn",
    "risk",
    "champion",
    "procurement",
    "security",
    "review",
    "trial",
    "expansion",
    "seats",
    "annual",
    "contract",
    "onboarding",
    "success",
    "quarterly",
    "business",
)


@cache
def _base(k: int) -> dict[str, object]:
    rng = random.Random(k)
    name = f"{rng.choice(['Ada', 'Grace', 'Alan', 'Edsger', 'Barbara'])} {k}"
    lead = {
        "id": k,
        "name": name,
        "email": f"lead{k}@example.com",
        "company": f"Company {rng.randrange(10_000)}",
    }
    score = {"fit": rng.randrange(100), "intent": rng.randrange(100), "overall": rng.randrange(100)}
    data: dict[str, object] = {"lead": lead, "notes": "", "score": score}
    # Pad the notes with words until the body reaches BODY_BYTES.
    overhead = len(_body_text(json.dumps(data))) + 10  # room for a long lead id
    words: list[str] = []
    while overhead + len(" ".join(words)) < BODY_BYTES:
        words.append(rng.choice(_WORDS))
    data["notes"] = " ".join(words)[: BODY_BYTES - overhead]
    return data


def _body_text(data_json: str) -> str:
    return f'{{"event": "{EVENT}", "timestamp": "{TIMESTAMP}", "data": {data_json}}}'


def data_json(seq: int) -> str:
    """The event's ``data`` as jsonb prints it."""
    base = _base(seq % POOL)
    lead = dict(base["lead"])  # type: ignore[call-overload]
    lead["id"] = seq
    return json.dumps({"lead": lead, "notes": base["notes"], "score": base["score"]})


def body(seq: int) -> bytes:
    """The request body for event ``seq``, as `outbox run` builds it (outbox.wire)."""
    return wire.body(EVENT, TIMESTAMP, data_json(seq))


def headers(
    message_id: int, body: bytes, *, attempt: int = 1, now: float | None = None
) -> dict[str, str]:
    """Signed headers for one request, as `outbox run` builds them (outbox.wire)."""
    return wire.headers(
        message_id=str(message_id),
        event=EVENT,
        attempt=attempt,
        payload=body,
        secret=SECRET,
        now=int(time.time() if now is None else now),
    )


def pool_rows() -> list[tuple[int, str]]:
    """(k, data) for the SQL pool table: event seq gets row seq % POOL with lead.id = seq."""
    return [(k, data_json(k)) for k in range(POOL)]


# Creates the pool in a database and a function that renders event `seq` from it.
POOL_SQL = """
CREATE SCHEMA IF NOT EXISTS bench;
CREATE TABLE IF NOT EXISTS bench.pool (k int PRIMARY KEY, data jsonb NOT NULL);
CREATE OR REPLACE FUNCTION bench.data(seq bigint) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_set(p.data, '{lead,id}', to_jsonb(seq))
    FROM bench.pool p WHERE p.k = seq % 1000
$$;
"""
