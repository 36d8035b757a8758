"""JSON as outbox writes it for people and programs: the admin API's answers and the
CLI's ``--json`` output, with times as RFC 3339 in UTC."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

__all__ = ["default", "dumps"]


def default(value: Any) -> Any:
    """JSON for what json.dumps cannot write: times as RFC 3339 in UTC."""
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def dumps(data: Any, *, indent: int | None = None) -> str:
    """``data`` as JSON text, ending in a newline: it keeps a shell prompt off the end
    of what curl prints."""
    return json.dumps(data, default=default, indent=indent) + "\n"
