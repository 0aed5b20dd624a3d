"""A real ``redis-server`` on a loopback port, for the shared-store tests.

Each :class:`RedisServer` runs the Debian package's binary with a temporary
directory, no persistence and no other listeners; :meth:`stop` and :meth:`start`
take it away and bring it back on the same port (the failure tests). Without the
binary a test skips loudly, unless ``RELAYD_REQUIRE_REDIS`` is set (``.ci/run``),
where it fails.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

__all__ = ["RedisServer", "redis_binary"]

START_TIMEOUT_S = 10.0


def redis_binary() -> str:
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if found is None:
        message = "redis-server is not installed (apt-get install -y redis-server)"
        if os.environ.get("RELAYD_REQUIRE_REDIS"):
            pytest.fail(message)
        pytest.skip(f"LOUD SKIP: {message}")
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1:``port``."""

    def __init__(
        self,
        directory: Path,
        *,
        password: str | None = None,
        tls: tuple[Path, Path, Path] | None = None,
    ) -> None:
        self.directory = directory
        self.port = _free_port()
        self.password = password
        # (certificate, key, CA): also serve TLS on tls_port (tls_url); the plain
        # port stays for start-up probes and flush().
        self.tls = tls
        self.tls_port = _free_port() if tls is not None else None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def tls_url(self) -> str:
        assert self.tls_port is not None, "started without tls"
        return f"rediss://127.0.0.1:{self.tls_port}/0"

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        if self.process is not None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            redis_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "no",
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        if self.tls is not None:
            cert, key, ca = self.tls
            args += [
                "--tls-port", str(self.tls_port),
                "--tls-cert-file", str(cert),
                "--tls-key-file", str(key),
                "--tls-ca-cert-file", str(ca),
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._answers():
            if self.process.poll() is not None:
                log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited at start:\n{log}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("redis-server did not answer within 10 s")
            time.sleep(0.02)

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(self._auth() + b"PING\r\n")
                reply = b""
                while b"PONG" not in reply and b"LOADING" not in reply:
                    chunk = sock.recv(256)
                    if not chunk:
                        return False
                    reply += chunk
                return b"PONG" in reply
        except OSError:
            return False

    def _auth(self) -> bytes:
        """The AUTH command to send first, when the server has a password."""
        if not self.password:
            return b""
        word = self.password.encode()
        return b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(word), word)

    def stop(self) -> None:
        """Stop the server now (SIGKILL: a crash, not a shutdown), and wait for it."""
        if self.process is None:
            return
        self.process.kill()
        self.process.wait(timeout=10)
        self.process = None

    def flush(self) -> None:
        """Forget every key (between tests sharing one server)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
            sock.sendall(self._auth() + b"FLUSHALL\r\n")
            reply = b""
            while reply.count(b"\r\n") < (2 if self.password else 1):
                chunk = sock.recv(256)
                if not chunk:
                    break
                reply += chunk
            if b"-ERR" in reply or b"-NOAUTH" in reply:
                raise RuntimeError(f"FLUSHALL failed: {reply!r}")
