"""Server-sent events passed through byte for byte, with keepalives between events.

The bytes are never re-framed (aiohttp-sse's ``send()`` would wrap upstream's
already-framed ``data:`` lines a second time). The only thing relayd may add is a
comment line, ``: keepalive``, and only while upstream is silent *and* the last
byte written ended an event, so a comment can never land inside a half-written
event (WHATWG HTML §9.2.6: lines starting with a colon are ignored; the openai
SDKs' decoders skip them too).
"""

from __future__ import annotations

import asyncio
import time
from typing import Final

from aiohttp import StreamReader, web

from relayd.streams.pump import Pumped, Tap, broken_stream
from relayd.tasks import spawn

__all__ = ["KEEPALIVE", "SSEPump", "is_event_stream"]

KEEPALIVE: Final = b": keepalive\n\n"

# An event ends with a blank line; any of the three line endings may be used.
_EVENT_ENDS: Final = (b"\n\n", b"\r\r", b"\r\n\r\n")


def is_event_stream(content_type: str | None) -> bool:
    if not content_type:
        return False
    return content_type.split(";", 1)[0].strip().lower() == "text/event-stream"


class SSEPump:
    """Copy an event stream from ``source`` to a prepared ``sink``.

    Per chunk the work is one write, three clock reads (time spent waiting on the
    source and on the sink, for the relay-overhead metric), a counter, a look at the
    last four bytes and the optional tap. The keepalive is a timer of the loop, not
    a task: each interval it looks whether the pump was idle between events, and
    only then starts a task for the one write. Failure semantics, and the counting
    into ``moved``, are :func:`pump`'s.
    """

    __slots__ = (
        "_beat",
        "_chunks",
        "_keepalive_s",
        "_moved",
        "_seen",
        "_sink",
        "_source",
        "_tail",
        "_tap",
        "_timer",
        "_writing",
    )

    def __init__(
        self,
        source: StreamReader,
        sink: web.StreamResponse,
        *,
        keepalive_s: float | None,
        tap: Tap | None = None,
        moved: Pumped | None = None,
    ) -> None:
        self._source = source
        self._sink = sink
        self._keepalive_s = keepalive_s
        self._tap = tap
        self._moved = Pumped() if moved is None else moved
        self._chunks = 0
        self._tail = b"\n\n"  # before the first byte we are between events
        self._writing = False
        self._seen = 0  # chunks written when the keepalive timer last looked
        self._timer: asyncio.TimerHandle | None = None
        self._beat: asyncio.Task[None] | None = None  # a keepalive being written

    @property
    def at_event_boundary(self) -> bool:
        return self._tail.endswith(_EVENT_ENDS)

    async def run(self) -> Pumped:
        if self._keepalive_s:
            self._timer = asyncio.get_running_loop().call_later(self._keepalive_s, self._tick)
        moved, source = self._moved, self._source
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
                self._writing = on_sink = True
                try:
                    await self._sink.write(chunk)
                finally:
                    self._writing = False
                now = clock()
                moved.blocked += now - since
                moved.sent += len(chunk)
                self._chunks += 1
                self._tail = chunk[-4:] if len(chunk) >= 4 else (self._tail + chunk)[-4:]
                if self._tap is not None:
                    self._tap(chunk)
                    now = clock()  # the tap's time is the relay's own
                since, on_sink = now, False
        finally:
            # As in pump(): the time since the last clock read belongs to the side
            # the pump was waiting on when it ended.
            moved.spent(clock() - since, writing=on_sink)
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._beat is not None:
                self._beat.cancel()

    def _tick(self) -> None:
        """The keepalive timer: a comment when nothing was written for a whole
        interval and the last byte ended an event; then the next look."""
        idle = self._chunks == self._seen and not self._writing and self._beat is None
        if idle and self.at_event_boundary:
            self._beat = spawn(self._keepalive(), name="relayd.sse.keepalive")
        self._seen = self._chunks
        assert self._keepalive_s is not None
        self._timer = asyncio.get_running_loop().call_later(self._keepalive_s, self._tick)

    async def _keepalive(self) -> None:
        try:
            await self._sink.write(KEEPALIVE)
        except ConnectionError:
            return  # the pump notices the closed client on its own
        finally:
            self._beat = None
        self._moved.sent += len(KEEPALIVE)
