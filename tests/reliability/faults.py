"""A raw asyncio upstream that misbehaves on purpose (loopback only).

The fake OpenAI (``tests/fakes/openai.py``) is a well-behaved aiohttp server; the
faults a relay meets in the wild are below HTTP: garbage instead of a status line,
a body longer than its ``Content-Length``, a head and then silence, a connection
cut mid-body, a WebSocket that stops answering. :class:`FaultServer` speaks just
enough HTTP/1.1 (and RFC 6455 framing) to produce each of them, and records every
connection it accepted: when it opened, which request it carried, how many body
bytes it read, and when the peer (relayd) closed it. That last fact is how the
tests see that relayd cancelled upstream work.

``GET /v1/models`` always answers normally, so a test can check that relayd keeps
serving other clients while another request is stuck in a fault.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast

__all__ = ["Exchange", "FaultServer", "Script", "scripts"]

_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3
HEALTHY_PATH = "/v1/models"
HEALTHY_BODY = json.dumps({"object": "list", "data": []}).encode()


@dataclass
class Exchange:
    """One request as the fault server read it, and the connection to answer on."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    method: str
    target: str
    headers: dict[str, str]
    opened: float = field(default_factory=time.monotonic)
    body_bytes: int = 0
    sent: int = 0
    peer_closed: float | None = None  # when relayd closed its end (EOF seen)
    ws_close: float | None = None  # when relayd's WebSocket CLOSE frame arrived
    done: asyncio.Event = field(default_factory=asyncio.Event)
    writer_upgraded: bool = False  # a 101 went out: what follows are WebSocket frames

    @property
    def cancelled(self) -> float | None:
        """When relayd gave up on this exchange: a CLOSE frame or the connection's end."""
        moments = [t for t in (self.ws_close, self.peer_closed) if t is not None]
        return min(moments) if moments else None

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    def write(self, data: bytes) -> None:
        self.writer.write(data)
        self.sent += len(data)

    async def read_body(self, limit: int | None = None) -> None:
        """Read the request body (Content-Length or chunked), or ``limit`` bytes of it."""
        length = self.headers.get("content-length")
        if length is not None:
            remaining = int(length) if limit is None else min(int(length), limit)
            while remaining > 0:
                chunk = await self.reader.read(min(remaining, 65536))
                if not chunk:
                    return
                self.body_bytes += len(chunk)
                remaining -= len(chunk)
            return
        if self.headers.get("transfer-encoding", "").lower() != "chunked":
            return
        while limit is None or self.body_bytes < limit:
            size_line = await self.reader.readline()
            if not size_line:
                return
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                await self.reader.readline()  # the blank line after the last chunk
                return
            data = await self.reader.readexactly(size + 2)
            self.body_bytes += len(data) - 2

    async def wait_peer_close(self) -> None:
        """Stall: send nothing more, until relayd closes its end."""
        try:
            while data := await self.reader.read(65536):
                # A client frame with opcode 8 (RFC 6455 §5.5.1): relayd's CLOSE.
                if self.ws_close is None and self.writer_upgraded and data[0] & 0x0F == 0x8:
                    self.ws_close = time.monotonic()
        except ConnectionError:
            pass
        self.peer_closed = time.monotonic()

    def abort(self) -> None:
        self.writer.transport.abort()


Script = Callable[[Exchange], Awaitable[None]]


def _head(status: int, headers: dict[str, str], reason: str = "X") -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _ws_frame(opcode: int, payload: bytes) -> bytes:
    """An unmasked server frame (RFC 6455 §5.2)."""
    length = len(payload)
    if length < 126:
        header = bytes([0x80 | opcode, length])
    elif length < 65536:
        header = bytes([0x80 | opcode, 126]) + length.to_bytes(2, "big")
    else:
        header = bytes([0x80 | opcode, 127]) + length.to_bytes(8, "big")
    return header + payload


