"""`outbox listen`: an HTTPS receiver on this machine, for trying outbox out.

A first delivery to a laptop meets three guards that protect production: webhook URLs
must be https://, the sidecar refuses private addresses, and it trusts only known
certificate authorities. This receiver serves HTTPS with a certificate from a small CA
of its own, writes that CA to a file, and prints the two settings that let a sidecar
reach it. The CA is kept (in the user's cache directory) so those settings stay true
from one run to the next; the server's certificate is made afresh on every start.

Each request is printed as it arrives, with its signatures checked against ``--secret``
the way a receiver would check them (outbox.signing).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import errno
import fcntl
import hmac
import ipaddress
import json
import os
import shlex
import signal
import ssl
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from outbox import signing

__all__ = ["PATH", "CannotListen", "check_signatures", "render", "serve", "state_dir"]

PATH = "/webhooks"

# Long enough for an afternoon of trying things out, renewed by itself, and short
# enough that a forgotten CA file does not stay trusted for long.
_CA_DAYS = 30
# A CA this close to its end is replaced rather than reused.
_CA_RENEW_DAYS = 7
_LEAF_DAYS = 7
# The only names the CA may vouch for, whatever a leaked key signs: this machine.
_PERMITTED: list[x509.GeneralName] = [
    x509.DNSName("localhost"),
    x509.IPAddress(ipaddress.ip_network("127.0.0.0/8")),
    x509.IPAddress(ipaddress.ip_network("::1/128")),
]


class CannotListen(Exception):
    """The receiver cannot start; the message says why, in one line."""


def state_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where the CA lives: ``$XDG_CACHE_HOME/outbox/listen``, else ``~/.cache/...``."""
    env = os.environ if env is None else env
    cache = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "outbox" / "listen"


