"""A real HTTPS receiver for tests: aiohttp on its own thread, with a trustme certificate."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trustme
from aiohttp import web

from tests.chat import discord_error, slack_error


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass(frozen=True)
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    body: bytes = b"ok"
    # A body slow to finish: ``body`` is sent at once, then ``rest`` once ``release``
    # is set (or the client has gone).
    rest: bytes = b""
    release: threading.Event | None = None


class Receiver:
    """Records every request; ``respond`` decides each answer (default 200).

    With ``chat`` set to "slack" or "discord" it first checks each body as that
    service's webhook endpoint does, and refuses what the service would refuse with
    a 400 like the service's (``no_text``, ``invalid_blocks``, Discord's JSON error);
    ``refusals`` keeps the full reasons.
    """

    def __init__(self, ca: trustme.CA) -> None:
        self.requests: list[Received] = []
        # Paths of slow answers whose client closed the connection before the rest came.
        self.left_early: list[str] = []
        self.respond: Callable[[Received], Reply] = lambda _: Reply()
        self.chat: str | None = None
        self.refusals: list[str] = []
        self._lock = threading.Lock()
        cert = ca.issue_cert("localhost", "127.0.0.1")
        self._ssl = cert.configure_cert  # applied to the server context in start()
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self.port = 0
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> Receiver:
        import ssl

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._ssl(context)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(context), self._loop).result(10)
        return self

    async def _start(self, context: object) -> None:
        app = web.Application(client_max_size=2**20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=context)  # type: ignore[arg-type]
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _handle(self, request: web.Request) -> web.Response:
        received = Received(request.path, dict(request.headers), await request.read(), time.time())
        with self._lock:
            self.requests.append(received)
        refused = self._refuse(received.body)
        if refused is not None:
            return refused
        reply = self.respond(received)
        if reply.delay:
            await asyncio.sleep(reply.delay)
        headers = {"Content-Type": "text/plain; charset=utf-8"} | reply.headers
        if reply.release is None:
            return web.Response(status=reply.status, headers=headers, body=reply.body)
        response = web.StreamResponse(status=reply.status, headers=headers)
        await response.prepare(request)
        await response.write(reply.body)
        transport = request.transport
        while not reply.release.is_set() and transport is not None and not transport.is_closing():
            await asyncio.sleep(0.01)
        if transport is None or transport.is_closing():
            with self._lock:
                self.left_early.append(request.path)
            return response
        await response.write(reply.rest)
        await response.write_eof()
        return response

    def _refuse(self, body: bytes) -> web.Response | None:
        if self.chat is None:
            return None
        try:
            message = json.loads(body)
        except ValueError:
            message = None
        check = slack_error if self.chat == "slack" else discord_error
        error = check(message)
        if error is None:
            return None
        with self._lock:
            self.refusals.append(error)
        if self.chat == "slack":
            return web.Response(status=400, text=error.split(":")[0])
        code = 50006 if error.startswith("Cannot send an empty message") else 50035
        return web.json_response({"message": error, "code": code}, status=400)

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def url(self, path: str = "/hook") -> str:
        return f"https://127.0.0.1:{self.port}{path}"

    def received(self, path: str | None = None) -> list[Received]:
        with self._lock:
            return [r for r in self.requests if path is None or r.path == path]

    def wait_for(self, count: int, path: str | None = None, timeout: float = 15) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.received(path)
            if len(got) >= count:
                return got
            time.sleep(0.01)
        raise AssertionError(f"expected {count} requests to {path}, got {len(self.received(path))}")


class BlackHole:
    """A TCP server that accepts connections and never answers: every request to it
    runs into the client's timeout. Counts the connections it holds."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0), backlog=128)
        self._server.settimeout(0.1)
        self._held: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.port = int(self._server.getsockname()[1])
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def start(self) -> BlackHole:
        self._thread.start()
        return self

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            with self._lock:
                self._held.append(conn)

    def connections(self) -> int:
        with self._lock:
            return len(self._held)

    def url(self, path: str = "/hook") -> str:
        return f"https://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._server.close()
        with self._lock:
            for conn in self._held:
                conn.close()
