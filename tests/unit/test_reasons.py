"""Tests for the pure parts of outbox.delivery: failure reasons and the address guard."""

from __future__ import annotations

import errno
import ipaddress
import ssl

import aiohttp
import pytest
import trustme
from aiohttp.client_reqrep import ConnectionKey
from multidict import CIMultiDict, CIMultiDictProxy

from outbox.delivery import Blocked, _check_address, _http_reason, _reason, is_public

KEY = ConnectionKey(
    host="example.com",
    port=443,
    is_ssl=True,
    ssl=True,
    proxy=None,
    proxy_auth=None,
    proxy_headers_hash=None,
)


def _refused() -> OSError:
    return ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed ('93.184.216.34', 443)")


def _real_cert_verify_error() -> ssl.SSLCertVerificationError:
    """A genuine verification failure: an in-memory handshake against an untrusted CA."""
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("example.com").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()  # does not trust the trustme CA
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="example.com")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        try:
            client.do_handshake()
        except ssl.SSLCertVerificationError as exc:
            return exc
        except ssl.SSLWantReadError:
            pass
        s_in.write(c_out.read())
        try:
            server.do_handshake()
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError:
            pass
        c_in.write(s_out.read())
    raise AssertionError("handshake did not fail verification")


def _chained(outer: BaseException, inner: BaseException) -> BaseException:
    outer.__cause__ = inner
    return outer


class TestReason:
    """`_reason`: the failure in the contract's words."""

    @pytest.mark.parametrize(
        ("timeout", "expected"),
        [(10.0, "timeout after 10s"), (0.5, "timeout after 0.5s"), (2, "timeout after 2s")],
    )
    def test_timeout(self, timeout: float, expected: str) -> None:
        """A TimeoutError reads "timeout after <configured seconds>s" without a trailing .0."""
        assert _reason(TimeoutError(), timeout) == expected

    def test_aiohttp_timeout(self) -> None:
        """aiohttp's own timeout exceptions read as a timeout too."""
        assert _reason(aiohttp.ServerTimeoutError("read"), 10.0) == "timeout after 10s"
        assert _reason(aiohttp.ConnectionTimeoutError(), 10.0) == "timeout after 10s"

    def test_connection_refused_bare(self) -> None:
        """A bare ConnectionRefusedError reads "connection refused"."""
        assert _reason(_refused(), 10.0) == "connection refused"

    def test_connection_refused_as_aiohttp_wraps_it(self) -> None:
        """ECONNREFUSED wrapped as aiohttp does (ClientConnectorError from os_error) is refused."""
        os_error = _refused()
        exc = _chained(aiohttp.ClientConnectorError(KEY, os_error), os_error)
        assert _reason(exc, 10.0) == "connection refused"

    def test_connection_refused_only_in_cause(self) -> None:
        """An ECONNREFUSED OSError found only through __cause__ still reads as refused."""
        exc = _chained(aiohttp.ClientError("wrapper"), OSError(errno.ECONNREFUSED, "refused"))
        assert _reason(exc, 10.0) == "connection refused"

    def test_connection_reset_as_aiohttp_reports_it(self) -> None:
        """A reset while reading the answer (aiohttp's ClientOSError, errno 104) reads
        "connection reset by peer", without a class name."""
        exc = aiohttp.ClientOSError(errno.ECONNRESET, "Connection reset by peer")
        assert _reason(exc, 10.0) == "connection reset by peer"
        assert _reason(ConnectionResetError(errno.ECONNRESET, "reset"), 10.0) == (
            "connection reset by peer"
        )

    def test_connection_refused_happy_eyeballs(self) -> None:
        """Happy Eyeballs' combined OSError (same errno for v4 and v6) reads as refused."""
        os_error = OSError(errno.ECONNREFUSED, "Multiple exceptions: [Errno 111] ..., ...")
        exc = _chained(aiohttp.ClientConnectorError(KEY, os_error), os_error)
        assert _reason(exc, 10.0) == "connection refused"

    def test_other_os_error_is_not_refused(self) -> None:
        """A different errno is a connection failure, not "connection refused"."""
        os_error = OSError(errno.EHOSTUNREACH, "No route to host")
        exc = _chained(aiohttp.ClientConnectorError(KEY, os_error), os_error)
        assert _reason(exc, 10.0) == "connection failed: host unreachable"

    def test_no_reason_names_the_address_connected_to(self) -> None:
        """The OS's text ("Connect call failed ('10.0.0.7', 443)") is never the reason:
        an account reads it, and it names an address inside the network."""
        for code in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT, 0, None):
            os_error = OSError(code, "Connect call failed ('10.0.0.7', 443)")
            exc = _chained(aiohttp.ClientConnectorError(KEY, os_error), os_error)
            reason = _reason(exc, 10.0)
            assert reason.startswith("connection failed") and "10.0.0.7" not in reason
        assert "10.0.0.7" not in _reason(OSError("Multiple exceptions: ('10.0.0.7', 443)"), 10)

    def test_cert_verify_bare(self) -> None:
        """A real certificate verification failure starts "TLS: certificate verify failed"."""
        reason = _reason(_real_cert_verify_error(), 10.0)
        assert reason.startswith("TLS: certificate verify failed")

    def test_cert_verify_as_aiohttp_wraps_it(self) -> None:
        """Wrapped as aiohttp does (ClientConnectorCertificateError from it) it reads the same."""
        cert_error = _real_cert_verify_error()
        exc = _chained(aiohttp.ClientConnectorCertificateError(KEY, cert_error), cert_error)
        reason = _reason(exc, 10.0)
        assert reason.startswith("TLS: certificate verify failed")
        assert cert_error.verify_message in reason

    def test_blocked(self) -> None:
        """A Blocked error reads exactly "blocked: <address> is not a public address"."""
        exc = Blocked("10.0.0.1")
        assert _reason(exc, 10.0) == "blocked: 10.0.0.1 is not a public address"

    def test_blocked_from_resolver_as_aiohttp_wraps_it(self) -> None:
        """A Blocked raised in the resolver and wrapped by aiohttp keeps its message."""
        blocked = Blocked("10.0.0.1")
        exc = _chained(aiohttp.ClientConnectorError(KEY, blocked), blocked)
        assert _reason(exc, 10.0) == "blocked: 10.0.0.1 is not a public address"

    def test_check_address_message_round_trips(self) -> None:
        """The Blocked raised by _check_address turns into the contract's reason text."""
        with pytest.raises(Blocked) as info:
            _check_address("10.0.0.1")
        assert _reason(info.value, 10.0) == "blocked: 10.0.0.1 is not a public address"


