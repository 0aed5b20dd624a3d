"""Byte pass-through with backpressure and honest endings.

Invariants (docs/design.md#invariants; every streaming change must keep them):

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
    "broken_stream",
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
    """What a pump moved: bytes written to the sink, seconds spent waiting on the
    source, and seconds spent blocked writing to the sink (a client reading slowly).

    A caller that hands in its own reads it however the pump ended: a break, a
    client gone, cancellation. What is left is the relay's own time (overhead).
    """

    __slots__ = ("blocked", "sent", "waited")

    def __init__(self) -> None:
        self.sent = 0
        self.waited = 0.0
        self.blocked = 0.0

    def spent(self, seconds: float, *, writing: bool) -> None:
        """Book ``seconds`` to the sink (``writing``) or to the source."""
        if writing:
            self.blocked += seconds
        else:
            self.waited += seconds


def broken_stream(exc: Exception, moved: Pumped) -> BrokenStreamError:
    """What a failed read of the source is: a :class:`BrokenStreamError` that says
    how much had been sent. (The pumps read inline, ``raise broken_stream(exc,
    moved) from exc``: a coroutine per chunk would cost more than the read.)"""
    return BrokenStreamError(str(exc) or type(exc).__name__, sent=moved.sent)


async def pump(
    source: StreamReader,
    sink: web.StreamResponse,
    *,
    tap: Tap | None = None,
    moved: Pumped | None = None,
) -> Pumped:
    """Copy ``source`` to a prepared ``sink`` until EOF, counting into ``moved``.

    ``tap`` sees every chunk after it was written (it must be cheap and must not
    keep references beyond a bounded tail). A source failure raises
    :class:`BrokenStreamError` (the caller aborts the client connection). A client
    that went away raises ``ConnectionResetError`` from the write; cancellation
    propagates untouched.
    """
    moved = Pumped() if moved is None else moved
    clock = time.perf_counter
    since = clock()
    on_sink = False  # whether the time since ``since`` is spent writing (else reading)
    try:
        while True:
            try:
                chunk = await source.readany()
            except Exception as exc:
                raise broken_stream(exc, moved) from exc
            now = clock()
            moved.waited += now - since
            since = now
            if not chunk:
                return moved
            on_sink = True
            await sink.write(chunk)
            now = clock()
            moved.blocked += now - since
            moved.sent += len(chunk)
            if tap is not None:
                tap(chunk)
                now = clock()  # the tap's time is the relay's own
            since, on_sink = now, False
    finally:
        # However the pump ended, the time since the last clock read belongs to the
        # side it was waiting on (a stall that broke, a write the client never took).
        moved.spent(clock() - since, writing=on_sink)


async def pump_request_body(source: StreamReader, limit: int) -> AsyncIterator[bytes]:
    """Yield a request body as it arrives, refusing to read past ``limit`` bytes."""
    received = 0
    while chunk := await source.readany():
        received += len(chunk)
        if received > limit:
            raise LimitExceededError(limit)
        yield chunk


def abort(request: web.BaseRequest) -> int:
    """Cut the client connection so a broken stream cannot look like a clean end.

    Returns how many bytes were still queued for the client and are now dropped.
    """
    transport = request.transport
    if transport is None:
        return 0
    dropped = transport.get_write_buffer_size()
    transport.abort()
    return dropped
