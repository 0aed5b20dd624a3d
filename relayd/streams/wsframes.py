"""A fast lane for WebSocket data frames: whole frames pass through as bytes.

aiohttp turns every frame into a message object, queues it, wakes the task reading
the socket, and the bridge then builds (and, towards upstream, masks) a new frame
from it. A :class:`FrameLane` sits where aiohttp's frame parser sits on one leg's
protocol and, for the frames that need nothing more, writes the received bytes
straight to the other leg's transport: a client's frames are already masked, which
the upstream leg requires; upstream's are unmasked, which the client requires.

Invariants:

- The lane forwards only *whole, final, unextended TEXT or BINARY frames within the
  size limit* while both legs are open. Anything else (control frames, fragments,
  RSV bits, wrong masking, an oversize frame, a leg that is closing) is handed back
  to aiohttp's own parser at that frame's first byte, so closes, pings, errors and
  limits behave exactly as on the message path; the bridge's pumps, parked in
  ``receive()``, get those messages as before.
- Frames are written whole, never in pieces, so a frame aiohttp writes on the same
  transport (a pong, a heartbeat ping, a close) can never land inside one of ours.
  A frame that arrives in pieces is held until complete (at most the size limit).
- The lane takes the stream from aiohttp only at a proven frame boundary with
  aiohttp's message queue empty: everything aiohttp parsed has been forwarded by
  the pump, and aiohttp holds no partial frame. Proof: a TEXT or BINARY message
  came out of aiohttp's parser on the last byte of a read (fed separately), so
  the parser had just finished a message and had nothing left over.
- Back-pressure: when the sink transport pauses writing, the source stops reading
  until the sink has drained; memory is the one frame in flight.
- Memory: what a leg holds is the frame the lane is completing plus the
  unfinished message aiohttp's parser is assembling (a :class:`_Meter` follows
  every byte the lane gives it). With a ``hold`` callback, that size is reported
  *before* the bytes are kept; when the callback refuses (the session's memory
  budget is used up), the lane keeps nothing more and stops reading the leg, and
  the callback's owner ends the session (issue 11: sessions that each held most
  of a 16 MiB message once exhausted a 512 MiB unit).

The aiohttp internals this needs are touched only by :func:`attach`,
:func:`stop_reading` and :func:`release`, at the bottom of this module.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Final, Protocol, TypeAlias

from aiohttp import ClientWebSocketResponse, WSMsgType, web

from relayd.tasks import spawn

__all__ = ["FrameLane", "attach", "release", "stop_reading"]

_Socket: TypeAlias = "web.WebSocketResponse[bool] | ClientWebSocketResponse[bool]"
MessageSink: TypeAlias = Callable[[WSMsgType, bytes], None]
"""Called with the type and (unmasked) payload of each message the lane forwards."""

# RFC 6455 §5.2: FIN plus opcode, with RSV1-3 clear (no extension is negotiated).
_FAST_OPCODES: Final = {0x81: WSMsgType.TEXT, 0x82: WSMsgType.BINARY}
_MASK_BIT: Final = 0x80
_NOTHING: Final = (False, b"")  # what aiohttp's parser returns for "fed, no error"
_HANDED_BACK: Final = -1  # _frame_size: the frame at this offset is aiohttp's


class _Parser(Protocol):
    """aiohttp's ``WebSocketReader``, as its protocols call it."""

    def feed_data(self, data: bytes) -> tuple[bool, bytes]: ...

    def feed_eof(self) -> None: ...


