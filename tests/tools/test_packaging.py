"""The wheel carries what the sidecar reads at run time, and nothing of development."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest

from outbox import db
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """The names of the files in a wheel built from this checkout (offline)."""
    tmp_path = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("outbox-*.whl")
    return set(zipfile.ZipFile(wheel).namelist())


def test_wheel_ships_the_sql_files(wheel_names: set[str]) -> None:
    """Every .sql file under sql/ is inside the wheel, where outbox.db looks for it."""
    names = wheel_names
    expected = {f"outbox/sql/{p.relative_to(ROOT / 'sql')}" for p in (ROOT / "sql").rglob("*.sql")}
    assert expected and expected <= names
    assert {"outbox/sql/schema.sql", "outbox/sql/queries.sql"} <= names
    assert (db.SQL_DIR / "queries.sql").is_file()


def test_wheel_ships_no_development_tool(wheel_names: set[str]) -> None:
    """The development Postgres (tools/localpg.py) and the rest of tools/ stay out: the
    wheel holds the outbox package and its metadata alone."""
    assert not any("localpg" in name for name in wheel_names)
    assert {name.split("/")[0] for name in wheel_names} == {"outbox", _dist_info(wheel_names)}


def _dist_info(names: set[str]) -> str:
    (dist_info,) = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
    return dist_info
