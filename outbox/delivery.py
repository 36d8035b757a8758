"""One HTTP attempt: POST, timeout, no redirects, SSRF guard, and the reason in words."""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import socket
import ssl
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType

import aiohttp
import yarl
from aiohttp.abc import AbstractResolver, ResolveResult

from outbox.config import Settings
from outbox.retry import parse_retry_after

__all__ = [
    "BLOCKED_WITHOUT_ADDRESS",
    "BODY_KEPT",
    "Attempt",
    "Blocked",
    "Sender",
    "body_text",
    "for_tenant",
    "is_public",
]

# How much of each answer is kept, for the delivery log. No more is read: the rest of
# a larger (or slow) body is left unread, and the connection closed rather than reused.
BODY_KEPT = 1024


class Blocked(OSError):
    """The target resolves to an address we refuse to connect to."""

    def __init__(self, address: str) -> None:
        super().__init__(f"blocked: {address} is not a public address")
        self.address = address


# What a tenant is told instead: the address itself would let them map internal DNS.
BLOCKED_WITHOUT_ADDRESS = "blocked: not a public address"
_BLOCKED = "blocked: "


def for_tenant(reason: str | None) -> str | None:
    """A failure reason as an account may read it: a refused target without its address
    (operators see the address in SQL, the CLI and the log)."""
    if reason is not None and reason.startswith(_BLOCKED):
        return BLOCKED_WITHOUT_ADDRESS
    return reason


_V4 = ipaddress.IPv4Network
_V6 = ipaddress.IPv6Network

# IPv4 outside the public unicast space: IANA's special-purpose registry, multicast and
# the reserved rest. 192.0.0.0/24 is refused whole, though two of its addresses are
# anycast services no webhook lives at.
_NOT_PUBLIC_V4 = tuple(
    _V4(n)
    for n in (
        "0.0.0.0/8",  # "this network"
        "10.0.0.0/8",
        "100.64.0.0/10",  # carrier-grade NAT
        "127.0.0.0/8",
        "169.254.0.0/16",  # link-local, and cloud metadata services
        "172.16.0.0/12",
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",  # documentation
        "192.88.99.0/24",  # 6to4 relay anycast: a relay may forward anywhere
        "192.168.0.0/16",
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # documentation
        "203.0.113.0/24",  # documentation
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, and the broadcast address
    )
)

# IPv6 forms that carry an IPv4 address in their last 32 bits. Whatever such an
# address reaches (the kernel's IPv4 stack, a translator, a NAT64 gateway) is that IPv4
# address, so it is judged as that address.
_CARRIES_V4 = (
    _V6("::ffff:0:0/96"),  # IPv4-mapped
    _V6("::ffff:0:0:0/96"),  # IPv4-translated
    _V6("64:ff9b::/96"),  # NAT64, well-known prefix
    _V6("::/96"),  # IPv4-compatible (:: and ::1 are judged by 0.0.0.0 and 0.0.0.1)
)
# Global unicast is 2000::/3: everything outside it (loopback, unique local, link-local,
# site-local, multicast, local-use NAT64 64:ff9b:1::/48, discard-only 100::/64, ...) is
# refused, and so are these parts of it.
_GLOBAL_V6 = _V6("2000::/3")
_NOT_PUBLIC_V6 = tuple(
    _V6(n)
    for n in (
        "2001::/23",  # IETF protocol assignments (Teredo is judged by what it carries)
        "2001:db8::/32",  # documentation
        "3fff::/20",  # documentation
    )
)
_TEREDO = _V6("2001::/32")
_SIXTOFOUR = _V6("2002::/16")


def _public_v4(ip: ipaddress.IPv4Address) -> bool:
    return ip.is_global and not any(ip in net for net in _NOT_PUBLIC_V4)


