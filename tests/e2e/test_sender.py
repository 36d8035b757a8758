"""One attempt, in-process: outbox.delivery.Sender against real receivers, a real
endpoint that never answers, and a name server that is slow for some hosts.

The slow name server is the one stand-in: getaddrinfo itself is replaced for hosts
under ``slow.test`` (this machine's resolver cannot be pointed elsewhere), and those
lookups wait until the test lets them go.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from outbox.config import Settings
from outbox.delivery import Sender
from tests.receiver import BlackHole, Receiver

# An account has at most 10 webhooks, so at most 10 hosts of its own to look up at once.
TENANT_HOSTS = 10


class SlowNameServer:
    """getaddrinfo that hangs for hosts under slow.test until ``release()``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._real = socket.getaddrinfo
        self._released = threading.Event()
        self._lock = threading.Lock()
        self.asked: list[str] = []
        monkeypatch.setattr(socket, "getaddrinfo", self._getaddrinfo)

    def _getaddrinfo(self, host: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, str) and host.endswith(".slow.test"):
            with self._lock:
                self.asked.append(host)
            self._released.wait(30)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return self._real(host, *args, **kwargs)

    def waiting(self) -> int:
        with self._lock:
            return len(self.asked)

    def release(self) -> None:
        self._released.set()


@pytest.fixture
def slow_dns(monkeypatch: pytest.MonkeyPatch) -> Iterator[SlowNameServer]:
    server = SlowNameServer(monkeypatch)
    yield server
    server.release()


def settings(ca_file: str, http_timeout: float) -> Settings:
    return Settings(ca_file=ca_file, allow_private_targets=True, http_timeout=http_timeout)


async def until(check: Callable[[], bool]) -> None:
    async with asyncio.timeout(15):
        while not check():
            await asyncio.sleep(0.01)


class TestNameResolution:
    async def test_a_slow_name_server_for_one_tenant_does_not_delay_another_host(
        self, slow_dns: SlowNameServer, receiver: Receiver, ca_file: str
    ) -> None:
        """While the lookups of one tenant's ten hosts hang, a delivery to another host
        is looked up, sent and answered."""
        async with Sender(settings(ca_file, http_timeout=10.0)) as sender:
            hanging = [
                asyncio.create_task(sender.post(f"https://h{n}.slow.test/hook", b"{}", {}))
                for n in range(TENANT_HOSTS)
            ]
            try:
                await until(lambda: slow_dns.waiting() == TENANT_HOSTS)
            except TimeoutError:
                pytest.fail(
                    f"only {slow_dns.waiting()} of the tenant's {TENANT_HOSTS} lookups ran at"
                    " once: the others wait for a thread, and so would everyone else's"
                )
            url = receiver.url().replace("127.0.0.1", "localhost")
            attempt = await sender.post(url, b"{}", {})
            assert attempt.ok and attempt.status == 200, attempt
            assert not any(task.done() for task in hanging)
            slow_dns.release()
            for task in hanging:
                assert (await task).error is not None

    async def test_the_lookup_counts_in_the_attempts_timeout(
        self, slow_dns: SlowNameServer, ca_file: str
    ) -> None:
        """A lookup that outlasts OUTBOX_HTTP_TIMEOUT fails the attempt as a timeout."""
        async with Sender(settings(ca_file, http_timeout=0.3)) as sender:
            attempt = await sender.post("https://h.slow.test/hook", b"{}", {})
        assert attempt.error == "timeout after 0.3s" and attempt.status is None


class TestTimeouts:
    async def test_waiting_for_a_free_connection_counts_in_the_timeout(
        self, black_hole: BlackHole, ca_file: str
    ) -> None:
        """With one connection allowed and an endpoint that never answers, the attempts
        queued for that connection run out of time as timeouts too, whether their time
        ran out while they waited or once they were connected."""
        async with Sender(settings(ca_file, http_timeout=0.5), limit=1) as sender:
            attempts = await asyncio.gather(
                *(sender.post(black_hole.url(), b"{}", {}) for _ in range(3))
            )
        assert [a.error for a in attempts] == ["timeout after 0.5s"] * 3
