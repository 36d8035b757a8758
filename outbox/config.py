"""Settings, read once from the environment."""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from outbox.supervisor import parse_faults

__all__ = ["ConfigError", "Settings", "parse_duration"]


class ConfigError(ValueError):
    """A setting has a value we cannot use; the message names the variable."""


def _number(env: Mapping[str, str], name: str, default: float, minimum: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}: {raw!r} is not a number") from None
    if not math.isfinite(value) or value < minimum:
        raise ConfigError(f"{name}: {raw!r} must be a finite number, at least {minimum:g}")
    return value


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(raw: str) -> float:
    """Seconds in a DURATION: a number of seconds, or a number with s, m, h or d.

    Raises ValueError with a message that says what is wrong with ``raw``.
    """
    match = _DURATION.fullmatch(raw.strip().lower())
    if match is None:
        raise ValueError(f"{raw!r} is not a duration like 90s, 15m, 12h, 30d or seconds")
    seconds = float(match[1]) * _UNIT_SECONDS[match[2]]
    if not 0 < seconds < math.inf:
        raise ValueError(f"{raw!r} is not a duration of more than 0 seconds")
    return seconds


def _retention(env: Mapping[str, str]) -> float | None:
    raw = env.get("OUTBOX_RETENTION", "").strip() or "30d"
    if raw.lower() == "off":
        return None
    try:
        return parse_duration(raw)
    except ValueError as exc:
        raise ConfigError(f"OUTBOX_RETENTION: {exc}, or off") from None


def _auto_disable_after(env: Mapping[str, str]) -> float | None:
    raw = env.get("OUTBOX_AUTO_DISABLE_AFTER", "").strip() or "5d"
    if raw.lower() == "off":
        return None
    try:
        return parse_duration(raw)
    except ValueError as exc:
        raise ConfigError(f"OUTBOX_AUTO_DISABLE_AFTER: {exc}, or off") from None


def _pooler(env: Mapping[str, str]) -> str:
    raw = env.get("OUTBOX_DATABASE_POOLER", "").strip().lower()
    if raw in ("", "none"):
        return ""
    if raw != "pgbouncer":
        raise ConfigError(f"OUTBOX_DATABASE_POOLER: {raw!r} is not none or pgbouncer")
    return raw


def _schema_mismatch(env: Mapping[str, str]) -> str:
    raw = env.get("OUTBOX_SCHEMA_MISMATCH", "").strip().lower() or "exit"
    if raw not in ("exit", "wait"):
        raise ConfigError(f"OUTBOX_SCHEMA_MISMATCH: {raw!r} is not exit or wait")
    return raw


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(f"{name}: {raw!r} is not true or false")


def _delays(env: Mapping[str, str]) -> tuple[float, ...]:
    raw = env.get("OUTBOX_RETRY_DELAYS", "300,3600,43200").strip()
    if raw in ("", "none"):
        return ()
    delays = []
    for part in (p.strip() for p in raw.split(",")):
        try:
            # Seconds, 0 included (retry at once), or a DURATION (5m, 1h, 12h).
            delay = float(part) if _SECONDS.fullmatch(part) else parse_duration(part)
        except ValueError:
            raise ConfigError(
                f"OUTBOX_RETRY_DELAYS: {part!r} is not seconds or a duration like 5m, 1h, 12h"
            ) from None
        delays.append(delay)
    return tuple(delays)


_SECONDS = re.compile(r"\d+(?:\.\d+)?")


def _notify(env: Mapping[str, str]) -> tuple[str, str]:
    """OUTBOX_NOTIFY_URL and OUTBOX_NOTIFY_SECRET: both, or neither."""
    url = env.get("OUTBOX_NOTIFY_URL", "").strip()
    secret = env.get("OUTBOX_NOTIFY_SECRET", "")
    if url:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"OUTBOX_NOTIFY_URL: {url!r} is not an absolute http:// or https:// URL"
            )
        if not secret:
            raise ConfigError("OUTBOX_NOTIFY_SECRET: must be set with OUTBOX_NOTIFY_URL")
    elif secret:
        raise ConfigError("OUTBOX_NOTIFY_URL: must be set with OUTBOX_NOTIFY_SECRET")
    if secret and len(secret) < 16:
        raise ConfigError(
            f"OUTBOX_NOTIFY_SECRET: must be at least 16 characters, not {len(secret)}"
        )
    return url, secret


