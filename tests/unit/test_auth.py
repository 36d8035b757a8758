"""Tests for outbox.web.auth.Credentials: the two lanes credentials are looked up through."""

from __future__ import annotations

import asyncio

import pytest

from outbox.web import auth
from outbox.web.auth import Credentials
from outbox.web.http import ApiError


class TestLanes:
    async def test_unknown_credentials_are_looked_up_one_at_a_time(self) -> None:
        """However many clients send unknown tokens, they hold one connection at most."""
        credentials = Credentials()
        running = 0
        most = 0
        release = asyncio.Event()

        async def ask() -> None:
            nonlocal running, most
            running += 1
            most = max(most, running)
            await release.wait()
            running -= 1

        lookups = [asyncio.create_task(credentials.look_up(f"bad{i}", ask)) for i in range(20)]
        await asyncio.sleep(0.01)
        assert most == 1
        release.set()
        assert await asyncio.gather(*lookups) == [None] * 20
        assert most == 1

    async def test_a_credential_seen_valid_does_not_queue_behind_strangers(self) -> None:
        credentials = Credentials()

        async def account() -> str:
            return "acct_1"

        assert await credentials.look_up("good", account) == "acct_1"
        stuck = asyncio.Event()

        async def never() -> None:
            await stuck.wait()

        strangers = [asyncio.create_task(credentials.look_up(f"bad{i}", never)) for i in range(5)]
        await asyncio.sleep(0.01)
        # The strangers' lane is taken and queued; the known token goes straight through.
        assert await asyncio.wait_for(credentials.look_up("good", account), 1) == "acct_1"
        stuck.set()
        await asyncio.gather(*strangers)

    async def test_a_credential_that_stops_answering_loses_its_lane(self) -> None:
        """A revoked token is asked about every time, and is a stranger afterwards."""
        credentials = Credentials()
        answers = ["acct_1", None]

        async def ask() -> str | None:
            return answers.pop(0)

        assert await credentials.look_up("token", ask) == "acct_1"
        assert await credentials.look_up("token", ask) is None
        assert credentials._known == {}

    async def test_too_many_strangers_waiting_are_turned_away(self) -> None:
        credentials = Credentials()
        stuck = asyncio.Event()

        async def never() -> None:
            await stuck.wait()

        waiting = [
            asyncio.create_task(credentials.look_up(f"bad{i}", never))
            for i in range(auth.STRANGERS_WAITING)
        ]
        await asyncio.sleep(0.01)
        with pytest.raises(ApiError) as refused:
            await credentials.look_up("one more", never)
        assert refused.value.status == 503
        assert refused.value.headers["Retry-After"] == "1"
        stuck.set()
        await asyncio.gather(*waiting)
