"""The benchmark's webhook receiver: HTTPS, in a process of its own, answering at once.

    python -m bench.receiver --dir DIR [--port 0]

Writes a trustme CA to DIR/ca.pem (what OUTBOX_CA_FILE points at), serves HTTPS on
127.0.0.1 with a certificate for 127.0.0.1/localhost, and prints ``ready <port>`` on
stdout. Every request is answered ``200 ok`` as soon as its body is in; the receiver
records, per request, the ``X-Webhook-Id`` (an integer; -1 if absent or not a number)
and the receive time (``time.time()``, the same clock producers use).

A raw asyncio protocol rather than a web framework, on uvloop when it is installed: the
receiver is the measuring instrument, so it should be the cheapest thing in the chain.
HTTP/1.1 with keep-alive, Content-Length bodies (what every client here sends).

Control commands, one per line on stdin, each answered by one line on stdout:

    count          -> the number of requests recorded
    dump PATH      -> writes PATH.ids (int64) and PATH.t (float64), answers the count
    reset          -> forgets every record, answers 0
    quit           -> exits
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import sys
import time
from array import array
from pathlib import Path
from typing import Any

import trustme

_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n"
    b"Connection: keep-alive\r\n\r\nok"
)
_CLOSE_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n"
    b"Connection: close\r\n\r\nok"
)
_MAX_HEAD = 64 * 1024


class Records:
    """Compact per-request records: webhook ids and receive times."""

    def __init__(self) -> None:
        self.ids = array("q")
        self.times = array("d")

    def add(self, webhook_id: int, at: float) -> None:
        self.ids.append(webhook_id)
        self.times.append(at)

    def reset(self) -> None:
        self.ids = array("q")
        self.times = array("d")

    def dump(self, path: str) -> int:
        with open(path + ".ids", "wb") as f:
            self.ids.tofile(f)
        with open(path + ".t", "wb") as f:
            self.times.tofile(f)
        return len(self.ids)


class HTTPProtocol(asyncio.Protocol):
    def __init__(self, records: Records) -> None:
        self._records = records
        self._buf = bytearray()
        self._transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's SSL transport is not an asyncio.Transport subclass, but writes alike.
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _MAX_HEAD:
                    self._fail()
                return
            length = 0
            webhook_id = -1
            close = False
            for line in bytes(buf[:end]).split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"x-webhook-id":
                    try:
                        webhook_id = int(value)
                    except ValueError:
                        webhook_id = -1
                elif name == b"connection":
                    close = value.strip().lower() == b"close"
            total = end + 4 + length
            if len(buf) < total:
                return
            del buf[:total]
            self._records.add(webhook_id, time.time())
            if close:
                self._transport.write(_CLOSE_RESPONSE)
                self._transport.close()
                return
            self._transport.write(_RESPONSE)

    def _fail(self) -> None:
        if self._transport is not None:
            self._transport.close()


async def _control(records: Records, server: asyncio.AbstractServer) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = (await reader.readline()).decode().strip()
        if not line or line == "quit":
            break
        command, _, arg = line.partition(" ")
        if command == "count":
            answer = str(len(records.ids))
        elif command == "dump":
            answer = str(records.dump(arg))
        elif command == "reset":
            records.reset()
            answer = "0"
        else:
            answer = f"error unknown command {command!r}"
        sys.stdout.write(answer + "\n")
        sys.stdout.flush()
    server.close()


def write_ca(directory: Path) -> trustme.CA:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    return ca


async def serve(directory: Path, port: int) -> None:
    ca = write_ca(directory)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    records = Records()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: HTTPProtocol(records), "127.0.0.1", port, ssl=context, backlog=1024
    )
    bound = server.sockets[0].getsockname()[1]
    sys.stdout.write(f"ready {bound}\n")
    sys.stdout.flush()
    await _control(records, server)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.receiver")
    parser.add_argument("--dir", required=True, type=Path)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.dir, args.port))
    else:
        uvloop.run(serve(args.dir, args.port))
    os._exit(0)


if __name__ == "__main__":
    main()