class scripts:
    """How the fault server answers the request it was sent."""

    @staticmethod
    def answer(
        status: int = 200,
        body: bytes = HEALTHY_BODY,
        content_type: str = "application/json",
        extra: dict[str, str] | None = None,
    ) -> Script:
        async def run(x: Exchange) -> None:
            await x.read_body()
            headers = {"Content-Type": content_type, "Content-Length": str(len(body))}
            x.write(_head(status, {**headers, **(extra or {})}) + body)
            await x.writer.drain()

        return run

    @staticmethod
    def silent() -> Script:
        """Read the whole request, then never answer."""

        async def run(x: Exchange) -> None:
            await x.read_body()
            await x.wait_peer_close()

        return run

    @staticmethod
    def stop_reading(after: int, hold: float = 3600.0) -> Script:
        """Read ``after`` bytes of the request body, then neither read nor answer for
        ``hold`` seconds (then close). Reading nothing, the server cannot see relayd
        leave: relayd's FIN waits in the kernel behind the bytes nobody reads."""

        async def run(x: Exchange) -> None:
            await x.read_body(limit=after)
            cast(asyncio.Transport, x.writer.transport).pause_reading()
            await asyncio.sleep(hold)

        return run

    @staticmethod
    def head_then(
        then: str,
        *,
        content_type: str,
        body: bytes,
        announce: int | None = None,
        upto: int = 0,
    ) -> Script:
        """Send a 200 head and ``upto`` bytes of ``body``; then ``stall``, ``drop``
        or ``finish``. ``announce`` sets Content-Length (else chunked)."""

        async def run(x: Exchange) -> None:
            await x.read_body()
            headers = {"Content-Type": content_type, "x-request-id": "req_fault"}
            if announce is not None:
                headers["Content-Length"] = str(announce)
            else:
                headers["Transfer-Encoding"] = "chunked"
            x.write(_head(200, headers, "OK"))
            part = body[:upto] if then != "finish" else body
            if part:
                x.write(part if announce is not None else _chunk(part))
            if then == "finish" and announce is None:
                x.write(b"0\r\n\r\n")
            await x.writer.drain()
            if then == "drop":
                await asyncio.sleep(0.05)  # let the bytes leave before the reset
                x.abort()
            elif then == "stall":
                await x.wait_peer_close()

        return run

    @staticmethod
    def garbage() -> Script:
        async def run(x: Exchange) -> None:
            await x.read_body()
            x.write(b"\x16\x03\x01 this is not HTTP at all \x00\xff\r\n\r\n")
            await x.writer.drain()
            x.writer.close()

        return run

    @staticmethod
    def overlong(announce: int, send: bytes, content_type: str = "application/json") -> Script:
        """A body longer than its Content-Length: the excess is a smuggled response."""

        async def run(x: Exchange) -> None:
            await x.read_body()
            headers = {"Content-Type": content_type, "Content-Length": str(announce)}
            x.write(_head(200, headers, "OK") + send)
            await x.writer.drain()
            await x.wait_peer_close()

        return run

    @staticmethod
    def firehose(total: int, content_type: str = "application/octet-stream") -> Script:
        """Send ``total`` bytes as fast as the peer takes them (flow control honoured)."""

        async def run(x: Exchange) -> None:
            await x.read_body()
            x.write(_head(200, {"Content-Type": content_type, "Content-Length": str(total)}))
            block = b"z" * 65536
            remaining = total
            while remaining > 0:
                piece = block[: min(remaining, len(block))]
                x.write(piece)
                remaining -= len(piece)
                await x.writer.drain()

        return run

    @staticmethod
    def websocket(
        then: str, frames: tuple[bytes, ...] = (b'{"type":"session.created"}',)
    ) -> Script:
        """Accept the upgrade, send ``frames``; then ``stall``, ``drop`` or ``junk``."""

        async def run(x: Exchange) -> None:
            key = x.headers.get("sec-websocket-key", "")
            accept = base64.b64encode(hashlib.sha1((key + _WS_GUID).encode()).digest())
            x.write(
                _head(
                    101,
                    {
                        "Upgrade": "websocket",
                        "Connection": "Upgrade",
                        "Sec-WebSocket-Accept": accept.decode(),
                    },
                    "Switching Protocols",
                )
            )
            x.writer_upgraded = True
            for frame in frames:
                x.write(_ws_frame(0x1, frame))
            await x.writer.drain()
            if then == "drop":
                await asyncio.sleep(0.05)
                x.abort()
            elif then == "junk":
                x.write(b"\x0f\xff not a websocket frame" * 4)
                await x.writer.drain()
                await x.wait_peer_close()
            else:
                await x.wait_peer_close()

        return run


class FaultServer:
    """A loopback TCP server running one :data:`Script` per request (see module doc)."""

    def __init__(self, script: Script | None = None) -> None:
        self.script: Script = script or scripts.answer()
        self.exchanges: list[Exchange] = []
        self.open_connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def faulted(self) -> list[Exchange]:
        """The exchanges that were not the healthy control path."""
        return [x for x in self.exchanges if x.path != HEALTHY_PATH]

    async def start(self) -> FaultServer:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)
        if self._server is not None:
            await self._server.wait_closed()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 2.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.01)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.open_connections += 1
        try:
            while True:  # keep-alive: one script run per request on this connection
                try:
                    raw = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                request_line, *lines = raw.decode("latin-1").split("\r\n")
                method, target, _ = (request_line.split(" ") + ["", ""])[:3]
                headers = {}
                for line in lines:
                    if ":" in line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                exchange = Exchange(reader, writer, method, target, headers)
                self.exchanges.append(exchange)
                script = self.script if exchange.path != HEALTHY_PATH else scripts.answer()
                try:
                    await script(exchange)
                finally:
                    exchange.done.set()
                if writer.is_closing() or exchange.peer_closed is not None:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:
            return  # close(): end quietly (asyncio logs a cancelled client_connected_cb)
        finally:
            self.open_connections -= 1
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
