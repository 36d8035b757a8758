from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tools import localpg


def test_url_quotes_names() -> None:
    srv = localpg.Server("127.0.0.1", 5433, "postgres")
    assert srv.url("outbox") == "postgresql://postgres@127.0.0.1:5433/outbox"
    assert srv.url("a b/c") == "postgresql://postgres@127.0.0.1:5433/a%20b%2Fc"


@pytest.fixture
def private_datadir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    # Not pytest's tmp_path: its /tmp/pytest-of-root parent is 0700, and when
    # the suite runs as root the cluster runs as `postgres`, which must be able
    # to reach its data directory.
    base = Path(tempfile.mkdtemp(prefix="outbox-localpg-", dir="/tmp"))
    base.chmod(0o755)
    datadir = base / "pgdata"
    monkeypatch.setenv("OUTBOX_LOCALPG_DIR", str(datadir))
    try:
        yield datadir
    finally:
        try:
            localpg.stop_private(datadir)
        finally:
            shutil.rmtree(base, ignore_errors=True)


def test_private_cluster_starts_is_reused_and_stops(private_datadir: Path) -> None:
    try:
        srv = localpg.server(force_private=True)
    except localpg.LocalPgError as exc:
        if "no PostgreSQL binaries found" in str(exc):
            pytest.skip(str(exc))
        raise

    assert (srv.host, srv.user) == ("127.0.0.1", "postgres")
    assert srv.port != 5432
    assert (private_datadir / "outbox-port").read_text().strip() == str(srv.port)
    if os.geteuid() == 0:
        assert private_datadir.stat().st_uid != 0

    url = localpg.ensure_database(srv, "localpg_test")
    assert url == srv.url("localpg_test")
    # A second call finds the database and must not fail.
    assert localpg.ensure_database(srv, "localpg_test") == url
    with psycopg.connect(url, connect_timeout=5) as conn:
        row = conn.execute("SELECT current_database(), current_setting('fsync')").fetchone()
    assert row == ("localpg_test", "on")

    # The running cluster is reused, not started again.
    assert localpg.server(force_private=True) == srv

    localpg.stop_private(private_datadir)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=2).close()

    # And it comes back on the port it had.
    assert localpg.server(force_private=True) == srv