class _Meter:
    """Follows the frames given to aiohttp's parser (RFC 6455 §5.2) and knows how
    many payload bytes of an unfinished data message it holds: the fragments of a
    message whose final frame has not come, and the part of a frame still arriving.
    Control frames (at most 125 bytes, §5.5) are not counted."""

    __slots__ = ("_data", "_fin", "_head", "_left", "held")

    def __init__(self) -> None:
        self._head = b""  # the start of a frame header split across reads
        self._left = 0  # payload bytes of the current frame still to come
        self._data = False  # the current frame is TEXT, BINARY or CONTINUATION
        self._fin = True
        self.held = 0

    def feed(self, data: bytes) -> None:
        at, size = 0, len(data)
        while at < size:
            if self._left:
                take = min(self._left, size - at)
                self._left -= take
                at += take
                if self._data:
                    self.held += take
                if not self._left:
                    self._frame_ended()
                continue
            head = self._head + data[at : at + 14]  # 14: the longest header
            need = _header_size(head)
            if not need or len(head) < need:
                self._head = head  # all that was left of ``data``
                return
            at += need - len(self._head)
            self._head = b""
            first, length = head[0], head[1] & 0x7F
            if length >= 126:
                length = int.from_bytes(head[2 : 4 if length == 126 else 10], "big")
            self._data = (first & 0x0F) in (0x0, 0x1, 0x2)
            self._fin = bool(first & 0x80)
            self._left = length
            if not length:
                self._frame_ended()

    def _frame_ended(self) -> None:
        if self._data and self._fin:
            self.held = 0  # the message is whole: aiohttp hands it on


def _header_size(head: bytes) -> int:
    """A frame header's size from its first bytes (0 until the second byte is known)."""
    if len(head) < 2:
        return 0
    length = head[1] & 0x7F
    extended = 2 if length == 126 else 8 if length == 127 else 0
    return 2 + extended + (4 if head[1] & _MASK_BIT else 0)