def _public_v6(ip: ipaddress.IPv6Address) -> bool:
    for net in _CARRIES_V4:
        if ip in net:
            return _public_v4(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip in _SIXTOFOUR:
        # 6to4 carries the IPv4 address of the site's 6to4 router in bits 16-47.
        return _public_v4(ipaddress.IPv4Address((int(ip) >> 80) & 0xFFFFFFFF))
    if ip in _TEREDO:
        # Teredo carries the client's address (obfuscated), where packets end up, and
        # its Teredo server's, which is contacted on the way: both must be public.
        assert ip.teredo is not None
        server, client = ip.teredo
        return _public_v4(server) and _public_v4(client)
    return ip in _GLOBAL_V6 and not any(ip in net for net in _NOT_PUBLIC_V6)


def is_public(address: str) -> bool:
    """Whether ``address`` (an IP literal, maybe with an IPv6 zone) is public unicast."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv4Address):
        return _public_v4(ip)
    return _public_v6(ip)


def _check_address(address: str) -> None:
    if not is_public(address):
        raise Blocked(address)


# getaddrinfo holds a thread for as long as a name server takes to answer. In the event
# loop's default executor those threads are shared with everything else, psycopg's own
# host lookups included: a tenant whose name server is slow could take them all. So
# lookups get threads of their own, more than one account can occupy at once (aiohttp
# looks each host up once at a time, and an account has at most 10 webhooks).
DNS_THREADS = 32


class _Resolver(AbstractResolver):
    """getaddrinfo on threads of our own; with ``guard``, the addresses aiohttp will
    connect to are checked here, after the one lookup it makes."""

    def __init__(self, guard: bool) -> None:
        self._guard = guard
        self._pool = ThreadPoolExecutor(DNS_THREADS, thread_name_prefix="outbox-dns")

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        lookup = functools.partial(
            socket.getaddrinfo, host, port, family, socket.SOCK_STREAM, 0, socket.AI_ADDRCONFIG
        )
        infos = await asyncio.get_running_loop().run_in_executor(self._pool, lookup)
        results: list[ResolveResult] = []
        for found, _, proto, _, address in infos:
            if found == socket.AF_INET6 and len(address) < 3:
                continue  # a Python built without IPv6
            if len(address) == 4 and address[3]:
                # A link-local address needs its zone; numeric, so nothing is looked up.
                ip, _port = socket.getnameinfo(address, _NUMERIC_NAME)
            else:
                ip = str(address[0])
            if self._guard:
                _check_address(ip)
            results.append(
                ResolveResult(
                    hostname=host,
                    host=ip,
                    port=int(address[1]),
                    family=found,
                    proto=proto,
                    flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
                )
            )
        return results

    async def close(self) -> None:
        # Threads stuck in a slow lookup end with it; nobody waits for them.
        self._pool.shutdown(wait=False, cancel_futures=True)


_NUMERIC_NAME = socket.NI_NUMERICHOST | socket.NI_NUMERICSERV


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one POST came to."""

    started_at: datetime
    duration_ms: int
    status: int | None
    error: str | None
    retry_after: float | None = None
    # The SSRF guard refused the target (error names the address).
    blocked: bool = False
    # The first BODY_KEPT bytes of the answer as text; None when there was no answer.
    response_body: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _timeout(seconds: float) -> str:
    return f"timeout after {seconds:g}s"


# Why a connection failed, in words that name no address.
_ERRNO_WORDS = {
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
    errno.ETIMEDOUT: "connection timed out",
    errno.ECONNABORTED: "connection aborted",
    errno.EPIPE: "connection closed by the server",
    errno.EADDRNOTAVAIL: "address not available",
}


def _reason(exc: BaseException, timeout: float) -> str:
    """The failure in the words the contract promises users (and psql shows)."""
    if isinstance(exc, TimeoutError):
        return _timeout(timeout)
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
        if isinstance(cause, OSError) and cause.errno == errno.ECONNRESET:
            return "connection reset by peer"
        if isinstance(cause, socket.gaierror):
            return f"DNS: cannot resolve host ({cause.strerror})"
        cause = getattr(cause, "os_error", None) or cause.__cause__
    if isinstance(exc, aiohttp.ClientSSLError):
        return f"TLS: {exc}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "connection closed by the server before it answered"
    if isinstance(exc, aiohttp.ClientConnectorError):
        # Never the OS's own text: it names the address connected to ("Connect call
        # failed ('10.0.0.7', 443)"), which a tenant must not learn.
        words = _ERRNO_WORDS.get(exc.os_error.errno or 0)
        return f"connection failed: {words}" if words else "connection failed"
    if isinstance(exc, OSError) and exc.errno in _ERRNO_WORDS:
        return f"connection failed: {_ERRNO_WORDS[exc.errno]}"
    return "connection failed"


def _blocked(exc: BaseException) -> bool:
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, Blocked):
            return True
        cause = getattr(cause, "os_error", None) or cause.__cause__
    return False


