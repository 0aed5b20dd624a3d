"""Two WebSocket connections joined frame for frame, closes and all.

The bridge knows nothing about what the frames mean. It moves TEXT and BINARY
frames unchanged both ways, carries a close code and reason from one peer to the
other, turns a peer that vanished into a 1011 for the one that is left, and
enforces two plain time limits (idle, whole session). Per frame it does one send,
two counter updates, a clock read and, when given, one call of an observer.

Given ``max_message_bytes`` (the limit both legs were opened with), each leg also
gets a :class:`relayd.streams.wsframes.FrameLane`: plain data frames then go from
socket to socket as bytes, and only what needs a decision (closes, pings, errors,
fragments, limits) reaches the pumps below, which handle it as described here.
The lanes also measure what each leg holds (an unfinished message, a frame still
arriving): given ``hold``, the session's total is reserved through it before it
is kept, and a refusal ends the session with 1013 "try again later" and the
refusal as reason. One message is bounded by ``max_message_bytes`` (aiohttp
closes with 1009 past it), so a session holds at most one such message per
direction, and ``hold`` bounds what all sessions hold together.

Rules the caller must keep (docs/streaming.md#reading-the-legs), because aiohttp's
defaults would lose the close code or read a socket from two tasks:

- both legs are opened with ``autoclose=False`` (with ``autoclose=True`` aiohttp
  answers a peer's CLOSE with 1000 before the bridge sees the peer's code) and
  ``decode_text=False`` (TEXT payloads stay bytes: no decode, no re-encode, and
  ``send_frame`` puts them back on the wire as they came);
- :meth:`WebSocketBridge.run` is awaited by the request handler task;
- nothing else reads either leg; frames are read with explicit ``receive()``
  calls, never ``async for`` (which swallows the CLOSE and its code and reason).

Who does what, and why:

- The handler task reads the downstream leg, and it alone closes it, as its very
  last await. aiohttp reads server websockets in the handler task only
  (``docs/web_advanced.rst``), and once the downstream transport is closed the
  server cancels the handler (``handler_cancellation``, RequestHandler.
  connection_lost): anything the handler still awaited after that would be cut
  short. So the upstream leg is always settled first.
- One task the bridge starts reads the upstream leg. When upstream closes or
  vanishes, or a limit or shutdown ends the session, the handler task is woken by
  expiring the ``asyncio.timeout`` scope its pump runs in (``Timeout.reschedule``:
  a cancellation asyncio itself accounts for), never by closing the downstream
  socket from another task.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final, Protocol, TypeAlias

from aiohttp import ClientWebSocketResponse, WSCloseCode, WSMsgType, web

from relayd.streams import wsframes
from relayd.tasks import spawn

__all__ = [
    "BridgeStats",
    "FrameGate",
    "FrameObserver",
    "MemoryHold",
    "Leg",
    "LegStats",
    "WebSocketBridge",
    "sendable_close_code",
]


class Leg(StrEnum):
    """Which side of the bridge a frame came from."""

    DOWNSTREAM = "downstream"  # the peer that connected to us (server side)
    UPSTREAM = "upstream"  # the peer we dialled (client side)


FrameObserver: TypeAlias = Callable[[Leg, WSMsgType, bytes], None]
"""Called with the source, type and payload of every TEXT/BINARY frame before it is
forwarded; must be cheap and must not raise (that ends the session with 1011)."""

_Socket: TypeAlias = "web.WebSocketResponse[bool] | ClientWebSocketResponse[bool]"


class FrameGate(Protocol):
    """Judges the downstream peer's data frames while ``armed``: None forwards the
    frame; bytes drop it and are sent back to that peer as a TEXT frame instead.
    Unarmed, it costs nothing (frames keep the fast lane)."""

    armed: bool

    def __call__(self, kind: WSMsgType, data: bytes) -> bytes | None: ...


MemoryHold: TypeAlias = Callable[[int], "str | None"]
"""Reserves the bytes a session holds (the new total); None if granted, else the
reason to close the session with (1013)."""

# RFC 6455 §7.4.1: 1005, 1006 and 1015 only report what happened and "MUST NOT be
# set as a status code in a Close control frame". aiohttp reports a CLOSE frame
# without a code as 0 (RFC: 1005, "no status"): a clean close that named no reason,
# passed on as 1000 rather than as an error.
_NO_STATUS: Final = frozenset({0, 1005})
_UNSENDABLE: Final = frozenset({1006, 1015})
# RFC 6455 §5.5: a control frame payload is at most 125 bytes, two of them the code.
_MAX_REASON_BYTES: Final = 123

IDLE_CLOSE: Final = (WSCloseCode.GOING_AWAY, "idle timeout")
SESSION_LIMIT_CLOSE: Final = (WSCloseCode.POLICY_VIOLATION, "session time limit reached")


def sendable_close_code(code: int | None) -> int:
    """The code to put in a CLOSE frame for a peer's ``code`` (1011 if none fits)."""
    if code is None or code in _UNSENDABLE:
        return WSCloseCode.INTERNAL_ERROR
    if code in _NO_STATUS:
        return WSCloseCode.OK
    return code


