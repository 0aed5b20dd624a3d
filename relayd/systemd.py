"""systemd integration without a dependency: sd_notify and socket activation.

Protocols (systemd man pages sd_notify(3), sd_watchdog_enabled(3), sd_listen_fds(3)):

- notify: one datagram of newline-separated ``KEY=VALUE`` pairs to the AF_UNIX
  socket in ``$NOTIFY_SOCKET`` (a leading ``@`` names an abstract socket). Unset
  means "not under systemd": every call is a no-op.
- watchdog: enabled when ``$WATCHDOG_USEC`` is set and ``$WATCHDOG_PID`` is unset or
  ours; ping at half the interval, from the event loop, so a wedged loop stops the
  pings and systemd restarts the service.
- socket activation: fds from 3 on, ``$LISTEN_FDS`` of them, honoured only when
  ``$LISTEN_PID`` is ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import MutableMapping
from typing import Final

__all__ = ["Notifier", "listen_sockets", "watchdog_interval"]

SD_LISTEN_FDS_START: Final = 3


class Notifier:
    """Sends sd_notify messages; silent when not started by systemd."""

    def __init__(self, address: str | None) -> None:
        if address and address.startswith("@"):
            address = "\0" + address[1:]
        self._address = address or None

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        # Popped so that child processes (workers) do not talk to systemd themselves.
        return cls(env.pop("NOTIFY_SOCKET", None))

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, **fields: str) -> bool:
        """Send ``KEY=VALUE`` pairs (``ready="1"`` → ``READY=1``); False if not sent."""
        if self._address is None:
            return False
        message = "\n".join(f"{key.upper()}={value}" for key, value in fields.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self._address)
                sock.sendall(message.encode())
        except OSError:
            return False  # systemd gone or socket unwritable: never fatal for the relay
        return True

    def ready(self, status: str) -> None:
        self.send(ready="1", status=status, mainpid=str(os.getpid()))

    def status(self, status: str) -> None:
        self.send(status=status)

    def stopping(self, status: str) -> None:
        self.send(stopping="1", status=status)

    def reloading(self, status: str) -> None:
        self.send(reloading="1", status=status)

    async def watchdog(self, interval: float) -> None:
        """Ping every ``interval`` seconds until cancelled."""
        while True:
            self.send(watchdog="1")
            await asyncio.sleep(interval)


def watchdog_interval(environ: MutableMapping[str, str] | None = None) -> float | None:
    """Half the watchdog timeout in seconds, or None when the watchdog is off."""
    env = os.environ if environ is None else environ
    usec = env.pop("WATCHDOG_USEC", None)
    pid = env.pop("WATCHDOG_PID", None)
    if not usec or (pid and pid != str(os.getpid())):
        return None
    with contextlib.suppress(ValueError):
        value = int(usec)
        if value > 0:
            return value / 2 / 1_000_000
    return None


def listen_sockets(environ: MutableMapping[str, str] | None = None) -> list[socket.socket]:
    """Sockets passed by systemd socket activation (consumed from the environment)."""
    env = os.environ if environ is None else environ
    pid = env.pop("LISTEN_PID", None)
    count = env.pop("LISTEN_FDS", None)
    env.pop("LISTEN_FDNAMES", None)
    if not count or pid != str(os.getpid()):
        return []
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)):
        os.set_inheritable(fd, False)
        sockets.append(socket.socket(fileno=fd))  # family and type are detected
    return sockets