@dataclass(frozen=True)
class _Issuer:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _new_ca(now: dt.datetime) -> _Issuer:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name("outbox listen: local testing CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=_CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(
            x509.NameConstraints(permitted_subtrees=_PERMITTED, excluded_subtrees=None),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _Issuer(cert, key)


def _load_ca(directory: Path, now: dt.datetime) -> _Issuer | None:
    try:
        cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key(
            (directory / "ca-key.pem").read_bytes(), password=None
        )
    except (OSError, ValueError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        return None
    if cert.not_valid_after_utc - now < dt.timedelta(days=_CA_RENEW_DAYS):
        return None
    try:
        cert.extensions.get_extension_for_class(x509.NameConstraints)
    except x509.ExtensionNotFound:
        # Made by an older outbox, good for any name: replaced.
        return None
    return _Issuer(cert, key)


def _write(path: Path, data: bytes) -> None:
    # Written beside and renamed, so a reader never sees half a file; 0600 for the key.
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp.replace(path)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    # Two receivers started at once must end up trusting the same CA.
    with open(directory / "lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def ca(directory: Path, now: dt.datetime) -> tuple[_Issuer, Path]:
    """The kept CA, made (or renewed) when there is none usable; and its PEM file."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    with _locked(directory):
        issuer = _load_ca(directory, now)
        if issuer is None:
            issuer = _new_ca(now)
            key_pem = issuer.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            _write(directory / "ca-key.pem", key_pem)
            _write(directory / "ca.pem", issuer.cert.public_bytes(serialization.Encoding.PEM))
            (directory / "ca.pem").chmod(0o644)
    return issuer, directory / "ca.pem"


def _san(host: str) -> list[x509.GeneralName]:
    """This machine's names; ``host`` too when it is a loopback address (the CA may
    vouch for nothing else)."""
    names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return names
    extra = x509.IPAddress(address)
    return [*names, extra] if address.is_loopback and extra not in names else names


def server_context(issuer: _Issuer, host: str, now: dt.datetime) -> ssl.SSLContext:
    """A TLS server context with a fresh certificate for ``host`` signed by ``issuer``."""
    key = ec.generate_private_key(ec.SECP256R1())
    ca_ski = issuer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("outbox listen"))
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=_LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(_san(host)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(issuer.key, hashes.SHA256())
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    # The ssl module loads keys only from files: a private directory, gone once loaded.
    with tempfile.TemporaryDirectory() as tmp:
        chain, key_file = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        _write(chain, cert.public_bytes(serialization.Encoding.PEM))
        _write(
            key_file,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        context.load_cert_chain(chain, key_file)
    return context


def check_signatures(secret: str, headers: Mapping[str, str], body: bytes) -> str:
    """One line saying whether the request's signatures were made with ``secret``.

    Both signatures must verify: ``X-Webhook-Signature`` (keyed with the secret's UTF-8
    bytes) and the Standard Webhooks ``webhook-signature`` (keyed as signing.standard_key
    derives it, over ``id.timestamp.body``; any one of its space-separated values).
    """
    lower = {k.lower(): v for k, v in headers.items()}
    product = lower.get("x-webhook-signature")
    standard = lower.get("webhook-signature")
    if product is None and standard is None:
        return "signature: NOT verified (the request is unsigned: the webhook has no secret)"
    problems = []
    if product is None:
        problems.append("no X-Webhook-Signature")
    elif not signing.verify(secret, body, product):
        problems.append("X-Webhook-Signature does not match --secret")
    msg_id, timestamp = lower.get("webhook-id", ""), lower.get("webhook-timestamp", "")
    if standard is None:
        problems.append("no webhook-signature")
    elif not timestamp.isascii() or not timestamp.isdigit():
        problems.append("webhook-timestamp is not a number")
    else:
        expected = signing.standard_signature(secret, msg_id, int(timestamp), body)
        if not any(hmac.compare_digest(expected, value) for value in standard.split()):
            problems.append("webhook-signature does not match --secret")
    if problems:
        return "signature: NOT verified (" + "; ".join(problems) + ")"
    return "signature: verified (X-Webhook-Signature and webhook-signature)"


def _shown(name: str) -> bool:
    lower = name.lower()
    return lower.startswith(("x-webhook-", "webhook-"))


def render(
    method: str, path: str, headers: Mapping[str, str], body: bytes, secret: str | None
) -> str:
    """What the receiver prints for one request: headers, body, signature check."""
    lower = {k.lower(): v for k, v in headers.items()}
    event = lower.get("x-webhook-event", "(no X-Webhook-Event)")
    test = "  (test send)" if lower.get("x-webhook-test") == "true" else ""
    lines = [f"── {event}{test}: {method} {path}"]
    lines += [f"{name}: {value}" for name, value in headers.items() if _shown(name)]
    try:
        text = json.dumps(json.loads(body), indent=2, ensure_ascii=False)
    except ValueError:
        text = body.decode("utf-8", errors="replace")
    lines.append(text)
    if secret is None:
        lines.append("signature: not checked (start outbox listen with --secret to check it)")
    else:
        lines.append(check_signatures(secret, headers, body))
    return "\n".join(lines) + "\n"


def _url(host: str, port: int) -> str:
    # A wildcard address is not one to send to; this machine's loopback is.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"https://[{host}]:{port}{PATH}" if ":" in host else f"https://{host}:{port}{PATH}"


def command() -> str:
    """How this process was started, to print commands that paste into another shell:
    ``.venv/bin/outbox`` as typed, or the interpreter with ``-m outbox``."""
    program = sys.argv[0]
    if Path(program).name == "outbox":
        return shlex.quote(program)
    return f"{shlex.quote(sys.executable)} -m outbox"


def instructions(url: str, ca_file: Path, secret: str | None, outbox: str = "outbox") -> str:
    """The settings a sidecar needs to reach this receiver, ready to paste."""
    add = (
        f"  {outbox} webhooks add --account acct_1 --name 'outbox listen' --event lead.scored \\\n"
        f"      --url {url}"
    )
    if secret is not None:
        add += f" --secret {shlex.quote(secret)}"
    checked = (
        "signatures are checked with --secret"
        if secret is not None
        else "signatures are not checked (no --secret)"
    )
    return (
        f"outbox listen: receiving webhooks at {url} ({checked})\n"
        "\n"
        "For `outbox run` (or `make run`) to reach it, start it after these two lines:\n"
        f"  export OUTBOX_CA_FILE={shlex.quote(str(ca_file))}\n"
        "  export OUTBOX_ALLOW_PRIVATE_TARGETS=true\n"
        "Register this receiver as a webhook:\n"
        f"{add}\n"
        "\n"
        "Waiting for deliveries; Ctrl-C stops.\n"
    )


def _print(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


async def serve(host: str, port: int, secret: str | None, directory: Path | None = None) -> None:
    """Receive and print webhooks on ``host:port`` until SIGINT or SIGTERM."""
    now = dt.datetime.now(dt.UTC)
    directory = directory or state_dir()
    try:
        issuer, ca_file = ca(directory, now)
    except OSError as exc:
        raise CannotListen(f"cannot keep the CA in {directory}: {exc.strerror or exc}") from None
    context = server_context(issuer, host, now)
    stop = asyncio.Event()

    async def receive(request: web.Request) -> web.Response:
        if request.method != "POST":
            return web.Response(text=f"outbox listen: POST webhooks to {_url(host, port)}\n")
        body = await request.read()
        try:
            _print(render(request.method, request.path_qs, request.headers, body, secret))
        except BrokenPipeError:
            # Whoever read the output has gone (`| head`): nothing left to do.
            stop.set()
        return web.Response(text="ok\n")

    app = web.Application(client_max_size=2**20)
    app.router.add_route("*", "/{tail:.*}", receive)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, host, port, ssl_context=context).start()
        except OSError as exc:
            # asyncio wraps the bind error in a long message; its errno says it plainly.
            if exc.errno is not None and exc.errno > 0:
                reason = os.strerror(exc.errno).lower()
            else:
                reason = (exc.strerror or str(exc)).lower()
            if exc.errno == errno.EADDRINUSE:
                reason += " (choose another --port)"
            raise CannotListen(f"cannot listen on {host}:{port}: {reason}") from None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        _print(instructions(_url(host, port), ca_file, secret, command()))
        await stop.wait()
    finally:
        await runner.cleanup()
