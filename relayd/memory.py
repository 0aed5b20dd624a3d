"""What relayd holds in memory on a client's behalf, bounded, and given back.

Pass-through bodies stream and cost a chunk each. What relayd must hold whole (a
JSON body it parses: the Actions wrappers, ``:stream``, realtime policy checks; a
file fetched from a user's link; an unfinished WebSocket message) is counted in
one :class:`BufferBudget`, process-wide and per relay key (issue 11: a single
key once took a 512 MiB unit down with concurrent 31 MiB uploads, and realtime
sessions each holding most of a 16 MiB message). Bytes are reserved *before*
they are read; a reservation that does not fit is refused at once, with the
answer the caller should get:

- the request alone needs more than a key's share: 413 (no retry can help);
- the key's share is used up: 429 ``relay_rate_limit_exceeded`` (this key should
  slow down; other keys are served);
- the process's budget is used up: 503 ``relay_overloaded`` (anyone may retry).

The 429 and the 503 carry ``Retry-After``. What fits is never refused, and a
lease is released when its request or session ends. The interpreter and the C
allocator keep freed memory for reuse, so a large release is followed (at most
every few seconds) by a full collection and glibc's ``malloc_trim(0)``: the
resident set shrinks back instead of staying at its peak.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import time
from collections.abc import Callable
from typing import Final

from aiohttp import web

from relayd.errors import (
    OverloadedError,
    PayloadTooLargeError,
    RelaydError,
    RelayRateLimitError,
)
from relayd.state import BUDGET, BUFFERED, KEY, KEYRING, booked

__all__ = [
    "BufferBudget",
    "Lease",
    "MemoryReturn",
    "buffer_lease",
    "release_buffers",
    "share_key",
]

MiB: Final = 1024 * 1024
RETRY_AFTER_S: Final = "1"


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None elsewhere (musl, macOS)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class MemoryReturn:
    """Gives freed memory back to the operating system after large releases.

    ``released(n)`` is cheap and may be called anywhere on the loop; once at least
    ``threshold`` bytes were released, one collection and trim runs, no sooner than
    ``interval`` seconds after the last (a full ``gc.collect()`` and a trim of a
    large heap take milliseconds; done on every release they would show up in
    latency). Cycles are collected first: a dropped connection's objects (a
    WebSocket's parser with its buffered message) often sit in a reference cycle.
    """

    def __init__(self, *, threshold: int = 4 * MiB, interval: float = 2.0) -> None:
        self._threshold = threshold
        self._interval = interval
        self._pending = 0
        self._last = -interval
        self._scheduled: asyncio.TimerHandle | None = None
        self._trim = _malloc_trim()

    def released(self, size: int) -> None:
        self._pending += size
        if self._pending < self._threshold or self._scheduled is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a unit test): nothing runs later
        delay = max(0.0, self._last + self._interval - time.monotonic())
        # Later, not now: the caller is often still holding what it released.
        self._scheduled = loop.call_later(max(delay, 0.05), self.give_back)

    def give_back(self, *, again: bool = True) -> None:
        self._scheduled = None
        self._pending = 0
        self._last = time.monotonic()
        gc.collect()
        if self._trim is not None:
            self._trim(0)
        if again:
            # What was announced may be let go of a moment later (a closing
            # connection's task still held it, longer on a busy machine): look once
            # more, ``interval`` later, whether or not more is announced meanwhile.
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._scheduled = loop.call_later(self._interval, self._give_back_again)

    def _give_back_again(self) -> None:
        self.give_back(again=False)

    def close(self) -> None:
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None


class BufferBudget:
    """Bytes held whole for clients: at most ``total`` in all, ``per_key`` per key.

    A lease made for no key (keyless mode, or a single configured key: see
    :func:`share_key`) counts against the process-wide budget only.
    """

    def __init__(
        self, total: int, per_key: int, *, memory_return: MemoryReturn | None = None
    ) -> None:
        self.total = total
        self.per_key = per_key
        self.held = 0
        self._by_key: dict[str, int] = {}
        self._return = memory_return

    def lease(self, key: str | None) -> Lease:
        return Lease(self, key)

    def close(self) -> None:
        """Cancel a pending return of memory (the app is shutting down)."""
        if self._return is not None:
            self._return.close()

    def held_by(self, key: str) -> int:
        return self._by_key.get(key, 0)

    def _change(self, key: str | None, delta: int, mine: int) -> None:
        """Apply ``delta`` bytes for ``key`` to a lease that would then hold ``mine``;
        a growth that does not fit raises."""
        if delta > 0:
            if mine > min(self.per_key if key is not None else self.total, self.total):
                # No retry can help a request that needs more than a whole share.
                raise PayloadTooLargeError(
                    f"This request needs more than the {min(self.per_key, self.total)} "
                    "bytes of memory the relay holds for one key at once.",
                    code="request_too_large",
                )
            if key is not None and self._by_key.get(key, 0) + delta > self.per_key:
                raise RelayRateLimitError(
                    f"This relay key holds {self._by_key.get(key, 0) + delta} bytes of "
                    f"request bodies and messages in the relay at once, over its share "
                    f"of {self.per_key}; retry when earlier requests have finished.",
                    headers={"Retry-After": RETRY_AFTER_S},
                )
            if self.held + delta > self.total:
                raise OverloadedError(
                    "The relay holds as many request bodies and messages as its memory "
                    "budget allows; retry shortly.",
                    headers={"Retry-After": RETRY_AFTER_S},
                )
        self.held += delta
        if key is not None:
            left = self._by_key.get(key, 0) + delta
            if left:
                self._by_key[key] = left
            else:
                self._by_key.pop(key, None)
        if delta < 0 and self._return is not None:
            self._return.released(-delta)


class Lease:
    """One request's (or one WebSocket session's) share of a :class:`BufferBudget`."""

    __slots__ = ("_budget", "_key", "held")

    def __init__(self, budget: BufferBudget, key: str | None) -> None:
        self._budget = budget
        self._key = key
        self.held = 0

    def grow(self, size: int) -> None:
        """Reserve ``size`` more bytes, or raise the refusal (429 or 503)."""
        if size > 0:
            self._budget._change(self._key, size, self.held + size)
            self.held += size

    def hold(self, size: int) -> RelaydError | None:
        """Make the reservation exactly ``size`` bytes; the refusal, if it cannot grow
        (the reservation is then unchanged)."""
        try:
            self._budget._change(self._key, size - self.held, size)
        except RelaydError as exc:
            return exc
        self.held = size
        return None

    def release(self) -> None:
        if self.held:
            self._budget._change(self._key, -self.held, 0)
            self.held = 0


def share_key(request: web.Request) -> str | None:
    """The relay key whose fair shares (of this budget, of upstream connections) the
    request counts against: None without a key, and None while only one key is
    configured, since a share exists to protect the other keys and a lone key
    would only be held below what the relay has."""
    key = request.get(KEY)
    if key is None or len(request.app[KEYRING].keys) < 2:
        return None
    name: str = key.name
    return name


def buffer_lease(request: web.Request) -> Lease:
    """The request's lease on the app's budget (one per request, made on first use)."""
    lease = booked(request).get(BUFFERED)
    if lease is None:
        lease = request[BUFFERED] = request.app[BUDGET].lease(share_key(request))
    return lease


def release_buffers(request: web.Request) -> None:
    """Give the request's reservation back (its handler has returned)."""
    lease = booked(request).get(BUFFERED)
    if lease is not None:
        lease.release()