# (address, what it is): every one refused.
NOT_PUBLIC = [
    ("127.0.0.1", "loopback"),
    ("10.1.2.3", "private"),
    ("192.168.1.1", "private"),
    ("172.16.0.1", "private"),
    ("169.254.169.254", "link-local: cloud metadata"),
    ("0.0.0.0", "this network"),
    ("100.64.0.1", "carrier-grade NAT"),
    ("192.0.0.9", "IETF protocol assignments"),
    ("192.0.2.1", "documentation"),
    ("192.88.99.1", "6to4 relay anycast"),
    ("198.18.0.1", "benchmarking"),
    ("224.0.0.1", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "broadcast"),
    ("::1", "loopback"),
    ("::", "unspecified"),
    ("fe80::1", "link-local"),
    ("fe80::1%eth0", "link-local with a zone"),
    ("fec0::1", "site-local"),
    ("fc00::1", "unique local"),
    ("fd12:3456::1", "unique local"),
    ("ff02::1", "multicast"),
    ("100::1", "discard-only"),
    ("2001:db8::1", "documentation"),
    ("3fff::1", "documentation"),
    ("2001:2::1", "IETF protocol assignments"),
    ("::ffff:127.0.0.1", "IPv4-mapped loopback"),
    ("::ffff:10.0.0.1", "IPv4-mapped private"),
    ("::ffff:169.254.169.254", "IPv4-mapped metadata"),
    ("::169.254.169.254", "IPv4-compatible metadata"),
    ("::10.0.0.1", "IPv4-compatible private"),
    ("::127.0.0.1", "IPv4-compatible loopback"),
    ("::ffff:0:169.254.169.254", "IPv4-translated metadata"),
    ("::ffff:0:10.0.0.1", "IPv4-translated private"),
    ("64:ff9b::169.254.169.254", "NAT64 of metadata"),
    ("64:ff9b::a00:1", "NAT64 of 10.0.0.1"),
    ("64:ff9b:1::a9fe:a9fe", "local-use NAT64 (169.254.169.254)"),
    ("64:ff9b:1::808:808", "local-use NAT64, whatever it carries"),
    ("2002:a9fe:a9fe::1", "6to4 of metadata"),
    ("2002:7f00:1::1", "6to4 of loopback"),
    ("2002:c058:6301::1", "6to4 of the 6to4 relay anycast"),
    ("2001:0:4136:e378:8000:63bf:f5ff:fffe", "Teredo of 10.0.0.1"),
    ("2001:0:a00:1:8000:63bf:f7f7:f7f7", "Teredo via a private server"),
]

