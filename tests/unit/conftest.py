"""Unit tests are pure: no database, no subprocess, no network.

Each test here runs with those doors shut, so a test that needs one fails at once and
belongs in tests/db, tests/e2e or tests/tools instead. A socket pair (two ends in this
process) is not the network and stays allowed.
"""

from __future__ import annotations

import socket
import subprocess
from typing import Any, NoReturn

import psycopg
import pytest


def _refuse(what: str) -> Any:
    def refused(*args: Any, **kwargs: Any) -> NoReturn:
        raise AssertionError(f"a unit test may not use {what}: move it out of tests/unit")

    return refused


@pytest.fixture(autouse=True)
def pure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket.socket, "connect", _refuse("the network"))
    monkeypatch.setattr(socket.socket, "connect_ex", _refuse("the network"))
    monkeypatch.setattr(socket, "getaddrinfo", _refuse("name lookups"))
    monkeypatch.setattr(subprocess.Popen, "__init__", _refuse("a subprocess"))
    monkeypatch.setattr(psycopg, "connect", _refuse("a database"))
    monkeypatch.setattr(psycopg.Connection, "connect", _refuse("a database"))
    monkeypatch.setattr(psycopg.AsyncConnection, "connect", _refuse("a database"))