def _faults(env: Mapping[str, str]) -> tuple[tuple[str, int], ...]:
    try:
        return tuple(parse_faults(env.get("OUTBOX_TEST_FAULTS", "")).items())
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _listen(env: Mapping[str, str]) -> tuple[str, int] | None:
    raw = env.get("OUTBOX_API_LISTEN", "127.0.0.1:8080").strip()
    if raw.lower() == "off":
        return None
    host, sep, port = raw.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise ConfigError(f"OUTBOX_API_LISTEN: {raw!r} is not HOST:PORT or off")
    return host.strip("[]") or "0.0.0.0", int(port)


def _admin_url(listen: tuple[str, int] | None) -> str:
    if listen is None:
        return ""
    host, port = listen
    # A wildcard address is not one to open; this machine's loopback is.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _public_url(env: Mapping[str, str], listen: tuple[str, int] | None) -> str:
    """Where people reach the admin server; portal links start with it. Empty when the
    admin server is off and no OUTBOX_PUBLIC_URL says where another one is."""
    raw = env.get("OUTBOX_PUBLIC_URL", "").strip()
    if raw:
        parts = urlsplit(raw)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
            raise ConfigError(f"OUTBOX_PUBLIC_URL: {raw!r} is not an http:// or https:// base URL")
        return raw.rstrip("/")
    return _admin_url(listen)


# A CSP source of scheme and host (a leading "*." allowed), with an optional port.
_ORIGIN = re.compile(r"https?://(\*\.)?[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*(:[0-9]{1,5})?")
_COLOR = re.compile(r"#[0-9A-Fa-f]{6}")
_PRODUCT_NAME_MAX = 60


def _frame_ancestors(env: Mapping[str, str]) -> tuple[str, ...]:
    """The origins allowed to frame the settings page (CSP frame-ancestors)."""
    origins = tuple(env.get("OUTBOX_PORTAL_FRAME_ANCESTORS", "").split())
    for origin in origins:
        if _ORIGIN.fullmatch(origin) is None:
            raise ConfigError(
                f"OUTBOX_PORTAL_FRAME_ANCESTORS: {origin!r} is not an origin like "
                "https://app.example.com (scheme and host, optional port, no path), "
                "space-separated"
            )
    return origins


def _product_name(env: Mapping[str, str]) -> str:
    raw = env.get("OUTBOX_PORTAL_PRODUCT_NAME", "").strip()
    if len(raw) > _PRODUCT_NAME_MAX or any(ord(c) < 32 or ord(c) == 127 for c in raw):
        raise ConfigError(
            f"OUTBOX_PORTAL_PRODUCT_NAME: {raw[:80]!r} must be at most {_PRODUCT_NAME_MAX} "
            "characters on one line"
        )
    return raw


def _accent_color(env: Mapping[str, str]) -> str:
    raw = env.get("OUTBOX_PORTAL_ACCENT_COLOR", "").strip()
    if raw and _COLOR.fullmatch(raw) is None:
        raise ConfigError(
            f"OUTBOX_PORTAL_ACCENT_COLOR: {raw!r} is not a colour like #1f5fd6 (#RRGGBB)"
        )
    return raw.lower()


