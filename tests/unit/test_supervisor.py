"""The supervisor of the sidecar's parts, and the schema fence's verdicts (no database)."""

from __future__ import annotations

import psycopg
import pytest

from outbox import db
from outbox.supervisor import EXIT_FAILED, EXIT_SCHEMA, InjectedFault, Supervisor, parse_faults


class Clock:
    """Seconds that pass only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TestLiveness:
    async def test_a_part_that_must_beat_is_alive_only_while_it_does(self) -> None:
        clock = Clock()
        async with Supervisor(give_up_after=60, clock=clock) as parts:
            parts.start("loop", lambda: parts.stopping.wait(), beat_within=30)
            assert parts.alive()
            clock.now += 31
            assert not parts.alive()
            parts.beat("loop")
            assert parts.alive()

    async def test_a_part_that_has_finished_no_longer_needs_to_beat(self) -> None:
        clock = Clock()

        async def done() -> None:
            return None

        async with Supervisor(give_up_after=60, clock=clock) as parts:
            await parts.start("loop", done, beat_within=30)
            clock.now += 31
            assert parts.alive()

    async def test_two_parts_may_not_share_a_name(self) -> None:
        """Beats go by name: a second part named like the first would keep the first
        one alive by its own beats however stuck it is, and escape the stop."""
        async with Supervisor(give_up_after=60) as parts:
            parts.start("loop", lambda: parts.stopping.wait(), beat_within=30)
            with pytest.raises(ValueError, match="a part named 'loop' was already started"):
                parts.start("loop", lambda: parts.stopping.wait())
            parts.stop()

    async def test_stopping_for_a_failure_is_not_alive_and_the_first_code_wins(self) -> None:
        parts = Supervisor(give_up_after=60)
        parts.stop(0)
        assert parts.alive() and parts.stopping.is_set()
        parts.stop(EXIT_FAILED)
        parts.stop(EXIT_SCHEMA)
        assert not parts.alive() and parts.exit_code == EXIT_FAILED

    async def test_stopping_for_a_newer_schema_is_alive(self) -> None:
        """It finishes what is in flight, then exits or waits for its schema: a probe
        failing meanwhile would only have it restarted on the same version."""
        parts = Supervisor(give_up_after=60)
        parts.stop(EXIT_SCHEMA)
        assert parts.alive() and parts.stopping.is_set() and parts.exit_code == EXIT_SCHEMA


class TestRestarts:
    async def test_a_failed_part_is_started_again(self) -> None:
        """Two failures, then it works: the sidecar goes on, exit status 0."""
        runs = []

        async def flaky() -> None:
            runs.append(1)
            if len(runs) <= 2:
                raise ValueError("broken")

        async with Supervisor(give_up_after=60) as parts:
            await parts.start("flaky", flaky)
        assert len(runs) == 3
        assert parts.exit_code == 0 and not parts.stopping.is_set()

    async def test_a_part_failing_without_progress_for_too_long_stops_the_sidecar(self) -> None:
        clock = Clock()
        runs = []

        async def broken() -> None:
            runs.append(1)
            clock.now += 10
            raise ValueError("broken")

        async with Supervisor(give_up_after=25, clock=clock) as parts:
            await parts.start("broken", broken)
        assert len(runs) == 3  # failing since the first start: 10, 20, then 30 s
        assert parts.exit_code == EXIT_FAILED and parts.stopping.is_set()

    async def test_progress_between_failures_starts_the_count_again(self) -> None:
        clock = Clock()
        runs = []

        async def beats_then_fails() -> None:
            runs.append(1)
            parts.beat("part")
            clock.now += 20
            if len(runs) < 5:
                raise ValueError("broken")

        async with Supervisor(give_up_after=25, clock=clock) as parts:
            await parts.start("part", beats_then_fails)
        assert len(runs) == 5 and parts.exit_code == 0

    async def test_a_lost_connection_is_waited_out_however_long(self) -> None:
        clock = Clock()
        runs = []

        async def offline() -> None:
            runs.append(1)
            clock.now += 100
            if len(runs) < 4:
                raise psycopg.OperationalError("connection refused")

        async with Supervisor(give_up_after=25, clock=clock) as parts:
            await parts.start("part", offline)
        assert len(runs) == 4 and parts.exit_code == 0

    async def test_injected_faults_fail_the_first_starts_only(self) -> None:
        runs = []

        async def part() -> None:
            runs.append(1)

        async with Supervisor(give_up_after=60, faults={"part": 2}) as parts:
            await parts.start("part", part)
            await parts.start("other", part)
        assert len(runs) == 2


class TestFaults:
    def test_parses_part_equals_count(self) -> None:
        assert parse_faults("") == {}
        assert parse_faults("listen=2, doorbell=1") == {"listen": 2, "doorbell": 1}

    @pytest.mark.parametrize("raw", ["listen", "listen=", "=2", "listen=two", "listen=-1"])
    def test_refuses_anything_else_naming_it(self, raw: str) -> None:
        with pytest.raises(ValueError, match="is not PART=COUNT"):
            parse_faults(raw)

    def test_the_fault_is_an_error_of_its_own(self) -> None:
        assert not issubclass(InjectedFault, psycopg.Error)


class TestSchemaProblem:
    def test_the_expected_version_is_the_newest_migration(self) -> None:
        assert db.expected_version() == max(version for version, _, _ in db.migrations())

    def test_the_same_version_is_no_problem(self) -> None:
        assert db.schema_problem(5, 5) is None

    def test_missing_or_older_says_to_migrate(self) -> None:
        assert db.schema_problem(None, 5) == (
            "the database has no outbox schema: run `outbox migrate`"
        )
        assert db.schema_problem(4, 5) == (
            "the outbox schema is at version 4 and this outbox needs 5: run `outbox migrate`"
        )

    def test_newer_says_to_upgrade(self) -> None:
        assert db.schema_problem(6, 5) == (
            "the outbox schema is at version 6, newer than this outbox knows (5): upgrade outbox"
        )
