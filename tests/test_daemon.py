"""relayd as a real process: systemd notify, socket activation, drain, reload, workers.

Reloads that remove a relay key end what it opened (issue 11, item 7), and a reload
never drops relayd into keyless mode by accident.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestServer

from relayd.store.grants import EPOCH_FILENAME
from tests.conftest import OTHER_KEY, RELAY_KEY, SECRETS
from tests.fakes.openai import UPSTREAM_KEY, FakeOpenAI
from tests.filehost import PNG

pytestmark = pytest.mark.process

OLD_KEY = "rk-canary-old-key-00000000000000"
NEW_KEY = "rk-canary-new-key-11111111111111"
_LISTENING = re.compile(r"listening on https?://127\.0\.0\.1:(\d+)")


class Relayd:
    """A ``relayd serve`` child process whose stderr is collected line by line."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self.port: int | None = None
        self._changed = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.lines.append(line)
            if self.port is None and (match := _LISTENING.search(line)):
                self.port = int(match.group(1))
            self._changed.set()
        self._changed.set()  # the end of the log: a waiter sees that relayd exited

    async def wait_line(self, needle: str, timeout: float = 10) -> str:
        async with asyncio.timeout(timeout):
            while True:
                for line in self.lines:
                    if needle in line:
                        return line
                if self.process.returncode is not None and self._reader.done():
                    raise AssertionError("relayd exited; log:\n" + "\n".join(self.lines))
                self._changed.clear()
                await self._changed.wait()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.process.returncode is None:
            self.process.send_signal(sig)
        async with asyncio.timeout(timeout):
            code = await self.process.wait()
            await self._reader
        return code


def _env(upstream: str, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPENAI_", "RELAYD_", "NOTIFY_", "LISTEN_", "WATCHDOG_"))
    }
    env.update(
        OPENAI_API_KEY=UPSTREAM_KEY,
        RELAYD_UPSTREAM=upstream,
        RELAYD_LISTEN="127.0.0.1:0",
        RELAYD_KEYS=f"team:{RELAY_KEY}",
    )
    env.update(extra)
    return env


Start = Callable[..., Any]


@pytest.fixture
async def start(fake_server: TestServer) -> AsyncIterator[Start]:
    started: list[Relayd] = []

    async def start(
        *args: str,
        env: dict[str, str] | None = None,
        wait: bool = True,
        serve_args: tuple[str, ...] = (),
        **kwargs: Any,
    ) -> Relayd:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "relayd",
            *args,
            "serve",
            *serve_args,
            env=env or _env(str(fake_server.make_url("")).rstrip("/")),
            stderr=asyncio.subprocess.PIPE,
            # Its own process group: a supervisor and its workers are reaped together.
            start_new_session=True,
            **kwargs,
        )
        relayd = Relayd(process)
        started.append(relayd)
        if wait:
            await relayd.wait_line("listening on")
        return relayd

    yield start
    for relayd in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(relayd.process.pid, signal.SIGKILL)  # workers too, if any are left
        await relayd.process.wait()
        relayd._reader.cancel()
        log = "\n".join(relayd.lines)
        for secret in (*SECRETS, OLD_KEY, NEW_KEY):
            assert secret not in log, "a secret reached relayd's log"


async def _stream(session: aiohttp.ClientSession, url: str, key: str) -> list[str]:
    events = []
    async with session.post(
        url,
        json={"model": "slow", "input": "hi", "stream": True},
        headers={"Authorization": f"Bearer {key}"},
    ) as response:
        assert response.status == 200
        async for line in response.content:
            if line.startswith(b"event: "):
                events.append(line.decode().strip().removeprefix("event: "))
    return events