class FrameLane:
    """Parses frame headers of one leg and forwards its plain data frames as bytes."""

    __slots__ = (
        "_at_boundary",
        "_divert",
        "_drain",
        "_fast",
        "_frame",
        "_hold",
        "_is_open",
        "_masked",
        "_max_size",
        "_meter",
        "_observer",
        "_on_frames",
        "_parser",
        "_pending",
        "_queue",
        "_refused",
        "_reported",
        "_sink",
        "_sink_protocol",
        "_source_protocol",
    )

    def __init__(
        self,
        parser: _Parser,
        queue: Any,
        source_protocol: Any,
        sink_protocol: Any,
        *,
        masked: bool,
        max_size: int,
        is_open: Callable[[], bool],
        on_frames: Callable[[int, int], None],
        observer: MessageSink | None,
        hold: Callable[[int], bool] | None = None,
        divert: Callable[[], bool] | None = None,
    ) -> None:
        self._parser = parser
        # While it says so, frames go the message path (where a gate may drop them).
        self._divert = divert
        self._queue = queue
        self._source_protocol = source_protocol
        self._sink_protocol = sink_protocol
        self._sink: asyncio.Transport = sink_protocol.transport
        self._masked = masked  # frames from this peer carry a mask (client to server)
        self._max_size = max_size
        self._is_open = is_open
        self._on_frames = on_frames  # (frames, payload bytes) once per read
        self._observer = observer
        self._fast = False
        self._at_boundary = False  # unknown until aiohttp's parser proves otherwise
        self._pending = bytearray()  # the start of a frame not yet complete
        self._frame = 0  # its total size, once its header is complete
        self._drain: asyncio.Task[None] | None = None
        self._meter = _Meter()
        self._hold = hold  # asked before the leg holds more (or less) than it did
        self._reported = 0
        self._refused = False

    # -------------------------------------------------------- the parser interface

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        """Called by the leg's protocol for every read, in place of aiohttp's parser."""
        if self._refused:
            return _NOTHING  # the session is ending; nothing more is kept
        if not self._fast and self._may_take_over():
            self._fast = True
        if self._fast:
            data = self._relay(data)
            if not data:
                return _NOTHING
            self._fast = False
        return self._feed_aiohttp(data)

    def feed_eof(self) -> None:
        self._parser.feed_eof()

    def close(self) -> None:
        """Stop waiting for the sink to drain and drop what is held (the session is over)."""
        if self._drain is not None:
            self._drain.cancel()
        self._pending = bytearray()
        self._refused = True

    # -------------------------------------------------------- memory

    def _may_hold(self, extra: int = 0) -> bool:
        """Whether the leg may hold what the meter counts plus ``extra`` pending bytes;
        a refusal stops the leg for good."""
        size = self._meter.held + len(self._pending) + extra
        if self._hold is None or size == self._reported:
            return True
        if self._hold(size):
            self._reported = size
            return True
        self._refused = True
        self._pending = bytearray()
        self._source_protocol.pause_reading()
        return False

    # -------------------------------------------------------- aiohttp's turn

    def _may_take_over(self) -> bool:
        # An empty queue: the pump has forwarded (written) every message aiohttp
        # parsed, since it takes a message and writes it in one step.
        if self._divert is not None and self._divert():
            return False
        return self._at_boundary and not self._queue._buffer and self._is_open()

    def _feed_aiohttp(self, data: bytes) -> tuple[bool, bytes]:
        """Let aiohttp parse ``data``; note whether it ended on a message boundary."""
        self._meter.feed(data)
        if not self._may_hold():
            return _NOTHING
        self._at_boundary = False
        if len(data) > 1:
            result = self._parser.feed_data(data[:-1])
            if result[0]:
                return result
        buffer = self._queue._buffer
        queued = len(buffer)
        result = self._parser.feed_data(data[-1:])
        if not result[0] and len(buffer) > queued:
            # A control frame can come in the middle of a fragmented message;
            # only a data message proves the parser holds nothing.
            self._at_boundary = buffer[-1][0].type in (WSMsgType.TEXT, WSMsgType.BINARY)
        return result

    # -------------------------------------------------------- the lane's turn

    def _relay(self, data: bytes) -> bytes:
        """Forward the whole frames in ``data``; return the bytes aiohttp must parse."""
        if self._pending:
            if not self._may_hold(len(data)):
                return b""
            self._pending += data
            if len(self._pending) < self._frame:  # 0 while the header is incomplete
                return b""
            data = bytes(self._pending)
            self._pending.clear()
            self._frame = 0
        if not self._is_open() or (self._divert is not None and self._divert()):
            return data  # at a frame boundary: aiohttp parses from here on
        end, frames, payload, size = 0, 0, 0, len(data)
        handed_back = b""
        while end < size:
            frame = self._frame_size(data, end)
            if frame == _HANDED_BACK:
                handed_back = data[end:]
                break
            if frame == 0 or end + frame > size:  # incomplete: hold it
                if not self._may_hold(size - end):
                    return b""
                self._pending += data[end:]
                self._frame = frame
                break
            payload += self._observe(data, end, frame)
            frames += 1
            end += frame
        if frames:
            self._sink.write(data if end == size else data[:end])
            self._on_frames(frames, payload)
            if self._sink_protocol.writing_paused:
                self._wait_for_drain()
        if not self._pending:
            self._may_hold()  # a completed frame is no longer held (never refused)
        return handed_back

    def _frame_size(self, data: bytes, at: int) -> int:
        """The whole frame's size at ``at``, 0 if its header is incomplete, or -1."""
        if len(data) - at < 2:
            return 0
        second = data[at + 1]
        if data[at] not in _FAST_OPCODES or bool(second & _MASK_BIT) != self._masked:
            return _HANDED_BACK
        length = second & 0x7F
        head = 2
        if length >= 126:
            head = 4 if length == 126 else 10
            if len(data) - at < head:
                return 0
            length = int.from_bytes(data[at + 2 : at + head], "big")
        # aiohttp 3.14 refuses a data frame of max_msg_size bytes or more (reader
        # "Reject oversized data frames"); it closes with 1009, as on the message path.
        if self._max_size and length >= self._max_size:
            return _HANDED_BACK
        return head + (4 if self._masked else 0) + length

    def _observe(self, data: bytes, at: int, frame: int) -> int:
        """Show the frame's payload to the observer; return the payload's size."""
        head = frame - _payload_size(data, at)
        if self._observer is not None:
            payload = data[at + head : at + frame]
            if self._masked:
                payload = _unmask(payload, data[at + head - 4 : at + head])
            self._observer(_FAST_OPCODES[data[at]], payload)
        return frame - head

    def _wait_for_drain(self) -> None:
        if self._drain is None:
            self._source_protocol.pause_reading()
            self._drain = spawn(self._resume_after_drain(), name="ws-lane-drain")

    async def _resume_after_drain(self) -> None:
        try:
            await self._sink_protocol._drain_helper()
        except ConnectionError:
            return  # the sink is gone; its pump ends the session
        finally:
            self._drain = None
        self._source_protocol.resume_reading()


