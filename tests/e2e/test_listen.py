"""`outbox listen` as a newcomer uses it: a real receiver process, a real `outbox run`
configured with exactly what the receiver printed, and a real delivery between them."""

from __future__ import annotations

import re
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from outbox import signing
from tests.conftest import ROOT, SQL, Sidecar, call_outbox, free_port, wait_until


class Listener:
    """A running `outbox listen`; its output goes to a file read while it runs."""

    def __init__(self, args: list[str], home: Path, log: Path) -> None:
        self.log_path = log
        self.port = int(args[args.index("--port") + 1]) if "--port" in args else 9443
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "outbox", "listen", *args],
            cwd=ROOT,
            env={"PATH": "/usr/bin:/bin", "HOME": str(home), "XDG_CACHE_HOME": str(home)},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_until(
            lambda: "Ctrl-C stops" in self.output() or self.proc.poll() is not None,
            what="outbox listen to start",
        )
        assert self.proc.poll() is None, self.output()

    def output(self) -> str:
        return self.log_path.read_text()

    def exports(self) -> dict[str, str]:
        """The `export NAME=VALUE` lines, as a shell would read them."""
        found = re.findall(r"^\s*export (\w+)=(.*)$", self.output(), re.MULTILINE)
        return {name: shlex.split(value)[0] for name, value in found}

    def add_command(self) -> list[str]:
        """The printed `webhooks add` command, continuation lines joined."""
        text = self.output().replace("\\\n", " ")
        (line,) = [x for x in text.splitlines() if " webhooks add " in x]
        words = shlex.split(line)
        return words[words.index("webhooks") :]

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(30)
        self._log.close()
        return code


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Callable[..., Listener]]:
    started: list[Listener] = []

    def start(*args: str) -> Listener:
        args = ("--port", str(free_port()), *args) if "--port" not in args else args
        n = len(started)
        started.append(Listener(list(args), tmp_path / "home", tmp_path / f"listen{n}.log"))
        return started[-1]

    yield start
    for one in started:
        if one.proc.poll() is None:
            one.proc.kill()
            one.stop()


def deliver(
    listen: Listener, sql: SQL, sidecars: Callable[..., Sidecar], database_url: str
) -> None:
    """Set up a sidecar and a webhook exactly as `outbox listen` said, and emit an event."""
    exports = listen.exports()
    assert set(exports) == {"OUTBOX_CA_FILE", "OUTBOX_ALLOW_PRIVATE_TARGETS"}
    sidecar = sidecars(**exports)
    added = call_outbox(sidecar.env, *listen.add_command())
    assert added.returncode == 0, added.stderr
    sql.emit(data={"lead": {"id": 42, "name": "Ada"}, "score": {"overall": 87}})


SECRETS = [signing.generate_secret(), "a-secret-someone-typed"]


class TestFirstDelivery:
    @pytest.mark.parametrize("secret", SECRETS, ids=["whsec", "typed"])
    def test_arrives_and_verifies(  # type: ignore[no-untyped-def]
        self, listener, sql: SQL, sidecars, database_url: str, secret: str
    ) -> None:
        """With what listen printed, `outbox run` delivers to it and both signatures verify."""
        listen = listener("--secret", secret)
        deliver(listen, sql, sidecars, database_url)
        out = wait_until(
            lambda: "signature:" in listen.output() and listen.output(), what="a delivery"
        )
        assert "signature: verified" in out
        assert "── lead.scored: POST /webhooks" in out
        assert "X-Webhook-Event: lead.scored" in out and "webhook-signature: v1," in out
        assert '"name": "Ada"' in out and '  "event": "lead.scored",' in out
        wait_until(
            lambda: (
                sql("SELECT status, last_response_status FROM outbox.deliveries")
                == [("succeeded", 200)]
            ),
            what="the delivery recorded as a success",
        )
        assert listen.stop() == 0

    def test_a_wrong_secret_is_reported(  # type: ignore[no-untyped-def]
        self, listener, sql: SQL, sidecars, database_url: str
    ) -> None:
        """A receiver started with another secret than the webhook's says NOT verified."""
        listen = listener("--secret", "the-receivers-own-secret")
        exports = listen.exports()
        sidecars(**exports)
        port = listen.port
        sql.webhook(f"https://127.0.0.1:{port}/webhooks", secret="the-webhooks-secret-123")
        sql.emit()
        out = wait_until(
            lambda: "signature:" in listen.output() and listen.output(), what="a delivery"
        )
        assert "signature: NOT verified" in out
        assert "X-Webhook-Signature does not match --secret" in out
        assert "webhook-signature does not match --secret" in out

    def test_without_a_secret_nothing_is_checked(  # type: ignore[no-untyped-def]
        self, listener, sql: SQL, sidecars, database_url: str
    ) -> None:
        """No --secret: the printed webhook has none, and the delivery says so."""
        listen = listener()
        assert "--secret" not in listen.add_command()
        deliver(listen, sql, sidecars, database_url)
        out = wait_until(
            lambda: "signature:" in listen.output() and listen.output(), what="a delivery"
        )
        assert "signature: not checked" in out


class TestProcess:
    @pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
    def test_a_signal_ends_it_cleanly(self, listener, sig: int) -> None:  # type: ignore[no-untyped-def]
        """Ctrl-C or SIGTERM: exit 0, no traceback."""
        listen = listener()
        assert listen.stop(sig) == 0
        assert "Traceback" not in listen.output()

    def test_the_ca_is_kept_between_runs(self, listener) -> None:  # type: ignore[no-untyped-def]
        """A second run prints the same CA file, unchanged, so a sidecar set up for the
        first one reaches the second without a restart."""
        first = listener()
        ca_file = first.exports()["OUTBOX_CA_FILE"]
        pem = Path(ca_file).read_bytes()
        assert first.stop() == 0
        second = listener()
        assert second.exports()["OUTBOX_CA_FILE"] == ca_file
        assert Path(ca_file).read_bytes() == pem
        assert (Path(ca_file).parent / "ca-key.pem").stat().st_mode & 0o077 == 0


def listen_once(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "outbox", "listen", *args],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "HOME": str(home), "XDG_CACHE_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class TestBadInput:
    # The last is 9443 in full-width digits, which str.isdigit() accepts.
    @pytest.mark.parametrize("port", ["0", "65536", "-1", "http", "\uff19\uff14\uff14\uff13"])
    def test_a_port_out_of_range(self, tmp_path: Path, port: str) -> None:
        """A port that is not 1-65535: one line naming it, exit 2."""
        result = listen_once("--port", port, home=tmp_path)
        assert result.returncode == 2
        assert result.stdout == ""
        (line,) = result.stderr.splitlines()
        assert "port" in line and "1-65535" in line

    def test_a_port_in_use(self, tmp_path: Path) -> None:
        """A port something else listens on: one line saying so, exit 2."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            result = listen_once("--port", str(port), home=tmp_path)
        assert result.returncode == 2, result.stdout
        assert result.stdout == ""
        (line,) = result.stderr.splitlines()
        assert f"127.0.0.1:{port}" in line and "in use" in line
