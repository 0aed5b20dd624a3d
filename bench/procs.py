"""Server processes for a run: start in their own process group, wait, measure, stop.

Every server is a separate OS process on 127.0.0.1 with its output in a log file
(never a pipe: a pipe nobody drains would block a chatty server mid-benchmark).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Server",
    "cpu_seconds",
    "fd_count",
    "free_port",
    "listen_overflows",
    "machine_busy_seconds",
    "rss_bytes",
    "start_server",
    "tree_pids",
    "upstream_connections",
]

HOST = "127.0.0.1"


def free_port() -> int:
    """A port the kernel just had free on loopback (another process could still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait (bounded) until the port accepts a connection; fail if the process dies."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} before listening:\n"
                    f"{self.log_tail()}"
                )
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not listen on {HOST}:{self.port} in {timeout}s")

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the whole process group, then SIGKILL whatever is left."""
        for signum in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, signum)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=timeout)
                if signum == signal.SIGTERM:
                    # The leader is gone; children (nginx workers) may linger briefly.
                    os.killpg(self.proc.pid, signal.SIGKILL)
                return
            except ProcessLookupError:
                return
            except subprocess.TimeoutExpired:
                continue


def start_server(
    name: str,
    argv: Sequence[str],
    *,
    port: int,
    log: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Server:
    with log.open("wb") as out:
        # start_new_session: the server and its children get their own process group,
        # so stop() reaches nginx's worker too and a Ctrl-C here does not hit them.
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )
    return Server(name, proc, port, log)


def _parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces: split after it.
    return int(stat.rsplit(")", 1)[1].split()[1])


def tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants (nginx: master and workers)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            parent = _parent_of(int(entry))
            if parent is not None:
                parents[int(entry)] = parent
    found = [root]
    for pid in found:
        found.extend(child for child, parent in parents.items() if parent == pid)
    return found


def rss_bytes(pids: Sequence[int]) -> int:
    """Summed VmRSS of ``pids``; processes that are gone count as zero."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


def cpu_seconds(pids: Sequence[int], *, main_thread: bool = False) -> float:
    """User plus system CPU time of ``pids`` so far; processes that are gone count zero.
    ``main_thread``: only each process's first thread (relayd's event loop), not the
    threads beside it (the ledger's, the resolver's)."""
    ticks = 0
    for pid in pids:
        where = f"/proc/{pid}/task/{pid}/stat" if main_thread else f"/proc/{pid}/stat"
        try:
            stat = Path(where).read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime: stat(5) fields 14, 15
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU time every core of this machine has spent busy so far (``/proc/stat``: all
    but idle and iowait), whoever spent it: the proxy, the fake, the load, anyone."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    ticks = [int(value) for value in fields[:8]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def listen_overflows() -> int:
    """The kernel's count of connections dropped because an accept queue was full.

    System-wide, but only one target is loaded at a time, so a rise during a run
    belongs to that target's listener (or, for relays, to the fake behind it).
    """
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return int(table.get("ListenOverflows", 0))
    return 0


def fd_count(pid: int) -> int:
    """Open file descriptors of ``pid`` (0 if it is gone)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def _socket_inodes(pid: int) -> set[str]:
    inodes: set[str] = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for name in names:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue  # closed meanwhile
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    return inodes


def upstream_connections(pid: int, port: int) -> int:
    """ESTABLISHED TCP connections held by ``pid`` to a remote ``port`` on any address.

    /proc/<pid>/net/tcp lists the whole network namespace; a row belongs to ``pid``
    when its socket inode is one of the process's fds.
    """
    inodes = _socket_inodes(pid)
    count = 0
    for table in ("tcp", "tcp6"):
        try:
            rows = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            # fields: sl local_address rem_address st ... uid timeout inode
            if fields[3] == "01" and int(fields[2].rsplit(":", 1)[1], 16) == port:
                count += fields[9] in inodes
    return count
