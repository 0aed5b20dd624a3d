"""RSS of a server while a transfer passes through it, sampled from a thread."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from types import TracebackType

from bench.procs import rss_bytes

__all__ = ["RssSampler"]

MiB = 1024 * 1024


class RssSampler:
    """Sample the summed VmRSS of ``pids`` every ``interval`` seconds inside a ``with``.

    ``baseline`` is the reading taken on entry (before the transfer starts), ``peak``
    the highest reading seen, ``growth`` their difference. A 50 ms period catches
    any buffer that lives as long as a couple of socket reads at these speeds.
    """

    def __init__(self, pids: Sequence[int], interval: float = 0.05) -> None:
        self._pids = list(pids)
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self.baseline = 0
        self.peak = 0
        self.samples = 0

    def __enter__(self) -> RssSampler:
        self.baseline = self.peak = rss_bytes(self._pids)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sample()  # the end state counts too

    def _sample(self) -> None:
        self.peak = max(self.peak, rss_bytes(self._pids))
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    @property
    def growth(self) -> int:
        return self.peak - self.baseline

    def figures(self) -> dict[str, float]:
        return {"peak_rss_mib": self.peak / MiB, "rss_growth_mib": self.growth / MiB}
