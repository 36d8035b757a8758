"""The container image, run from its own files: `make image-test` builds it and runs these.

There is no container runtime here, so the image's filesystem is mounted read-only
(`podman image mount`, as a read-only root filesystem in Kubernetes) with an empty
writable /tmp, and its entrypoint runs under chroot as the image's user, with the
image's environment, on this machine's network. Skipped unless OUTBOX_IMAGE names the
image.
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
from typing import Any

import pytest

from tests.conftest import free_port, wait_until
from tests.receiver import Receiver

IMAGE = os.environ.get("OUTBOX_IMAGE", "")
SECRET = "image-test-secret-0123"

pytestmark = pytest.mark.skipif(
    not IMAGE, reason="OUTBOX_IMAGE names no image (`make image-test` builds one and sets it)"
)


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


@dataclass(frozen=True)
class Rootfs:
    """The image's files, and a host directory that is its /tmp."""

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


@pytest.fixture(scope="module")
def rootfs(inspected: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rootfs]:
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
        test = inspected["Healthcheck"]["Test"]
        assert test[0] == "CMD"
        assert "/healthz" in " ".join(test)


class TestRun:
    def test_migrate_deliver_health_and_stop(
        self,
        rootfs: Rootfs,
        inspected: dict[str, Any],
        empty_database_url: str,
        receiver: Receiver,
        ca_file: str,
    ) -> None:
        """The image migrates a fresh database, delivers one signed event over HTTPS,
        answers /healthz and its own HEALTHCHECK, and exits 0 on SIGTERM."""
        shutil.copy(ca_file, rootfs.tmp / "ca.pem")
        (rootfs.tmp / "ca.pem").chmod(0o644)
        listen_host = rootfs.env["OUTBOX_API_LISTEN"].rpartition(":")[0]
        port = free_port()
        env = dict(
            rootfs.env,
            OUTBOX_DATABASE_URL=empty_database_url,
            OUTBOX_CA_FILE="/tmp/ca.pem",
            OUTBOX_ALLOW_PRIVATE_TARGETS="true",
            OUTBOX_LOG_FORMAT="json",
            OUTBOX_API_LISTEN=f"{listen_host}:{port}",
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

        log_path = rootfs.tmp.parent / "sidecar.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                rootfs.command(*rootfs.entrypoint, *rootfs.cmd),
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            uid = rootfs.user.split(":")[0]
            wait_until(
                lambda: (
                    f"Uid:\t{uid}\t" in (Path("/proc") / str(proc.pid) / "status").read_text()
                    or proc.poll() is not None
                ),
                what="the sidecar to run as the image's user",
            )
            status = (Path("/proc") / str(proc.pid) / "status").read_text()
            assert f"Uid:\t{uid}\t" in status, log_path.read_text()

            outbox("emit", "acct_img", "lead.scored", '{"lead": {"id": 7}}')
            (got,) = receiver.wait_for(1, timeout=60)
            expected = hmac.new(SECRET.encode(), got.body, hashlib.sha256).hexdigest()
            assert got.headers["X-Webhook-Signature"] == f"sha256={expected}"
            assert json.loads(got.body)["data"] == {"lead": {"id": 7}}

            assert get(port, "/healthz") == 200
            # The settings page's files come from the installed package, not a checkout.
            assert get(port, "/static/webhooks.css") == 200

            check = rootfs.run(*healthcheck(inspected), env=env)
            assert check.returncode == 0, check.stderr
        finally:
            proc.terminate()
            code = proc.wait(60)
        assert code == 0, log_path.read_text()
        lines = [json.loads(line) for line in log_path.read_text().splitlines() if line]
        assert not [line for line in lines if line.get("level") in ("error", "critical")]

        # A check that cannot fail checks nothing: with the sidecar gone it fails.
        check = rootfs.run(*healthcheck(inspected), env=env)
        assert check.returncode != 0


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
