"""Load worker processes: separate from the servers and from the parent's sampler.

Each worker is a spawned Python process that serves jobs from a pipe. A job that
overruns its time limit gets its worker killed and replaced, so no wait is unbounded.
"""

from __future__ import annotations

import multiprocessing
import resource
import signal
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

from bench.load import Job, run_job

__all__ = ["LoadPool", "raise_fd_limit"]

_CONTEXT = multiprocessing.get_context("spawn")  # no forked copies of the parent's threads


def raise_fd_limit() -> int:
    """Lift RLIMIT_NOFILE to the hard limit (1,000 streams need ~2,000 fds per hop)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _serve(conn: Connection) -> None:
    # Ctrl-C is the parent's to handle: it stops us once the servers are down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise_fd_limit()
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        try:
            conn.send({"ok": True, "result": run_job(job)})
        except Exception:
            conn.send({"ok": False, "error": traceback.format_exc()})


class _Worker:
    def __init__(self, index: int) -> None:
        self.conn, child = _CONTEXT.Pipe()
        self.proc = _CONTEXT.Process(
            target=_serve, args=(child,), name=f"bench-load-{index}", daemon=True
        )
        self.proc.start()
        child.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.proc.join(timeout=2)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=2)
        self.conn.close()


class LoadPool:
    """``size`` workers; ``run()`` hands one job to each of the first ``len(jobs)``."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._workers = [_Worker(i) for i in range(size)]

    def run(self, jobs: list[Job], timeout: float) -> list[dict[str, Any]]:
        if len(jobs) > self.size:
            raise ValueError(f"{len(jobs)} jobs for {self.size} workers")
        busy = self._workers[: len(jobs)]
        for worker, job in zip(busy, jobs, strict=True):
            worker.conn.send(job)
        deadline = time.monotonic() + timeout  # workers run in parallel: one limit
        answers: list[dict[str, Any]] = []
        for index, worker in enumerate(busy):
            if not worker.conn.poll(max(0.0, deadline - time.monotonic())):
                for late in range(index, len(busy)):  # their answers would arrive out of turn
                    self._replace(late)
                raise TimeoutError(f"load job {jobs[index]['kind']} overran {timeout:.0f}s")
            try:
                answers.append(worker.conn.recv())
            except (EOFError, OSError) as exc:  # the worker died (OOM killer, signal)
                for late in range(index, len(busy)):
                    self._replace(late)
                raise RuntimeError(f"load worker {index} died: {exc!r}") from exc
        for answer, job in zip(answers, jobs, strict=True):
            if not answer["ok"]:
                raise RuntimeError(f"load job {job['kind']} failed:\n{answer['error']}")
        return [answer["result"] for answer in answers]

    def _replace(self, index: int) -> None:
        self._workers[index].proc.kill()
        self._workers[index].stop()
        self._workers[index] = _Worker(index)

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()
