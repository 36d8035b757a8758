"""`make run` as a newcomer types it: the hints it prints fit the settings it runs with."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port, sidecar_environment, wait_until


def make_run_hints(env: dict[str, str], log: Path) -> str:
    """What `make run` prints before the sidecar takes over; the sidecar is then stopped."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["make", "--no-print-directory", "-C", str(ROOT), "run"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_until(
                lambda: "Stop with Ctrl-C." in log.read_text() or proc.poll() is not None,
                timeout=120,
                what="make run's hints",
            )
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
    return log.read_text()


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_curl_hint_uses_the_admin_address(
    database_url: str, ca_file: str, tmp_path: Path, host: str
) -> None:
    """The curl line points at OUTBOX_API_LISTEN's port (loopback for a wildcard host)."""
    port = free_port()
    env = sidecar_environment(database_url, ca_file, OUTBOX_API_LISTEN=f"{host}:{port}")
    hints = make_run_hints(env, tmp_path / "make.log")
    assert f"curl http://127.0.0.1:{port}/healthz" in hints
    assert ":8080" not in hints


def test_says_when_the_admin_api_is_off(database_url: str, ca_file: str, tmp_path: Path) -> None:
    """With OUTBOX_API_LISTEN=off there is no curl line, and the hints say why."""
    env = sidecar_environment(database_url, ca_file, OUTBOX_API_LISTEN="off")
    hints = make_run_hints(env, tmp_path / "make.log")
    assert "Stop with Ctrl-C." in hints
    assert "curl http" not in hints
    assert "the admin API is off: OUTBOX_API_LISTEN=off" in hints