def _reason_bytes(reason: str) -> bytes:
    raw = reason.encode("utf-8")
    if len(raw) <= _MAX_REASON_BYTES:
        return raw
    # Cut on a character boundary: a close reason must be valid UTF-8 (§5.5.1).
    return raw[:_MAX_REASON_BYTES].decode("utf-8", "ignore").encode("utf-8")


@dataclass(slots=True)
class LegStats:
    """Frames and payload bytes received from one peer, and how that leg closed."""

    frames: int = 0
    bytes: int = 0
    close_code: int | None = None  # received from the peer, or sent to it by the bridge


@dataclass(slots=True)
class BridgeStats:
    started: float
    ended: float | None = None
    ended_by: str | None = None  # a Leg, "<leg>_lost", "idle", "max_session", or the caller's
    downstream: LegStats = field(default_factory=LegStats)
    upstream: LegStats = field(default_factory=LegStats)

    @property
    def duration(self) -> float:
        return (self.ended if self.ended is not None else self.started) - self.started


class WebSocketBridge:
    """Join ``downstream`` (server side, prepared) and ``upstream`` (client side, open).

    :meth:`run` returns when both legs are closed. A CLOSE from either peer goes
    to the other with the same code and reason (codes that cannot be sent are
    mapped, see :func:`sendable_close_code`), and is answered. A peer that goes
    away without a CLOSE, or breaks the protocol, leaves the other with 1011. With
    ``idle_timeout`` (seconds without a data frame either way) or ``max_session``
    (seconds since the bridge started), both legs are closed with 1001 "idle
    timeout" or 1008 "session time limit reached". :meth:`close` ends the session
    from outside (shutdown). If the handler task is cancelled (the client's
    connection dropped), the upstream leg gets 1011 before ``run`` re-raises.
    """

    __slots__ = (
        "__weakref__",  # open bridges are kept in a WeakSet for shutdown
        "_clock",
        "_closing",
        "_down",
        "_down_close",
        "_failure",
        "_gate",
        "_held",
        "_hold",
        "_refused",
        "_idle_timeout",
        "_lanes",
        "_last_frame",
        "_max_message_bytes",
        "_max_session",
        "_observed",
        "_observer",
        "_reason_filter",
        "_up",
        "_wake",
        "stats",
    )

    def __init__(
        self,
        downstream: web.WebSocketResponse[bool],
        upstream: ClientWebSocketResponse[bool],
        *,
        idle_timeout: float | None = None,
        max_session: float | None = None,
        observer: FrameObserver | None = None,
        observed: Collection[Leg] = (Leg.DOWNSTREAM, Leg.UPSTREAM),
        reason_filter: Callable[[str], str] | None = None,
        max_message_bytes: int | None = None,
        hold: MemoryHold | None = None,
        gate: FrameGate | None = None,
    ) -> None:
        self._down = downstream
        self._gate = gate
        self._up = upstream
        self._idle_timeout = idle_timeout
        self._max_session = max_session
        self._observer = observer
        self._observed = frozenset(observed)
        self._max_message_bytes = max_message_bytes
        self._lanes: list[wsframes.FrameLane] = []
        self._hold = hold
        self._held = {Leg.DOWNSTREAM: 0, Leg.UPSTREAM: 0}
        self._refused: Leg | None = None  # the leg whose lane was refused more memory
        self._reason_filter = reason_filter
        self._clock = asyncio.get_running_loop().time
        self._last_frame = self._clock()
        self._closing: asyncio.Task[None] | None = None
        self._down_close: tuple[int, str] | None = None  # how the handler must close downstream
        self._wake: asyncio.Timeout | None = None  # set while the downstream pump runs
        self._failure: BaseException | None = None
        self.stats = BridgeStats(started=self._last_frame)

    async def run(self) -> BridgeStats:
        """Move frames until both legs are closed; await it from the handler task."""
        self._open_lanes()
        reader = spawn(self._read_upstream(), name="ws-bridge-upstream")
        watchdog = None
        if self._idle_timeout or self._max_session:
            watchdog = spawn(self._watch(), name="ws-bridge-watchdog")
        try:
            end = await self._pump_downstream()
            if end is not None:
                await self._downstream_ended(end)
            # Settle the upstream leg first (see the module docstring). asyncio.wait,
            # unlike await, never cancels the tasks it waits for.
            await asyncio.wait([t for t in (reader, self._closing) if t is not None])
            code, reason = self._down_close or (WSCloseCode.INTERNAL_ERROR, "relay error")
            if self._refused is Leg.DOWNSTREAM:
                # Its lane stopped reading mid-message: the client's reply to our
                # CLOSE cannot be seen, so it is not waited for.
                wsframes.stop_reading(self._down)
            await self._close_leg(self._down, self.stats.downstream, code, reason)
        except BaseException as exc:
            # Cancelled: with handler_cancellation the client's connection dropped.
            # Anything else is a bug. Either way upstream hears 1011, not silence.
            lost = isinstance(exc, asyncio.CancelledError)
            self._ended_by("downstream_lost" if lost else "error")
            if lost and self.stats.downstream.close_code is None:
                self.stats.downstream.close_code = WSCloseCode.ABNORMAL_CLOSURE
            await self._close_leg(
                self._up,
                self.stats.upstream,
                WSCloseCode.INTERNAL_ERROR,
                "downstream connection lost" if lost else "relay error",
            )
            raise
        finally:
            if watchdog is not None:
                watchdog.cancel()
            for lane in self._lanes:
                lane.close()
            wsframes.release(self._down)
            wsframes.release(self._up)
            self.stats.ended = self._clock()
        if self._failure is not None:
            raise self._failure
        return self.stats

    async def close(self, code: int, reason: str, *, ended_by: str) -> None:
        """End the session with ``code`` and ``reason`` on both legs (from any task).

        Returns once the upstream leg is closed; the handler task then closes the
        downstream leg. Idempotent: the first caller's code wins.
        """
        await self._start_closing(code, reason, ended_by)

    # ------------------------------------------------------------------ fast lanes

    def _open_lanes(self) -> None:
        """Let plain data frames bypass aiohttp's messages, when the limit is known."""
        if self._max_message_bytes is None:
            return
        for source, sink, leg, stats in (
            (self._down, self._up, Leg.DOWNSTREAM, self.stats.downstream),
            (self._up, self._down, Leg.UPSTREAM, self.stats.upstream),
        ):
            observer = self._observer if leg in self._observed else None
            lane = wsframes.attach(
                source,
                sink,
                masked=leg is Leg.DOWNSTREAM,  # RFC 6455 §5.3: clients mask, servers don't
                max_size=self._max_message_bytes,
                is_open=self._is_open,
                on_frames=functools.partial(self._count, stats),
                observer=None if observer is None else functools.partial(observer, leg),
                hold=None if self._hold is None else functools.partial(self._hold_for, leg),
                divert=self._gate_armed if leg is Leg.DOWNSTREAM and self._gate else None,
            )
            if lane is not None:
                self._lanes.append(lane)

    def _gate_armed(self) -> bool:
        return self._gate is not None and self._gate.armed

    def _hold_for(self, leg: Leg, size: int) -> bool:
        """A lane asks to hold ``size`` bytes for ``leg``; refused, the session ends."""
        assert self._hold is not None
        total = size + sum(held for other, held in self._held.items() if other is not leg)
        refusal = self._hold(total)
        if refusal is None:
            self._held[leg] = size
            return True
        self._refused = self._refused or leg
        self._start_closing(WSCloseCode.TRY_AGAIN_LATER, refusal, "memory_budget")
        return False

    def _is_open(self) -> bool:
        return self._down_close is None and not self._down.closed and not self._up.closed

    def _count(self, stats: LegStats, frames: int, payload: int) -> None:
        stats.frames += frames
        stats.bytes += payload
        self._last_frame = self._clock()

    # ------------------------------------------------------------------ downstream

    async def _pump_downstream(self) -> tuple[WSMsgType, int, str] | None:
        """Pump until the downstream peer ends or another task wakes us (None)."""
        try:
            async with asyncio.timeout(None) as wake:
                self._wake = wake
                end = await self._pump(self._down, self._up, Leg.DOWNSTREAM, self.stats.downstream)
                self._wake = None
                return end
        except TimeoutError:
            if not wake.expired():
                raise
            return None  # woken: _down_close says how to finish
        finally:
            self._wake = None

    async def _downstream_ended(self, end: tuple[WSMsgType, int, str]) -> None:
        kind, code, reason = end
        if kind is WSMsgType.CLOSE:
            self._ended_by(Leg.DOWNSTREAM)
            self._record(self.stats.downstream, code)
            sendable = sendable_close_code(code)
            reason = self._filtered(reason)
            self._finish_downstream_with(sendable, reason)  # the answer, sent last
            await self._close_leg(self._up, self.stats.upstream, sendable, reason)
        else:  # CLOSED, ERROR, or a closing nobody asked for
            self._ended_by(f"{Leg.DOWNSTREAM}_lost")
            self._record(self.stats.downstream, _lost_code(kind, self._down.close_code))
            what = "lost" if kind is WSMsgType.CLOSED else "failed"
            self._finish_downstream_with(WSCloseCode.INTERNAL_ERROR, f"downstream {what}")
            reason = f"downstream connection {what}"
            await self._close_leg(self._up, self.stats.upstream, WSCloseCode.INTERNAL_ERROR, reason)

    def _finish_downstream_with(self, code: int, reason: str) -> None:
        """Record how downstream must be closed and wake the handler task to do it."""
        if self._down_close is None:
            self._down_close = (code, reason)
        wake, self._wake = self._wake, None  # an expiring Timeout cannot be rescheduled
        if wake is not None:
            wake.reschedule(-math.inf)

    # ------------------------------------------------------------------ upstream

    async def _read_upstream(self) -> None:
        try:
            end = await self._pump(self._up, self._down, Leg.UPSTREAM, self.stats.upstream)
            if end is None:
                return  # downstream is gone; the handler task finishes the session
            kind, code, reason = end
            if kind is WSMsgType.CLOSING:
                return  # closed on purpose by the handler task or by close()
            if kind is WSMsgType.CLOSE:
                self._ended_by(Leg.UPSTREAM)
                self._record(self.stats.upstream, code)
                sendable = sendable_close_code(code)
                reason = self._filtered(reason)
                self._finish_downstream_with(sendable, reason)
                # autoclose=False: the closing handshake with upstream is ours to finish.
                await self._up.close(code=sendable, message=_reason_bytes(reason))
            else:
                self._ended_by(f"{Leg.UPSTREAM}_lost")
                self._record(self.stats.upstream, _lost_code(kind, self._up.close_code))
                what = "lost" if kind is WSMsgType.CLOSED else "failed"
                self._finish_downstream_with(
                    WSCloseCode.INTERNAL_ERROR, f"upstream connection {what}"
                )
        except Exception as exc:  # a bug (or an observer that raised): end, don't hang
            self._failure = exc
            self._ended_by("error")
            self._finish_downstream_with(WSCloseCode.INTERNAL_ERROR, "relay error")
            await self._close_leg(
                self._up, self.stats.upstream, WSCloseCode.INTERNAL_ERROR, "relay error"
            )

    # ------------------------------------------------------------------ shared

    async def _pump(
        self, source: _Socket, sink: _Socket, leg: Leg, stats: LegStats
    ) -> tuple[WSMsgType, int, str] | None:
        """Forward data frames; return how ``source`` ended, or None if ``sink`` failed."""
        observer = self._observer if leg in self._observed else None
        gate = self._gate if leg is Leg.DOWNSTREAM else None
        clock = self._clock
        while True:
            msg = await source.receive()
            kind = msg.type
            if kind is WSMsgType.TEXT or kind is WSMsgType.BINARY:
                data = msg.data
                stats.frames += 1
                stats.bytes += len(data)
                self._last_frame = clock()
                if observer is not None:
                    observer(leg, kind, data)
                if gate is not None and gate.armed:
                    answer = gate(kind, data)
                    if answer is not None:  # dropped: the sender hears why instead
                        with contextlib.suppress(ConnectionError):  # its reader sees it
                            await source.send_frame(answer, WSMsgType.TEXT)
                        continue
                try:
                    await sink.send_frame(data, kind)
                except ConnectionError:
                    return None  # the sink is closing or gone; its reader ends the session
            elif kind is WSMsgType.CLOSE:
                return kind, msg.data, msg.extra or ""
            else:
                # CLOSING (closed on purpose from another task), CLOSED (the transport
                # ended without a CLOSE frame), ERROR (protocol error, message too
                # big, missed pong).
                return kind, 0, ""

    def _start_closing(self, code: int, reason: str, ended_by: str) -> asyncio.Task[None]:
        if self._closing is None:
            self._ended_by(ended_by)
            self._closing = spawn(self._close_for(code, reason), name="ws-bridge-close")
        return self._closing

    async def _close_for(self, code: int, reason: str) -> None:
        self._finish_downstream_with(code, reason)
        # Closing wakes the upstream reader with CLOSING, so its pump ends on its own.
        await self._close_leg(self._up, self.stats.upstream, code, reason)

    async def _close_leg(self, leg: _Socket, stats: LegStats, code: int, reason: str) -> None:
        self._record(stats, code)
        await leg.close(code=code, message=_reason_bytes(reason))

    @staticmethod
    def _record(stats: LegStats, code: int) -> None:
        if stats.close_code is None:
            stats.close_code = code

    def _filtered(self, reason: str) -> str:
        return reason if self._reason_filter is None else self._reason_filter(reason)

    def _ended_by(self, what: str) -> None:
        if self.stats.ended_by is None:
            self.stats.ended_by = what

    async def _watch(self) -> None:
        idle = self._idle_timeout or math.inf
        session_end = self.stats.started + (self._max_session or math.inf)
        while True:
            now = self._clock()
            if now >= session_end:
                code, reason = SESSION_LIMIT_CLOSE
                self._start_closing(code, reason, "max_session")
                return
            idle_end = self._last_frame + idle
            if now >= idle_end:
                code, reason = IDLE_CLOSE
                self._start_closing(code, reason, "idle")
                return
            await asyncio.sleep(min(session_end, idle_end) - now)


def _lost_code(kind: WSMsgType, reported: int | None) -> int:
    # aiohttp reports a transport that ended without a CLOSE frame as 1000; RFC 6455
    # §7.1.5 calls that 1006. An ERROR carries aiohttp's own code (1002, 1009, ...).
    if kind is WSMsgType.ERROR and reported:
        return reported
    return WSCloseCode.ABNORMAL_CLOSURE
