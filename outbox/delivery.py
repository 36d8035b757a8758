"""One HTTP attempt: POST, timeout, no redirects, SSRF guard, and the reason in words."""

from __future__ import annotations

import errno
import ipaddress
import socket
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType

import aiohttp
import yarl
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from outbox.config import Settings
from outbox.retry import parse_retry_after

__all__ = ["Attempt", "Blocked", "Sender"]

# Response bodies are read (so the connection can be reused) but never kept whole.
_BODY_CAP = 64 * 1024


class Blocked(OSError):
    """The target resolves to an address we refuse to connect to."""


# NAT64 (RFC 6052) carries an IPv4 address in its last 32 bits; a NAT64 gateway would
# take us to that address, so it is judged as that address.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _check_address(address: str) -> None:
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    candidates = [ip]
    if isinstance(ip, ipaddress.IPv6Address) and (inner := _embedded_ipv4(ip)) is not None:
        candidates.append(inner)
    if any(not c.is_global or c.is_multicast for c in candidates):
        raise Blocked(f"blocked: {address} is not a public address")


class _GuardedResolver(AbstractResolver):
    """Resolves once and checks the very addresses aiohttp will connect to."""

    def __init__(self) -> None:
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            _check_address(result["host"])
        return results

    async def close(self) -> None:
        await self._inner.close()


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one POST came to."""

    started_at: datetime
    duration_ms: int
    status: int | None
    error: str | None
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _reason(exc: BaseException, timeout: float) -> str:
    """The failure in the words the contract promises users (and psql shows)."""
    if isinstance(exc, TimeoutError):
        return f"timeout after {timeout:g}s"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        exc = exc.certificate_error
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, Blocked):
            return str(cause)
        if isinstance(cause, ssl.SSLCertVerificationError):
            detail = getattr(cause, "verify_message", None) or cause.reason
            return f"TLS: certificate verify failed ({detail})"
        if isinstance(cause, ssl.SSLError):
            return f"TLS: {cause.reason or cause}"
        if isinstance(cause, OSError) and cause.errno == errno.ECONNREFUSED:
            return "connection refused"
        if isinstance(cause, socket.gaierror):
            return f"DNS: cannot resolve host ({cause.strerror})"
        cause = getattr(cause, "os_error", None) or cause.__cause__
    if isinstance(exc, aiohttp.ClientSSLError):
        return f"TLS: {exc}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "connection closed by the server before it answered"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"connection failed: {exc.os_error.strerror or exc.os_error}"
    return f"connection failed: {exc.__class__.__name__}: {exc}"


class Sender:
    """An aiohttp session shared by every attempt of one process."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Sender:
        context = ssl.create_default_context()
        if self._settings.ca_file:
            context.load_verify_locations(self._settings.ca_file)
        connector = aiohttp.TCPConnector(
            ssl=context,
            limit=self._settings.concurrency,
            resolver=None if self._settings.allow_private_targets else _GuardedResolver(),
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self._settings.http_timeout),
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding",),
        )
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Attempt:
        """POST once; never raises for anything the target or the network does."""
        assert self._session is not None, "use Sender as an async context manager"
        started_at = datetime.now(UTC)
        start = time.perf_counter()
        status: int | None = None
        retry_after: float | None = None
        try:
            if not self._settings.allow_private_targets:
                self._check_literal(url)
            async with self._session.post(
                url, data=body, headers=headers, allow_redirects=False
            ) as response:
                status = response.status
                await response.content.read(_BODY_CAP)
                if status in (429, 503):
                    retry_after = parse_retry_after(
                        response.headers.get("Retry-After"), datetime.now(UTC)
                    )
            error = None if 200 <= status < 300 else _http_reason(status, response.headers)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            error = _reason(exc, self._settings.http_timeout)
        except Exception as exc:
            # Whatever else goes wrong is still an attempt to record, not a lost delivery.
            error = f"internal error: {exc.__class__.__name__}: {exc}"
        duration_ms = round((time.perf_counter() - start) * 1000)
        return Attempt(started_at, duration_ms, status, error, retry_after)

    @staticmethod
    def _check_literal(url: str) -> None:
        # aiohttp skips the resolver for IP literals, so they are checked here.
        host = yarl.URL(url).host or ""
        try:
            ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return
        _check_address(host)


def _http_reason(status: int, headers: Mapping[str, str]) -> str:
    if 300 <= status < 400:
        location = headers.get("Location", "")
        return f"HTTP {status} (redirect to {location or 'nowhere'} not followed)"
    return f"HTTP {status}"