PUBLIC = [
    ("93.184.216.34", "public IPv4"),
    ("8.8.8.8", "public IPv4"),
    ("2606:4700::1111", "public IPv6"),
    ("2a00:1450:4001:81c::200e", "public IPv6"),
    ("::ffff:8.8.8.8", "IPv4-mapped public"),
    ("64:ff9b::808:808", "NAT64 of 8.8.8.8"),
    ("2002:808:808::1", "6to4 of 8.8.8.8"),
    ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", "Teredo of 8.8.8.8"),
]


class TestCheckAddress:
    """`_check_address`: only globally routable unicast addresses may be connected to;
    an IPv6 address that carries an IPv4 address is judged by that address."""

    @pytest.mark.parametrize(("address", "kind"), NOT_PUBLIC)
    def test_blocks_non_public(self, address: str, kind: str) -> None:
        """Each is refused, and the reason names the address as given."""
        with pytest.raises(Blocked) as info:
            _check_address(address)
        assert str(info.value) == f"blocked: {address} is not a public address", kind
        assert not is_public(address), kind

    @pytest.mark.parametrize(("address", "kind"), PUBLIC)
    def test_allows_public(self, address: str, kind: str) -> None:
        """Each passes without an exception."""
        assert _check_address(address) is None, kind
        assert is_public(address), kind

    def test_teredo_examples_carry_what_the_table_says(self) -> None:
        """The Teredo rows embed the addresses their descriptions name."""

        def teredo(address: str) -> tuple[str, str]:
            carried = ipaddress.IPv6Address(address).teredo
            assert carried is not None
            return str(carried[0]), str(carried[1])

        assert teredo("2001:0:4136:e378:8000:63bf:f5ff:fffe")[1] == "10.0.0.1"
        assert teredo("2001:0:4136:e378:8000:63bf:f7f7:f7f7")[1] == "8.8.8.8"
        assert teredo("2001:0:a00:1:8000:63bf:f7f7:f7f7")[0] == "10.0.0.1"

    def test_blocked_is_os_error(self) -> None:
        """Blocked is an OSError, so aiohttp treats it as a connection failure."""
        assert issubclass(Blocked, OSError)


class TestHttpReason:
    """`_http_reason`: non-2xx statuses in words."""

    @pytest.mark.parametrize("status", [400, 404, 429, 500, 503])
    def test_status(self, status: int) -> None:
        """A non-redirect status reads exactly "HTTP <status>"."""
        assert _http_reason(status, {}) == f"HTTP {status}"

    def test_redirect_with_location(self) -> None:
        """A 302 names the Location and says it was not followed."""
        reason = _http_reason(302, {"Location": "https://elsewhere.example/hook"})
        assert reason.startswith("HTTP 302")
        assert "https://elsewhere.example/hook" in reason
        assert "not followed" in reason

    def test_redirect_header_case_insensitive(self) -> None:
        """With aiohttp's case-insensitive headers a lowercase location header is found."""
        headers = CIMultiDictProxy(CIMultiDict({"location": "https://x.example/"}))
        reason = _http_reason(301, headers)
        assert reason.startswith("HTTP 301")
        assert "https://x.example/" in reason

    def test_redirect_without_location(self) -> None:
        """A redirect without Location still says HTTP 30x and not followed."""
        reason = _http_reason(307, {})
        assert reason.startswith("HTTP 307")
        assert "not followed" in reason