async def test_notify_ready_only_once_listening_then_watchdog_and_stopping(
    start: Start, fake_server: TestServer, tmp_path: Path
) -> None:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    env = _env(
        str(fake_server.make_url("")).rstrip("/"), NOTIFY_SOCKET=path, WATCHDOG_USEC="200000"
    )
    try:
        relayd = await start(env=env, wait=False)
        async with asyncio.timeout(10):
            ready = (await loop.sock_recv(sock, 4096)).decode()
            assert "READY=1" in ready.splitlines()
            port = int(re.search(r"http://127\.0\.0\.1:(\d+)", ready).group(1))  # type: ignore[union-attr]
            # READY promises the port accepts: connect at once, no retry.
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            messages = [(await loop.sock_recv(sock, 4096)).decode() for _ in range(2)]
            assert all(m == "WATCHDOG=1" for m in messages)
            relayd.process.send_signal(signal.SIGTERM)
            while "STOPPING=1" not in (message := (await loop.sock_recv(sock, 4096)).decode()):
                assert message == "WATCHDOG=1"
        assert await relayd.stop() == 0
    finally:
        sock.close()


@contextlib.asynccontextmanager
async def socket_activated(
    env: dict[str, str], *serve_args: str, host: str = "127.0.0.1", listening: bool = True
) -> AsyncIterator[tuple[Relayd, int]]:
    """``relayd serve`` as systemd starts it, on a socket bound to ``host`` (listening
    unless told otherwise): fd 3, LISTEN_PID its own pid. Gives back relayd and the
    port; killed (process group) on the way out."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((host, 0))
    if listening:
        listener.listen()
    fd = listener.fileno()
    launcher = (
        f"import os, sys; os.dup2({fd}, 3); os.environ['LISTEN_FDS'] = '1';"
        "os.environ['LISTEN_PID'] = str(os.getpid());"
        "os.execv(sys.executable, [sys.executable, '-m', 'relayd', 'serve', "
        f"*{list(serve_args)!r}])"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        launcher,
        env=env,
        pass_fds=(fd,),
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        yield Relayd(process), listener.getsockname()[1]
    finally:
        listener.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_socket_activation_serves_on_the_passed_socket(
    start: Start, fake_server: TestServer, workers: str
) -> None:
    env = _env(str(fake_server.make_url("")).rstrip("/"), RELAYD_LISTEN="127.0.0.1:1")
    async with socket_activated(env, "--workers", workers) as (relayd, port):
        await relayd.wait_line(f"listening on http://127.0.0.1:{port}")
        if workers != "1":
            await relayd.wait_line(f"{workers} workers serving")
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/health") as response:
                assert response.status == 200
        assert await relayd.stop() == 0


async def test_sigterm_drains_streams_and_refuses_new_connections(
    start: Start, fake: FakeOpenAI, tmp_path: Path
) -> None:
    fake.pace = 1.0  # 7 events ≈ 5 s
    config = tmp_path / "relayd.toml"
    config.write_text("[server]\ndrain_timeout = 20\n")
    relayd = await start("--config", str(config))
    async with aiohttp.ClientSession() as session:
        stream = asyncio.ensure_future(_stream(session, relayd.url("/v1/responses"), RELAY_KEY))
        await fake.wait_for(lambda: bool(fake.seen), timeout=5)
        relayd.process.send_signal(signal.SIGTERM)
        await relayd.wait_line("stopping")
        with pytest.raises(aiohttp.ClientConnectionError):
            async with asyncio.timeout(5):
                await session.get(relayd.url("/health"))
        async with asyncio.timeout(15):
            events = await stream
    assert events[-1] == "response.completed"
    assert await relayd.stop() == 0


async def test_sighup_reloads_keys_without_dropping_streams(
    start: Start, fake_server: TestServer, fake: FakeOpenAI, tmp_path: Path
) -> None:
    fake.pace = 0.6  # about 4 s of stream
    keys = tmp_path / "keys"
    keys.write_text(f"old:{OLD_KEY}\n")
    env = _env(
        str(fake_server.make_url("")).rstrip("/"), RELAYD_KEYS="", RELAYD_KEYS_FILE=str(keys)
    )
    relayd = await start(env=env)
    async with aiohttp.ClientSession() as session:
        stream = asyncio.ensure_future(_stream(session, relayd.url("/v1/responses"), OLD_KEY))
        await fake.wait_for(lambda: bool(fake.seen), timeout=5)
        keys.write_text(f"# rotated\nnew:{NEW_KEY}\n")
        relayd.process.send_signal(signal.SIGHUP)
        line = await relayd.wait_line("reloaded")
        assert "added: new" in line and "removed: old" in line

        async def status(key: str) -> int:
            async with session.get(
                relayd.url("/v1/models"), headers={"Authorization": f"Bearer {key}"}
            ) as response:
                return response.status

        assert await status(NEW_KEY) == 200
        assert await status(OLD_KEY) == 401
        async with asyncio.timeout(10):
            events = await stream
    assert events[-1] == "response.completed"


async def test_two_workers_share_the_port_and_both_serve(
    start: Start, fake_server: TestServer
) -> None:
    relayd = await start(env=_env(str(fake_server.make_url("")).rstrip("/"), RELAYD_WORKERS="2"))
    await relayd.wait_line("2 workers serving")
    # Workers log "listening on" with the shared port; all of them the same.
    ports = {int(m.group(1)) for line in relayd.lines if (m := _LISTENING.search(line))}
    assert len(ports) == 1
    pids = set()
    auth = {"Authorization": f"Bearer {RELAY_KEY}"}  # the PID is for key holders
    async with asyncio.timeout(10):
        while len(pids) < 2:
            # A fresh connection each time, so the kernel may pick either worker.
            async with aiohttp.ClientSession() as session:
                async with session.get(relayd.url("/health"), headers=auth) as response:
                    pids.add((await response.json())["meta"]["pid"])
    assert relayd.process.pid not in pids
    assert await relayd.stop() == 0


async def test_a_worker_that_dies_makes_the_others_forget_remembered_tokens(
    start: Start, fake_server: TestServer, tmp_path: Path
) -> None:
    """A worker killed between committing a revocation and telling the others
    would leave them answering the token from memory: the supervisor tells them."""
    state = tmp_path / "state"
    env = _env(
        str(fake_server.make_url("")).rstrip("/"),
        RELAYD_WORKERS="2",
        RELAYD_STATE_DIR=str(state),
        RELAYD_PUBLIC_URL=PUBLIC,
    )
    relayd = await start(env=env)
    await relayd.wait_line("2 workers serving")
    epoch = state / EPOCH_FILENAME
    before = epoch.read_bytes()
    auth = {"Authorization": f"Bearer {RELAY_KEY}"}
    async with aiohttp.ClientSession() as session:
        async with session.get(relayd.url("/health"), headers=auth) as response:
            worker = (await response.json())["meta"]["pid"]
    os.kill(worker, signal.SIGKILL)
    await relayd.wait_line(f"(pid {worker}) exited")
    async with asyncio.timeout(5):
        while epoch.read_bytes() == before:
            await asyncio.sleep(0.02)
    async with asyncio.timeout(15):  # the new worker up (its sites log "listening on")
        while True:
            relayd._changed.clear()  # before the count, so no line slips past
            if sum(1 for line in relayd.lines if _LISTENING.search(line)) >= 3:
                break
            await relayd._changed.wait()
    assert await relayd.stop() == 0


async def test_check_config_never_prints_secrets(fake_server: TestServer) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relayd",
        "check-config",
        env=_env(str(fake_server.make_url("")).rstrip("/")),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(15):
        out, err = await process.communicate()
    assert process.returncode == 0
    settings = json.loads(out)
    assert settings["upstream"]["api_key"] == "<set>"
    for secret in SECRETS:
        assert secret not in (out + err).decode()


async def test_slowloris_and_idle_connections_are_closed(start: Start, tmp_path: Path) -> None:
    config = tmp_path / "relayd.toml"
    config.write_text("[limits]\nkeepalive_timeout = 1\n")
    relayd = await start("--config", str(config))
    assert relayd.port is not None
    loop = asyncio.get_running_loop()
    for opening in (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ", b""):
        reader, writer = await asyncio.open_connection("127.0.0.1", relayd.port)
        writer.write(opening)  # a head trickled and never finished, or nothing at all
        await writer.drain()
        started = loop.time()
        async with asyncio.timeout(5):
            assert await reader.read() == b""  # closed by relayd, without an answer
        assert loop.time() - started < 3
        writer.close()


# --------------------------------------------------------------------------- key revocation

REVOKE_BOUND = 5.0
PUBLIC = "https://relay.example.com"
REALTIME = "/v1/realtime?model=gpt-realtime"

ReloadKeys = Callable[[str], Awaitable[str]]


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


KeyedRelay = Callable[..., Awaitable[tuple[Relayd, ReloadKeys]]]


@pytest.fixture
def keyed(start: Start, fake_server: TestServer, tmp_path: Path) -> KeyedRelay:
    """Starts relayd with keys ``team`` and ``other`` in a keys file and every file
    handed out as a signed link; gives back ``reload_keys(text)``: rewrite the keys
    file, SIGHUP, and return the log line that answers it (bounded)."""

    async def make(public_url: str | None = PUBLIC) -> tuple[Relayd, ReloadKeys]:
        keys = tmp_path / "relay_keys"
        keys.write_text(f"team:{RELAY_KEY}\nother:{OTHER_KEY}\n")
        keys.chmod(0o600)
        config = tmp_path / "relayd.toml"
        config.write_text("[actions]\ninline_max_bytes = 0\n")
        env = _env(
            str(fake_server.make_url("")).rstrip("/"), RELAYD_KEYS="", RELAYD_KEYS_FILE=str(keys)
        )
        if public_url:
            env["RELAYD_PUBLIC_URL"] = public_url
        relayd = await start("--config", str(config), env=env)

        async def reload_keys(text: str) -> str:
            keys.write_text(text)
            seen = len(relayd.lines)
            relayd.process.send_signal(signal.SIGHUP)
            async with asyncio.timeout(REVOKE_BOUND):
                while True:
                    relayd._changed.clear()  # before the scan, so no line slips past
                    for line in relayd.lines[seen:]:
                        if any(w in line for w in ("reloaded", "reload refused", "failed")):
                            return line
                    await relayd._changed.wait()

        return relayd, reload_keys

    return make


async def _link(session: aiohttp.ClientSession, relayd: Relayd, key: str) -> str:
    async with session.post(
        relayd.url("/v1/actions/images/generations"), json={"prompt": "p"}, headers=auth(key)
    ) as response:
        assert response.status == 200, await response.text()
        (link,) = (await response.json())["openaiFileResponse"]
    assert link.startswith(PUBLIC)
    return relayd.url(link.removeprefix(PUBLIC))


async def _echoes(ws: aiohttp.ClientWebSocketResponse, text: str) -> bool:
    await ws.send_str(text)
    async with asyncio.timeout(REVOKE_BOUND):
        message = await ws.receive()
    return message.type is WSMsgType.TEXT and message.data == text


async def test_sighup_removing_a_key_ends_its_realtime_sessions_and_links(
    keyed: KeyedRelay, fake: FakeOpenAI, tmp_path: Path
) -> None:
    relayd, reload_keys = await keyed()
    assert not [line for line in relayd.lines if "too open" in line]
    fake.image_bytes = PNG
    async with aiohttp.ClientSession() as session:
        team_ws = await session.ws_connect(relayd.url(REALTIME), headers=auth(RELAY_KEY))
        other_ws = await session.ws_connect(relayd.url(REALTIME), headers=auth(OTHER_KEY))
        assert await _echoes(team_ws, "team") and await _echoes(other_ws, "other")
        team_link = await _link(session, relayd, RELAY_KEY)
        other_link = await _link(session, relayd, OTHER_KEY)
        async with session.get(other_link) as response:
            assert response.status == 200 and await response.read() == PNG

        (tmp_path / "relay_keys").chmod(0o644)  # and now others can read it
        line = await reload_keys(f"team:{RELAY_KEY}\n")
        assert "removed: other" in line
        warning = await relayd.wait_line("too open")
        assert "permissions 0644 for keys file" in warning and "warning" in warning

        async with asyncio.timeout(REVOKE_BOUND):
            closing = await other_ws.receive()
        assert closing.type is WSMsgType.CLOSE
        assert other_ws.close_code == 1008 and "revoked" in closing.extra
        assert await _echoes(team_ws, "team, still")  # the other key's session only

        async with session.get(other_link) as response:
            assert response.status == 404
            assert (await response.json())["error"]["code"] == "link_revoked"
        async with session.get(team_link) as response:
            assert response.status == 200 and await response.read() == PNG
        await relayd.wait_line("ended 1 realtime session")
        await team_ws.close()


@pytest.mark.parametrize("public_url", [None, PUBLIC])
async def test_sighup_that_would_leave_no_keys_is_refused(
    keyed: KeyedRelay, public_url: str | None
) -> None:
    relayd, reload_keys = await keyed(public_url)
    async with aiohttp.ClientSession() as session:
        team_ws = await session.ws_connect(relayd.url(REALTIME), headers=auth(RELAY_KEY))
        # The guide's pitfall: every line of the keys file commented out.
        line = await reload_keys(f"# team:{RELAY_KEY}\n# other:{OTHER_KEY}\n")
        assert "no relay keys" in line and "keeping" in line
        async with session.get(relayd.url("/v1/models")) as response:
            assert response.status == 401  # still keyed: not keyless mode
        async with session.get(relayd.url("/v1/models"), headers=auth(OTHER_KEY)) as response:
            assert response.status == 200
        assert await _echoes(team_ws, "still here")
        await team_ws.close()


# --------------------------------------------------------------------------- start-up (issue 11)


async def _exits(relayd: Relayd, timeout: float = 15) -> int:
    async with asyncio.timeout(timeout):
        code = await relayd.process.wait()
        await relayd._reader
    return code


def _one_line_refusal(relayd: Relayd) -> str:
    """The line relayd's refusal printed: one, starting 'relayd: ', no traceback."""
    assert not any("Traceback" in line for line in relayd.lines), "\n".join(relayd.lines)
    assert not any("listening on" in line for line in relayd.lines)
    [refusal] = [line for line in relayd.lines if line.startswith("relayd: ")]
    return refusal


