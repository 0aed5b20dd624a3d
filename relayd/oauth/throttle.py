"""Attempts per client address within a window: wrong relay keys typed on the login
page, and client registrations. Past the limit, that address is refused until the
window has passed.

Kept in each process's memory: with several workers each counts its own share,
which only multiplies the bound by the worker count; a relay key's 16 or more
random characters stay far out of reach of any such rate.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from typing import Final

__all__ = ["PerAddressLimit"]

_MAX_ADDRESSES: Final = 10_000  # beyond this the oldest address is forgotten


class PerAddressLimit:
    __slots__ = ("_attempts", "_seen", "_window")

    def __init__(self, attempts: int, window_s: float) -> None:
        self._attempts = attempts
        self._window = window_s
        self._seen: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, address: str) -> float | None:
        """Seconds until ``address`` may try again, or None if it may now."""
        times = self._recent(address)
        if times is None or len(times) < self._attempts:
            return None
        return max(1.0, times[0] + self._window - time.monotonic())

    def record(self, address: str) -> None:
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