class Sender:
    """An aiohttp session with connections, and lookup threads, of its own: one for the
    dispatcher's deliveries, another for the admin API's test sends, so that neither
    can take what the other needs. At most ``limit`` connections are open at once
    (default ``OUTBOX_CONCURRENCY``)."""

    def __init__(self, settings: Settings, limit: int | None = None) -> None:
        self._settings = settings
        self._limit = settings.concurrency if limit is None else limit
        self._session: aiohttp.ClientSession | None = None

    @property
    def timeout(self) -> float:
        """Seconds one attempt may take, all of it (OUTBOX_HTTP_TIMEOUT)."""
        return self._settings.http_timeout

    async def __aenter__(self) -> Sender:
        context = ssl.create_default_context()
        if self._settings.ca_file:
            context.load_verify_locations(self._settings.ca_file)
        connector = aiohttp.TCPConnector(
            ssl=context,
            limit=self._limit,
            resolver=_Resolver(guard=not self._settings.allow_private_targets),
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            # No timeouts of aiohttp's own: post() gives each attempt one budget.
            timeout=aiohttp.ClientTimeout(),
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding",),
        )
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()

    async def post(
        self, url: str, body: bytes, headers: dict[str, str], started_at: datetime | None = None
    ) -> Attempt:
        """POST once; never raises for anything the target or the network does.

        ``started_at`` is the send time the headers were made with, when they carry one,
        so that the delivery log can show the request exactly as it was sent.
        """
        assert self._session is not None, "use Sender as an async context manager"
        started_at = started_at or datetime.now(UTC)
        start = time.perf_counter()
        status: int | None = None
        retry_after: float | None = None
        blocked = False
        head = bytearray()
        # One budget for all of it: waiting for a free connection, the lookup, connecting,
        # TLS, sending and reading. Once it is spent, the attempt is a timeout, whatever
        # aiohttp made of the cancellation on its way out.
        budget = asyncio.timeout(self._settings.http_timeout)
        if any(name.lower() == "authorization" for name in headers):
            # The webhook's own Authorization header replaces credentials in the URL,
            # which aiohttp would otherwise refuse to combine with it.
            url = str(yarl.URL(url).with_user(None))
        try:
            async with budget:
                if not self._settings.allow_private_targets:
                    self._check_literal(url)
                async with self._session.post(
                    url, data=body, headers=headers, allow_redirects=False
                ) as response:
                    status = response.status
                    while len(head) < BODY_KEPT:
                        chunk = await response.content.read(BODY_KEPT - len(head))
                        if not chunk:
                            break
                        head += chunk
                    if status in (429, 503):
                        retry_after = parse_retry_after(
                            response.headers.get("Retry-After"), datetime.now(UTC)
                        )
            error = None if 200 <= status < 300 else _http_reason(status, response.headers)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            if budget.expired():
                error = _timeout(self._settings.http_timeout)
                if status is not None:
                    # The status line came in time; the body did not.
                    error += " reading the body"
            else:
                error = _reason(exc, self._settings.http_timeout)
                blocked = _blocked(exc)
        except Exception as exc:
            # Whatever else goes wrong is still an attempt to record, not a lost delivery.
            error = f"internal error: {exc.__class__.__name__}: {exc}"
        duration_ms = round((time.perf_counter() - start) * 1000)
        answer = None if status is None else body_text(bytes(head))
        return Attempt(started_at, duration_ms, status, error, retry_after, blocked, answer)

    @staticmethod
    def _check_literal(url: str) -> None:
        # aiohttp skips the resolver for IP literals, so they are checked here.
        host = yarl.URL(url).host or ""
        try:
            ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return
        _check_address(host)


def body_text(head: bytes) -> str:
    """An answer's first bytes as text: invalid UTF-8 (also a character cut in two at the
    end) replaced, and NUL, which Postgres text cannot hold, too."""
    return head.decode("utf-8", errors="replace").replace("\x00", "\ufffd")


def _http_reason(status: int, headers: Mapping[str, str]) -> str:
    if 300 <= status < 400:
        location = headers.get("Location", "")
        return f"HTTP {status} (redirect to {location or 'nowhere'} not followed)"
    return f"HTTP {status}"
