"""``--workers N``: N relayd processes on one port, under a small supervisor.

Each worker binds the port itself with SO_REUSEPORT, so the kernel spreads new
connections evenly across them (a shared accept queue would favour whichever
process wakes first). The supervisor first binds a never-listening socket on the
port, so that ``:0`` resolves once and a port is not lost between restarts. That
socket has SO_REUSEADDR but not SO_REUSEPORT: the kernel lets the workers' listening
sockets join it, but refuses a bind without SO_REUSEPORT while they listen, so a
second relayd on the port fails right there instead of silently taking half of the
connections with another configuration (issue 11). With systemd socket activation
the passed sockets are handed to every worker instead.

The supervisor tells systemd ``READY=1`` once every worker reported its sites up,
pets the watchdog, passes SIGTERM and SIGHUP on, restarts a worker that died
unexpectedly, and exits when all workers have drained.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import tempfile
from pathlib import Path

from relayd.config import Settings
from relayd.loopback import socket_label
from relayd.preflight import bind_error
from relayd.server import (
    INHERITED_FDS_ENV,
    READY_FD_ENV,
    loop_factory,
    refuse_keyless_sockets,
    warn_if_keyless,
)
from relayd.store.grants import forget_remembered_grants
from relayd.systemd import Notifier, listen_sockets, watchdog_interval
from relayd.tasks import spawn

__all__ = ["supervise"]

log = logging.getLogger("relayd.workers")

WORKER_ENV = "RELAYD_WORKER"
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
START_TIMEOUT_S = 30.0
RESTART_DELAY_S = 1.0


def supervise(settings: Settings, argv: list[str]) -> int:
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(_Supervisor(settings, argv).run())


class _Supervisor:
    def __init__(self, settings: Settings, argv: list[str]) -> None:
        self._settings = settings
        self._argv = argv
        self._notifier = Notifier.from_environ()
        self._watchdog = watchdog_interval()
        self._stopping = False
        self._workers: dict[int, asyncio.subprocess.Process] = {}
        self._inherited = listen_sockets()
        self._reserved: socket.socket | None = None
        self._env = dict(os.environ)

    def _reserve_port(self) -> str:
        listen = self._settings.server.listen
        assert listen.host is not None and listen.port is not None
        family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((listen.host, listen.port))
        except OSError as exc:
            sock.close()
            raise bind_error(exc, listen) from None
        self._reserved = sock
        port = sock.getsockname()[1]
        host = f"[{listen.host}]" if family == socket.AF_INET6 else listen.host
        return f"{host}:{port}"

    async def run(self) -> int:
        self._env[WORKER_ENV] = "1"
        if self._inherited:
            refuse_keyless_sockets(self._settings, self._inherited)
            self._env[INHERITED_FDS_ENV] = ",".join(str(s.fileno()) for s in self._inherited)
        else:
            self._env["RELAYD_LISTEN"] = self._reserve_port()
        sockets = self._inherited or ([self._reserved] if self._reserved else [])
        warn_if_keyless(
            self._settings, ", ".join(socket_label(s.family, s.getsockname()) for s in sockets)
        )
        metrics_dir = tempfile.TemporaryDirectory(prefix="relayd-metrics-")
        self._env.setdefault(METRICS_DIR_ENV, metrics_dir.name)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._signal_all, signal.SIGHUP)
        try:
            count = self._settings.server.workers
            started = await asyncio.gather(*(self._start(i) for i in range(count)))
            if not all(started):
                log.error("not every worker started; stopping")
                return 1
            where = self._env.get("RELAYD_LISTEN", "inherited sockets")
            self._notifier.ready(f"serving with {count} workers on {where}")
            log.info("%d workers serving", count)
            pinger = (
                spawn(self._notifier.watchdog(self._watchdog), name="relayd.watchdog")
                if self._watchdog
                else None
            )
            await stop.wait()
            if pinger is not None:
                pinger.cancel()
            return await self._stop()
        finally:
            metrics_dir.cleanup()
            if self._reserved is not None:
                self._reserved.close()

    async def _start(self, index: int) -> bool:
        read_fd, write_fd = os.pipe()
        env = {**self._env, READY_FD_ENV: str(write_fd)}
        pass_fds = [write_fd, *(s.fileno() for s in self._inherited)]
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relayd", *self._argv, env=env, pass_fds=pass_fds
        )
        os.close(write_fd)
        self._workers[index] = process
        spawn(self._watch(index, process), name=f"relayd.worker.{index}")
        loop = asyncio.get_running_loop()
        readable: asyncio.Future[None] = loop.create_future()

        def on_readable() -> None:
            if not readable.done():
                readable.set_result(None)

        loop.add_reader(read_fd, on_readable)
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                await readable
            ready = os.read(read_fd, 1)  # b"" if the worker died before its sites started
        except TimeoutError:
            ready = b""
        finally:
            loop.remove_reader(read_fd)
            os.close(read_fd)
        return ready == b"1"

    async def _watch(self, index: int, process: asyncio.subprocess.Process) -> None:
        code = await process.wait()
        if self._stopping or self._workers.get(index) is not process:
            return
        log.error("worker %d (pid %d) exited with %s; restarting", index, process.pid, code)
        forget_remembered_grants(self._settings)  # it may have died mid-revocation
        await asyncio.sleep(RESTART_DELAY_S)
        if not self._stopping:
            await self._start(index)

    def _signal_all(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            self._notifier.reloading("reloading keys and policy in every worker")
        for process in self._workers.values():
            if process.returncode is None:
                process.send_signal(signum)
        if signum == signal.SIGHUP:
            self._notifier.send(ready="1", status="serving (reloaded)")

    async def _stop(self) -> int:
        self._stopping = True
        drain = self._settings.server.drain_timeout_s
        self._notifier.stopping(f"draining workers for up to {drain:.0f}s")
        self._signal_all(signal.SIGTERM)
        waits = [p.wait() for p in self._workers.values()]
        try:
            # aiohttp waits up to the drain time, then cancels and waits once more.
            async with asyncio.timeout(2 * drain + 5):
                codes = await asyncio.gather(*waits)
        except TimeoutError:
            for process in self._workers.values():
                if process.returncode is None:
                    process.kill()
            return 1
        return 0 if all(code == 0 for code in codes) else 1


def is_worker() -> bool:
    return os.environ.get(WORKER_ENV) == "1"


def metrics_dir() -> Path | None:
    value = os.environ.get(METRICS_DIR_ENV)
    return Path(value) if value else None