async def test_a_second_relayd_on_a_port_served_by_workers_is_refused(
    start: Start, fake_server: TestServer
) -> None:
    upstream = str(fake_server.make_url("")).rstrip("/")
    # The flag is what the README shows, and it wins over the environment.
    first = await start(env=_env(upstream, RELAYD_WORKERS="3"), serve_args=("--workers", "2"))
    await first.wait_line("2 workers serving")
    for workers in ("2", "1"):  # with workers it used to join the port silently
        second = await start(
            env=_env(upstream, RELAYD_LISTEN=f"127.0.0.1:{first.port}"),
            serve_args=("--workers", workers),
            wait=False,
        )
        assert await _exits(second) == 2
        refusal = _one_line_refusal(second)
        pid = first.process.pid  # the supervisor, not one of its workers
        assert f"port {first.port} is already served by another relayd (pid {pid})" in refusal
    # The first one still serves, alone.
    async with aiohttp.ClientSession() as session:
        async with session.get(first.url("/health")) as response:
            assert response.status == 200
    assert await first.stop() == 0


async def test_a_port_held_by_another_program_is_one_line_and_exit_2(
    start: Start, fake_server: TestServer
) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        for workers in ("1", "2"):
            env = _env(str(fake_server.make_url("")).rstrip("/"), RELAYD_LISTEN=f"127.0.0.1:{port}")
            relayd = await start(env=env, serve_args=("--workers", workers), wait=False)
            assert await _exits(relayd) == 2
            refusal = _one_line_refusal(relayd)
            assert f"cannot listen on 127.0.0.1:{port}: port {port} is already in use" in refusal
            assert f"(pid {os.getpid()})" in refusal  # this test process holds it
    finally:
        holder.close()


@pytest.mark.parametrize("problem", ["unix-dir", "store-dir"])
async def test_a_directory_relayd_cannot_use_is_one_line_and_exit_2(
    start: Start, fake_server: TestServer, tmp_path: Path, problem: str
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    upstream = str(fake_server.make_url("")).rstrip("/")
    if problem == "unix-dir":
        env = _env(upstream, RELAYD_LISTEN=f"unix:{tmp_path}/missing/relayd.sock")
        expected = f"the directory {tmp_path}/missing does not exist"
    else:
        config = tmp_path / "relayd.toml"
        config.write_text(f'[actions]\nstore_dir = "{blocker}/files"\n')
        env = _env(upstream, RELAYD_CONFIG=str(config))
        expected = f"cannot create the download store ([actions] store_dir) {blocker}/files"
    relayd = await start(env=env, wait=False)
    assert await _exits(relayd) == 2
    assert expected in _one_line_refusal(relayd)
