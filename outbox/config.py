"""Settings, read once from the environment (contract section 8)."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from outbox.supervisor import parse_faults

__all__ = ["ConfigError", "Settings"]


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


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(f"{name}: {raw!r} is not true or false")


def _delays(env: Mapping[str, str]) -> tuple[float, ...]:
    raw = env.get("OUTBOX_RETRY_DELAYS", "60,600,3600").strip()
    if raw in ("", "none"):
        return ()
    delays = []
    for part in raw.split(","):
        try:
            delay = float(part)
        except ValueError:
            raise ConfigError(f"OUTBOX_RETRY_DELAYS: {part.strip()!r} is not a number") from None
        if not math.isfinite(delay) or delay < 0:
            raise ConfigError(
                f"OUTBOX_RETRY_DELAYS: {part.strip()!r} must be a finite number of seconds >= 0"
            )
        delays.append(delay)
    return tuple(delays)


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


@dataclass(frozen=True)
class Settings:
    """Everything the sidecar can be told; see README for each variable."""

    database_url: str = ""
    retry_delays: tuple[float, ...] = (60.0, 600.0, 3600.0)
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
    # Parts that fail at their first starts, for tests (outbox.supervisor.parse_faults).
    test_faults: tuple[tuple[str, int], ...] = ()

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
            test_faults=_faults(env),
        )

    @property
    def admin_url(self) -> str:
        """The admin server's URL from this machine (for `make run`'s hints); empty when
        OUTBOX_API_LISTEN is off."""
        return _admin_url(self.api_listen)

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
