"""Byte pass-through with backpressure and honest endings.

Invariants (DESIGN; every streaming change must keep them):

- One reader per socket; ``await resp.write()`` is the only flow control. The
  client StreamReader pauses the upstream socket at 2 x read_bufsize, and
  ``write()`` drains once 64 KiB are buffered, so memory per stream stays bounded.
- Pass-through routes never buffer a whole body beyond 64 KiB (small bodies of
  known length move in one write); wrapper routes buffer only the validated JSON
  they must re-encode, under a size cap.
- Strip hop-by-hop headers and ``Host``; never send both ``Content-Length`` and
  ``Transfer-Encoding``; keep ``Content-Encoding`` and ``Content-Length`` consistent
  with the bytes actually sent (``auto_decompress=False`` on pass-through).
- Streams use ``ClientTimeout(total=None, sock_connect=..., sock_read=idle)``.
- The server runs with ``handler_cancellation=True`` (the test server does too),
  so a client hang-up cancels the handler and with it the upstream request.
- After ``prepare()``, an upstream failure aborts the client connection; never
  ``write_eof()`` on a broken stream (a truncated body must not look complete).
- Accounting in ``finally:`` is synchronous (a second cancel can interrupt awaits).
- TCP_NODELAY on both legs.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

from aiohttp import StreamReader, web

__all__ = [
    "BrokenStreamError",
    "LimitExceededError",
    "Pumped",
    "Tap",
    "abort",
    "pump",
    "pump_request_body",
]


class BrokenStreamError(Exception):
    """The source failed before its end (reset, truncated, idle too long)."""

    def __init__(self, reason: str, *, sent: int) -> None:
        super().__init__(reason)
        self.sent = sent  # bytes that reached the sink before the break


class LimitExceededError(Exception):
    """A body grew past the byte limit its reader was given."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"Request body exceeds the relay's limit of {limit} bytes.")
        self.limit = limit


Tap = Callable[[bytes], None]


class Pumped:
    """What a pump moved: bytes sent, and seconds spent waiting on the source."""

    __slots__ = ("sent", "waited")

    def __init__(self) -> None:
        self.sent = 0
        self.waited = 0.0


async def pump(source: StreamReader, sink: web.StreamResponse, *, tap: Tap | None = None) -> Pumped:
    """Copy ``source`` to a prepared ``sink`` until EOF.

    ``tap`` sees every chunk after it was written (it must be cheap and must not
    keep references beyond a bounded tail). A source failure raises
    :class:`BrokenStreamError` (the caller aborts the client connection). A client
    that went away raises ``ConnectionResetError`` from the write; cancellation
    propagates untouched.
    """
    moved = Pumped()
    clock = time.perf_counter
    while True:
        started = clock()
        try:
            chunk = await source.readany()
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
            raise BrokenStreamError(reason, sent=moved.sent) from exc
        moved.waited += clock() - started
        if not chunk:
            return moved
        await sink.write(chunk)
        moved.sent += len(chunk)
        if tap is not None:
            tap(chunk)


async def pump_request_body(source: StreamReader, limit: int) -> AsyncIterator[bytes]:
    """Yield a request body as it arrives, refusing to read past ``limit`` bytes."""
    received = 0
    while chunk := await source.readany():
        received += len(chunk)
        if received > limit:
            raise LimitExceededError(limit)
        yield chunk


def abort(request: web.BaseRequest) -> None:
    """Cut the client connection so a broken stream cannot look like a clean end."""
    transport = request.transport
    if transport is not None:
        transport.abort()