def _payload_size(data: bytes, at: int) -> int:
    length = data[at + 1] & 0x7F
    if length < 126:
        return length
    return int.from_bytes(data[at + 2 : at + (4 if length == 126 else 10)], "big")


def _unmask(payload: bytes, key: bytes) -> bytes:
    # RFC 6455 §5.3: XOR with the 4-byte key, repeated; one big-integer XOR in C.
    size = len(payload)
    stream = (key * (size // 4 + 1))[:size]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(stream, "little")).to_bytes(
        size, "little"
    )


# ------------------------------------------------------------ aiohttp internals
#
# aiohttp 3.14 has no public hook for a connection's frames. Both its server
# (web_protocol.RequestHandler) and client (client_proto.ResponseHandler) protocols
# hand every read of an upgraded connection to ``_payload_parser.feed_data`` and
# call its ``feed_eof`` on connection loss; both WebSocket classes keep that parser
# as ``_parser``, their message queue as ``_reader`` (whose ``_buffer`` deque holds
# what is not yet received) and their writer (with public ``protocol`` and
# ``transport``) as ``_writer``. If any of that is not as expected, :func:`attach`
# returns None and the bridge stays on the message path.


def attach(
    source: _Socket,
    sink: _Socket,
    *,
    masked: bool,
    max_size: int,
    is_open: Callable[[], bool],
    on_frames: Callable[[int, int], None],
    observer: MessageSink | None,
    hold: Callable[[int], bool] | None = None,
    divert: Callable[[], bool] | None = None,
) -> FrameLane | None:
    """Put a lane in front of ``source``'s parser, forwarding to ``sink``; None if unsafe."""
    src: Any = source  # the private attributes named above
    dst: Any = sink
    try:
        parser = src._parser
        queue = src._reader
        source_protocol = src._writer.protocol
        sink_protocol = dst._writer.protocol
        compressed = src._writer.compress or dst._writer.compress
        queue._buffer  # noqa: B018 (the lane reads it)
        parsing = source_protocol._payload_parser
    except AttributeError:
        return None
    if parser is None or parsing is not parser or compressed or sink_protocol.transport is None:
        return None
    lane = FrameLane(
        parser,
        queue,
        source_protocol,
        sink_protocol,
        masked=masked,
        max_size=max_size,
        is_open=is_open,
        on_frames=on_frames,
        observer=observer,
        hold=hold,
        divert=divert,
    )
    source_protocol._payload_parser = lane
    return lane


def stop_reading(ws: _Socket) -> None:
    """Nothing more will be read from ``ws``'s peer (its lane refused to hold more):
    closing it then sends relayd's CLOSE and drops the connection at once, instead
    of waiting for a reply its parser, stopped mid-message, could never see."""
    reader: Any = ws._reader
    if reader is not None:
        reader.set_exception(ConnectionAbortedError("relayd stopped reading this peer"))


def release(ws: _Socket) -> None:
    """Cancel ``ws``'s heartbeat for good.

    aiohttp 3.14.5 can re-arm the heartbeat of a closed WebSocket (a read during
    the closing handshake schedules a reset), which keeps it, and the session it
    belongs to, alive until the timer fires (up to the heartbeat interval).
    """
    ws._cancel_heartbeat()
