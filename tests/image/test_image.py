"""The container image, run from its own files: `make image-test` builds it and runs these.

There is no container runtime here, so the image's filesystem is mounted read-only
(`podman image mount`, like a read-only root filesystem in Kubernetes) with an empty
writable /tmp, and its commands run under chroot as the image's user, with the image's
environment, on this machine's network. Skipped unless OUTBOX_IMAGE names the image.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
import yaml

from tests.conftest import ROOT, as_sidecar_role, free_port, wait_until
from tests.receiver import Receiver

IMAGE = os.environ.get("OUTBOX_IMAGE", "")
SECRET = "image-test-secret-0123"

pytestmark = [
    pytest.mark.image,
    pytest.mark.skipif(
        not IMAGE, reason="OUTBOX_IMAGE names no image (`make image-test` builds one and sets it)"
    ),
]


def podman(*args: str) -> str:
    done = subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture(scope="module")
def inspected() -> dict[str, Any]:
    (data,) = json.loads(podman("image", "inspect", IMAGE))
    return dict(data)


class Process:
    """A long-running command inside the image, its output in a file."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text()

    def uid(self) -> str:
        """The real uid, once chroot has switched to the image's user."""
        status = (Path("/proc") / str(self.proc.pid) / "status").read_text()
        return next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))

    def stop(self) -> int:
        """SIGTERM, as a container runtime stops a container; the exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(60)
        finally:
            self._log.close()


@dataclass(frozen=True)
class Rootfs:
    """The image's files, read-only, and a host directory that is its /tmp."""

    path: Path
    tmp: Path
    user: str
    env: dict[str, str]
    entrypoint: list[str]
    cmd: list[str]

    def command(self, *argv: str) -> list[str]:
        chroot = shutil.which("chroot") or "/usr/sbin/chroot"
        return [chroot, f"--userspec={self.user}", str(self.path), *argv]

    def run(self, *argv: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(*argv), env=env, capture_output=True, text=True, timeout=120, check=False
        )

    def start(self, *argv: str, env: dict[str, str], log_path: Path) -> Process:
        return Process(self.command(*argv), env, log_path)


@pytest.fixture(scope="module")
def mounted(
    inspected: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Rootfs]:
    config = inspected["Config"]
    env = dict(kv.split("=", 1) for kv in config["Env"])
    path = Path(podman("image", "mount", IMAGE))
    tmp = tmp_path_factory.mktemp("image-tmp")
    tmp.chmod(0o1777)
    subprocess.run(["mount", "--bind", str(tmp), str(path / "tmp")], check=True)
    try:
        # A container runtime sets HOME from the user's passwd entry in the image.
        uid = config["User"].split(":")[0]
        passwd = (path / "etc/passwd").read_text().splitlines()
        homes = {f[2]: f[5] for f in (line.split(":") for line in passwd)}
        assert uid in homes, f"user {uid} has no passwd entry in the image"
        env["HOME"] = homes[uid]
        yield Rootfs(path, tmp, config["User"], env, config["Entrypoint"], config["Cmd"])
    finally:
        subprocess.run(["umount", str(path / "tmp")], check=False)
        podman("image", "unmount", IMAGE)


@pytest.fixture
def rootfs(mounted: Rootfs) -> Rootfs:
    """The mounted image with its /tmp emptied."""
    for child in mounted.tmp.iterdir():
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()
    return mounted


def healthcheck(inspected: dict[str, Any]) -> list[str]:
    """The image's HEALTHCHECK command, to run as the runtime would."""
    kind, *argv = inspected["Healthcheck"]["Test"]
    assert kind == "CMD"
    return list(argv)


