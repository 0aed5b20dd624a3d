"""Attempts per client address within a window: wrong relay keys typed on the login
page, and client registrations. Past the limit, that address is refused until the
window has passed.

Two backends, one contract (:class:`AttemptLimit`), chosen by :func:`attempt_limit`:

- :class:`MemoryAttemptLimit`, in each process's memory (``[store] backend =
  "local"``): with several workers each counts its own share, which only multiplies
  the bound by the worker count; a relay key's 16 or more random characters stay far
  out of reach of any such rate. The window slides (the last ``attempts`` times).
- :class:`RedisAttemptLimit`, on the shared server: every worker and instance counts
  together (``INCR``, the window set by the first attempt: a fixed window, which
  lets at most twice the limit through across a window's edge).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Final, Protocol

from relayd.config import Settings
from relayd.store.deadlines import bounded
from relayd.store.redis import key

__all__ = ["AttemptLimit", "MemoryAttemptLimit", "RedisAttemptLimit", "attempt_limit"]

if TYPE_CHECKING:
    from redis import asyncio as aioredis

_MAX_ADDRESSES: Final = 10_000  # beyond this the oldest address is forgotten


class AttemptLimit(Protocol):
    async def retry_after(self, address: str) -> float | None:
        """Seconds until ``address`` may try again, or None if it may now."""
        ...

    async def record(self, address: str) -> None:
        """Count one attempt of ``address``."""
        ...


def attempt_limit(
    settings: Settings, client: aioredis.Redis | None, name: str, attempts: int, window_s: float
) -> AttemptLimit:
    """The limit ``name`` on the backend ``[store] backend`` names."""
    if client is not None and settings.store.backend == "redis":
        return RedisAttemptLimit(client, settings, name, attempts, window_s)
    return MemoryAttemptLimit(attempts, window_s)


class MemoryAttemptLimit:
    __slots__ = ("_attempts", "_seen", "_window")

    def __init__(self, attempts: int, window_s: float) -> None:
        self._attempts = attempts
        self._window = window_s
        self._seen: OrderedDict[str, deque[float]] = OrderedDict()

    async def retry_after(self, address: str) -> float | None:
        times = self._recent(address)
        if times is None or len(times) < self._attempts:
            return None
        return max(1.0, times[0] + self._window - time.monotonic())

    async def record(self, address: str) -> None:
        times = self._recent(address)
        if times is None:
            times = self._seen[address] = deque(maxlen=self._attempts)
            if len(self._seen) > _MAX_ADDRESSES:
                self._seen.popitem(last=False)
        times.append(time.monotonic())
        self._seen.move_to_end(address)

    def _recent(self, address: str) -> deque[float] | None:
        times = self._seen.get(address)
        if times is None:
            return None
        horizon = time.monotonic() - self._window
        while times and times[0] <= horizon:
            times.popleft()
        return times


class RedisAttemptLimit:
    """One counter per address, ``<prefix>:attempts:<name>:<address>``, expiring with
    its window."""

    def __init__(
        self,
        client: aioredis.Redis,
        settings: Settings,
        name: str,
        attempts: int,
        window_s: float,
    ) -> None:
        self._client = client
        self._settings = settings
        self._name = name
        self._attempts = attempts
        self._window_ms = max(1, int(window_s * 1000))

    def _key(self, address: str) -> str:
        return key(self._settings, "attempts", self._name, address)

    async def retry_after(self, address: str) -> float | None:
        async with bounded(self._settings, "reading an attempt count"):
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.get(self._key(address))
                pipe.pttl(self._key(address))
                count, left_ms = await pipe.execute()
        if count is None or int(count) < self._attempts:
            return None
        return max(1.0, int(left_ms) / 1000)

    async def record(self, address: str) -> None:
        async with bounded(self._settings, "counting an attempt"):
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.incr(self._key(address))
                pipe.pexpire(self._key(address), self._window_ms, nx=True)  # the first sets it
                await pipe.execute()
