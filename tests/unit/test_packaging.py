"""The wheel carries what the sidecar reads at run time."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from outbox import db
from tests.conftest import ROOT


def test_wheel_ships_the_sql_files(tmp_path: Path) -> None:
    """Every .sql file under sql/ is inside the wheel, where outbox.db looks for it."""
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
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"outbox/sql/{p.relative_to(ROOT / 'sql')}" for p in (ROOT / "sql").rglob("*.sql")}
    assert expected and expected <= names
    assert {"outbox/sql/schema.sql", "outbox/sql/queries.sql"} <= names
    assert (db.SQL_DIR / "queries.sql").is_file()