def get(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


def api_listen(rootfs: Rootfs) -> tuple[str, int]:
    """The image's listen address on a free port: this machine's 8080 may be taken."""
    port = free_port()
    return f"{rootfs.env['OUTBOX_API_LISTEN'].rpartition(':')[0]}:{port}", port


class TestConfig:
    def test_runs_as_a_numeric_non_root_user(self, inspected: dict[str, Any]) -> None:
        """Kubernetes' runAsNonRoot can only check a numeric user."""
        uid, _, gid = inspected["Config"]["User"].partition(":")
        assert uid.isdigit() and int(uid) != 0
        assert gid.isdigit() and int(gid) != 0

    def test_entrypoint_command_and_port(self, inspected: dict[str, Any]) -> None:
        """`outbox run` by default, listening on every interface of the container."""
        config = inspected["Config"]
        assert config["Entrypoint"] == ["outbox"]
        assert config["Cmd"] == ["run"]
        assert "OUTBOX_API_LISTEN=0.0.0.0:8080" in config["Env"]
        assert "8080/tcp" in config["ExposedPorts"]

    def test_healthcheck_asks_healthz_in_exec_form(self, inspected: dict[str, Any]) -> None:
        """The check runs without a shell and asks /healthz."""
        argv = healthcheck(inspected)
        assert "/healthz" in " ".join(argv)


class TestRun:
    def test_migrate_deliver_health_and_stop(
        self,
        rootfs: Rootfs,
        inspected: dict[str, Any],
        empty_database_url: str,
        receiver: Receiver,
        ca_file: str,
        tmp_path: Path,
    ) -> None:
        """The image migrates a fresh database, delivers one signed event over HTTPS as its
        own user and a sidecar-only database role, answers /healthz and its HEALTHCHECK,
        writes nothing, exits 0 on SIGTERM."""
        shutil.copy(ca_file, rootfs.tmp / "ca.pem")
        (rootfs.tmp / "ca.pem").chmod(0o644)
        listen, port = api_listen(rootfs)
        env = dict(
            rootfs.env,
            OUTBOX_DATABASE_URL=empty_database_url,
            OUTBOX_CA_FILE="/tmp/ca.pem",
            OUTBOX_ALLOW_PRIVATE_TARGETS="true",
            OUTBOX_LOG_FORMAT="json",
            OUTBOX_API_LISTEN=listen,
        )

        def outbox(*args: str) -> str:
            done = rootfs.run(*rootfs.entrypoint, *args, env=env)
            assert done.returncode == 0, done.stderr
            return done.stdout.strip()

        outbox("migrate")
        outbox(
            "webhooks", "add", "--account", "acct_img", "--name", "image test",
            "--event", "lead.scored", "--url", receiver.url(), "--secret", SECRET,
        )  # fmt: skip

        # As in production: `outbox run` logged in with outbox_sidecar's rights only.
        run_env = env | {"OUTBOX_DATABASE_URL": as_sidecar_role(empty_database_url)}
        sidecar = rootfs.start(
            *rootfs.entrypoint, *rootfs.cmd, env=run_env, log_path=tmp_path / "sidecar.log"
        )
        try:
            uid = rootfs.user.split(":")[0]
            wait_until(
                lambda: sidecar.uid() == uid or sidecar.proc.poll() is not None,
                what="the sidecar to run as the image's user",
            )
            assert sidecar.uid() == uid, sidecar.log()

            outbox("emit", "acct_img", "lead.scored", '{"lead": {"id": 7}}')
            (got,) = receiver.wait_for(1, timeout=60)
            expected = hmac.new(SECRET.encode(), got.body, hashlib.sha256).hexdigest()
            assert got.headers["X-Webhook-Signature"] == f"sha256={expected}"
            assert json.loads(got.body)["data"] == {"lead": {"id": 7}}

            assert get(port, "/healthz") == 200
            # The settings page's files come from the installed package, not a checkout.
            assert get(port, "/static/webhooks.css") == 200

            check = rootfs.run(*healthcheck(inspected), env=run_env)
            assert check.returncode == 0, check.stderr
        finally:
            code = sidecar.stop()
        assert code == 0, sidecar.log()
        lines = [json.loads(line) for line in sidecar.log().splitlines() if line]
        assert not [line for line in lines if line.get("level") in ("error", "critical")]
        # Nothing but the root filesystem's own files was needed: /tmp is as it was given.
        assert [p.name for p in rootfs.tmp.iterdir()] == ["ca.pem"]

        # A check that cannot fail checks nothing: with the sidecar gone it fails.
        check = rootfs.run(*healthcheck(inspected), env=run_env)
        assert check.returncode != 0


class TestComposeDemo:
    """deploy/compose.yaml's services, each command and environment as the file says,
    run from this image's files; only the addresses differ (no compose network here)."""

    def test_demo_delivers_one_verified_event_per_setup(
        self, rootfs: Rootfs, empty_database_url: str, tmp_path: Path
    ) -> None:
        """certs, receiver, migrate, setup and the sidecar: each setup run emits an event
        the receiver verifies; the webhook is made once."""
        services = yaml.safe_load((ROOT / "deploy/compose.yaml").read_text())["services"]
        shutil.copytree(ROOT / "deploy/demo", rootfs.tmp / "demo")
        receiver_port = free_port()
        listen, _ = api_listen(rootfs)

        def here(value: str) -> str:
            """A compose value as it reads on this machine."""
            if value == "receiver":
                return "127.0.0.1"
            if value == "8443":
                return str(receiver_port)
            value = value.replace("receiver:8443", f"127.0.0.1:{receiver_port}")
            return value.replace("/demo/", "/tmp/demo/").replace("/certs", "/tmp/certs")

        def argv(name: str) -> list[str]:
            """What the service runs: the certs and receiver services' python image has no
            entrypoint; an entrypoint given in compose clears the image's command."""
            service = services[name]
            ours = "build" in service
            entrypoint = service.get("entrypoint", rootfs.entrypoint if ours else [])
            default = rootfs.cmd if ours and "entrypoint" not in service else []
            command = service.get("command", default)
            return [here(a) for a in [*entrypoint, *command]]

        def env(name: str) -> dict[str, str]:
            given = {k: here(str(v)) for k, v in services[name].get("environment", {}).items()}
            if "OUTBOX_DATABASE_URL" in given:
                given["OUTBOX_DATABASE_URL"] = empty_database_url
            return dict(rootfs.env, OUTBOX_API_LISTEN=listen, **given)

        def run(name: str) -> str:
            done = rootfs.run(*argv(name), env=env(name))
            assert done.returncode == 0, f"{name}: {done.stderr}"
            return done.stdout

        assert "made" in run("certs")
        receiver = rootfs.start(*argv("receiver"), env=env("receiver"), log_path=tmp_path / "r")
        sidecar = None
        try:
            wait_until(
                lambda: "receiving on" in receiver.log() or receiver.proc.poll() is not None,
                what="the demo receiver to listen",
            )
            assert receiver.proc.poll() is None, receiver.log()
            run("migrate")
            assert "made webhook" in run("setup")
            sidecar = rootfs.start(*argv("outbox"), env=env("outbox"), log_path=tmp_path / "s")

            def delivered() -> list[dict[str, Any]]:
                lines = receiver.log().splitlines()
                return [json.loads(line) for line in lines if line.startswith("{")]

            (first,) = wait_until(delivered, timeout=60, what="the demo delivery")
            assert first["signature_valid"] is True
            assert first["event"] == "lead.scored"

            assert "made webhook" not in run("setup")
            wait_until(lambda: len(delivered()) == 2, timeout=60, what="the second delivery")
            assert all(line["signature_valid"] for line in delivered())
        finally:
            receiver.stop()
            code = sidecar.stop() if sidecar is not None else None
        assert code == 0, sidecar.log()
