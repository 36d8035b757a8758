"""What `outbox listen` prints for a request, and how it checks signatures (pure)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from outbox import listen, signing, wire

BODY = wire.body("lead.scored", "2026-11-27T12:34:56.789Z", '{"lead": {"id": 42}}')


def signed(secret: str | None, previous: str | None = None) -> dict[str, str]:
    return wire.headers(
        message_id="1842",
        event="lead.scored",
        attempt=1,
        payload=BODY,
        secret=secret,
        now=1795782896,
        previous_secret=previous,
    )


class TestCheckSignatures:
    # Fixed ids: a random one would differ between pytest-xdist workers' collections.
    @pytest.mark.parametrize(
        "secret",
        [signing.generate_secret(), "a-secret-someone-typed"],
        ids=["generated-whsec", "typed"],
    )
    def test_both_signatures_verify_with_the_webhooks_secret(self, secret: str) -> None:
        """A whsec_ secret (key: its decoded bytes) and a typed one (its UTF-8) both verify."""
        line = listen.check_signatures(secret, signed(secret), BODY)
        assert line == "signature: verified (X-Webhook-Signature and webhook-signature)"

    def test_another_secret_fails_both(self) -> None:
        """Each signature that does not match is named."""
        line = listen.check_signatures("not-the-secret-000", signed("the-secret-0000000"), BODY)
        assert line.startswith("signature: NOT verified (")
        assert "X-Webhook-Signature does not match" in line
        assert "webhook-signature does not match" in line

    def test_a_changed_body_fails(self) -> None:
        """The signatures cover the raw body: one changed byte and they do not verify."""
        secret = "the-secret-0000000"
        line = listen.check_signatures(secret, signed(secret), BODY.replace(b"42", b"43"))
        assert "NOT verified" in line

    def test_an_unsigned_request(self) -> None:
        """A webhook without a secret sends no signatures: said plainly."""
        line = listen.check_signatures("the-secret-0000000", signed(None), BODY)
        assert line == (
            "signature: NOT verified (the request is unsigned: the webhook has no secret)"
        )

    def test_during_rotation_the_new_secret_verifies(self) -> None:
        """Two webhook-signature values (new, old): the new secret matches one of them."""
        new, old = "the-new-secret-000", "the-old-secret-000"
        headers = signed(new, previous=old)
        assert " " in headers["webhook-signature"]
        assert "signature: verified" in listen.check_signatures(new, headers, BODY)

    def test_header_names_in_any_case(self) -> None:
        """HTTP header names are case-insensitive."""
        secret = "the-secret-0000000"
        headers = {k.upper(): v for k, v in signed(secret).items()}
        assert "signature: verified" in listen.check_signatures(secret, headers, BODY)


class TestRender:
    def test_event_webhook_headers_pretty_body_and_check(self) -> None:
        """The event first, then the X-Webhook-*/webhook-* headers, the body indented, the check."""
        secret = "the-secret-0000000"
        text = listen.render("POST", "/webhooks", signed(secret), BODY, secret)
        lines = text.splitlines()
        assert lines[0] == "── lead.scored: POST /webhooks"
        assert "X-Webhook-Id: 1842" in lines and "webhook-timestamp: 1795782896" in lines
        assert not any(line.startswith(("User-Agent", "Content-Type")) for line in lines)
        assert '  "data": {' in lines and '      "id": 42' in lines
        assert lines[-1].startswith("signature: verified")

    def test_a_body_that_is_not_json_is_shown_as_text(self) -> None:
        """A body that is not JSON is printed as text, undecodable bytes replaced."""
        text = listen.render("POST", "/x", {}, b"plain \xff text", None)
        assert "── (no X-Webhook-Event): POST /x" in text
        assert "plain \ufffd text" in text
        assert "signature: not checked" in text

    def test_a_test_send_is_marked(self) -> None:
        """`webhooks test` and Send Test Payload are marked on the first line."""
        headers = signed(None) | {"X-Webhook-Test": "true"}
        assert "(test send)" in listen.render("POST", "/", headers, BODY, None).splitlines()[0]


class TestCertificates:
    @pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "0.0.0.0", "127.0.0.2", "::1"])
    def test_a_client_trusting_the_ca_file_accepts_the_server(
        self, tmp_path: Path, host: str
    ) -> None:
        """The CA file alone makes a verifying client trust the server's certificate."""
        now = dt.datetime.now(dt.UTC)
        issuer, ca_file = listen.ca(tmp_path, now)
        server = listen.server_context(issuer, host, now)
        client = ssl.create_default_context(cafile=str(ca_file))
        name = "127.0.0.1" if host == "0.0.0.0" else host
        ours, theirs = socket.socketpair()
        with ThreadPoolExecutor(1) as pool, ours, theirs:
            accepted = pool.submit(server.wrap_socket, theirs, server_side=True)
            with client.wrap_socket(ours, server_hostname=name) as tls:
                assert tls.version()
                accepted.result(timeout=10).close()

    @pytest.mark.parametrize("host", ["192.0.2.7", "example.com"])
    def test_the_ca_vouches_for_this_machine_only(self, tmp_path: Path, host: str) -> None:
        """The CA is name-constrained to localhost and loopback addresses: even a
        certificate its key signs for another name is refused by a verifying client."""
        now = dt.datetime.now(dt.UTC)
        issuer, ca_file = listen.ca(tmp_path, now)
        constraints = issuer.cert.extensions.get_extension_for_class(x509.NameConstraints)
        assert constraints.critical
        leaf = tmp_path / "leaf.pem"
        cert = ca_signed(issuer, host, now)
        leaf.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        store = ssl.create_default_context(cafile=str(ca_file))
        server = listen.server_context(issuer, "127.0.0.1", now)
        assert issuer.cert.not_valid_after_utc - now <= dt.timedelta(days=31)
        # The listener's own certificate never names another host...
        ours, theirs = socket.socketpair()
        with ThreadPoolExecutor(1) as pool, ours, theirs:
            pool.submit(server.wrap_socket, theirs, server_side=True)
            with pytest.raises(ssl.SSLCertVerificationError):
                store.wrap_socket(ours, server_hostname=host)
        # ... and one forged with the CA's key for it is outside the CA's names.
        forged = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        key_file = tmp_path / "leaf-key.pem"
        key_file.write_bytes(
            cert_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        forged.load_cert_chain(leaf, key_file)
        ours, theirs = socket.socketpair()
        with ThreadPoolExecutor(1) as pool, ours, theirs:
            pool.submit(forged.wrap_socket, theirs, server_side=True)
            with pytest.raises(ssl.SSLCertVerificationError, match=r"name constraint|permitted"):
                store.wrap_socket(ours, server_hostname=host)

    def test_the_ca_is_reused_and_renewed_near_its_end(self, tmp_path: Path) -> None:
        """The kept CA lives 30 days and is used again until 7 days before it ends."""
        now = dt.datetime.now(dt.UTC)
        first, _ = listen.ca(tmp_path, now)
        again, _ = listen.ca(tmp_path, now + dt.timedelta(days=22))
        assert again.cert == first.cert
        renewed, _ = listen.ca(tmp_path, now + dt.timedelta(days=24))
        assert renewed.cert != first.cert

    def test_a_kept_ca_without_name_constraints_is_replaced(self, tmp_path: Path) -> None:
        """One made by an older outbox (good for any name) is not used again."""
        now = dt.datetime.now(dt.UTC)
        first, ca_file = listen.ca(tmp_path, now)
        unconstrained = (
            x509.CertificateBuilder()
            .subject_name(first.cert.subject)
            .issuer_name(first.cert.subject)
            .public_key(first.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(first.key.public_key()), critical=False
            )
            .sign(first.key, hashes.SHA256())
        )
        ca_file.write_bytes(unconstrained.public_bytes(serialization.Encoding.PEM))
        replaced, _ = listen.ca(tmp_path, now)
        assert replaced.cert != unconstrained
        replaced.cert.extensions.get_extension_for_class(x509.NameConstraints)


cert_key = ec.generate_private_key(ec.SECP256R1())


def ca_signed(issuer: Any, host: str, now: dt.datetime) -> x509.Certificate:
    """A server certificate for ``host`` signed with the CA's own key."""
    try:
        name: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        name = x509.DNSName(host)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(issuer.cert.subject)
        .public_key(cert_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([name]), critical=False)
        .sign(issuer.key, hashes.SHA256())
    )