@dataclass(frozen=True)
class Settings:
    """Everything the sidecar can be told; docs/operating.md, Settings, says what each is."""

    database_url: str = ""
    retry_delays: tuple[float, ...] = (300.0, 3600.0, 43200.0)
    http_timeout: float = 10.0
    concurrency: int = 64
    ca_file: str | None = None
    allow_private_targets: bool = False
    api_listen: tuple[str, int] | None = ("127.0.0.1", 8080)
    # Base URL of the admin server as people reach it, for portal links.
    public_url: str = "http://127.0.0.1:8080"
    log_format: str = "json"
    # Not in the contract: how often an idle dispatcher looks without being woken.
    poll_interval: float = 1.0
    # How often a running sidecar checks that the schema is still the one it knows.
    schema_check_interval: float = 30.0
    # What `outbox run` does on a schema it does not know: "exit" (2 at start, 3 once
    # running), or "wait" for one it knows, alive, answering only its probes and
    # /metrics, and delivering nothing (outbox.sidecar.wait_for_schema).
    schema_mismatch: str = "exit"
    # Parts that fail at their first starts, for tests (outbox.supervisor.parse_faults).
    test_faults: tuple[tuple[str, int], ...] = ()
    # Seconds finished deliveries and their events are kept; None keeps everything.
    retention: float | None = 30 * 86400.0
    # "pgbouncer" when database_url goes through PgBouncer in transaction mode.
    database_pooler: str = ""
    # A direct connection (no pooler) for LISTEN and the doorbell's session lock.
    listen_database_url: str = ""
    # Seconds without a successful attempt after which a failing webhook is disabled;
    # None: never.
    auto_disable_after: float | None = 5 * 86400.0
    # Origins that may show the settings page in an iframe; none: it refuses framing.
    portal_frame_ancestors: tuple[str, ...] = ()
    # The product's name on the settings page; "" names none.
    portal_product_name: str = ""
    # The page's accent colour as #rrggbb; "" keeps the page's blue.
    portal_accent_color: str = ""
    # Where operational events are POSTed, and their signing secret; empty: not sent.
    notify_url: str = ""
    notify_secret: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        log_format = env.get("OUTBOX_LOG_FORMAT", "").strip().lower()
        if not log_format:
            log_format = "console" if sys.stderr.isatty() else "json"
        if log_format not in ("console", "json"):
            raise ConfigError(f"OUTBOX_LOG_FORMAT: {log_format!r} is not console or json")
        ca_file = env.get("OUTBOX_CA_FILE", "").strip() or None
        if ca_file is not None and not (os.path.isfile(ca_file) and os.access(ca_file, os.R_OK)):
            raise ConfigError(f"OUTBOX_CA_FILE: {ca_file!r} is not a readable file")
        listen = _listen(env)
        notify_url, notify_secret = _notify(env)
        return cls(
            database_url=env.get("OUTBOX_DATABASE_URL") or env.get("DATABASE_URL") or "",
            retry_delays=_delays(env),
            http_timeout=_number(env, "OUTBOX_HTTP_TIMEOUT", 10.0, 0.001),
            concurrency=int(_number(env, "OUTBOX_CONCURRENCY", 64, 1)),
            ca_file=ca_file,
            allow_private_targets=_flag(env, "OUTBOX_ALLOW_PRIVATE_TARGETS"),
            api_listen=listen,
            public_url=_public_url(env, listen),
            log_format=log_format,
            poll_interval=_number(env, "OUTBOX_POLL_INTERVAL", 1.0, 0.01),
            schema_check_interval=_number(env, "OUTBOX_SCHEMA_CHECK_INTERVAL", 30.0, 0.01),
            schema_mismatch=_schema_mismatch(env),
            test_faults=_faults(env),
            retention=_retention(env),
            database_pooler=_pooler(env),
            listen_database_url=env.get("OUTBOX_LISTEN_DATABASE_URL", "").strip(),
            auto_disable_after=_auto_disable_after(env),
            portal_frame_ancestors=_frame_ancestors(env),
            portal_product_name=_product_name(env),
            portal_accent_color=_accent_color(env),
            notify_url=notify_url,
            notify_secret=notify_secret,
        )

    @property
    def admin_url(self) -> str:
        """The admin server's URL from this machine (for `make run`'s hints); empty when
        OUTBOX_API_LISTEN is off."""
        return _admin_url(self.api_listen)

    @property
    def pooled(self) -> bool:
        """Whether database_url reaches Postgres through a transaction pooler, where a
        session (its settings, prepared statements, advisory locks, LISTEN) does not last
        from one transaction to the next."""
        return bool(self.database_pooler)

    @property
    def listen_url(self) -> str | None:
        """Where the dispatcher LISTENs and holds the doorbell: a connection of its own
        for a whole session. None when the only way in is through a transaction pooler,
        so the dispatcher polls."""
        if self.listen_database_url:
            return self.listen_database_url
        return None if self.pooled else self.database_url

    @property
    def connect_options(self) -> dict[str, Any]:
        """psycopg connection options for connections to database_url: through a
        transaction pooler, a statement prepared in one transaction may be gone in the
        next (PgBouncer before 1.21 cannot keep them), so none is prepared."""
        return {"prepare_threshold": None} if self.pooled else {}

    @property
    def lease_seconds(self) -> float:
        """How long a claim holds a delivery: past the HTTP timeout, with room to record.

        With the default 10 s timeout a crashed dispatcher's deliveries come back in
        25 s, inside the contract's 30 s.
        """
        return max(25.0, self.http_timeout + 15.0)

    @property
    def per_webhook_limit(self) -> int:
        """Attempts one webhook may have in flight, so a slow endpoint cannot take all."""
        return max(2, self.concurrency // 8)

    @property
    def per_account_limit(self) -> int:
        """Attempts one account may have in flight, so that its webhooks together (up to
        10, each with its own share) cannot take all: half, which still leaves a lone
        busy account four webhooks' worth (at least one webhook's)."""
        return max(self.per_webhook_limit, self.concurrency // 2)
