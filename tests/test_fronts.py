"""The shipped fronts, tested for real (issue 13): nginx (conf/nginx/relayd.conf) and
Caddy (conf/caddy/Caddyfile), each on loopback with a throwaway CA, in front of a real
``relayd serve`` and the fake OpenAI upstream. Each test config is the SHIPPED file with
ports, certificate paths, the upstream address and pid/log/temp paths substituted, so
what ships is what is tested. The client connects from 127.0.0.2: the front's peer is
127.0.0.1 (trusted), and relayd's access line must name 127.0.0.2.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import aiohttp
import openai
import pytest
import trustme
from aiohttp.test_utils import TestServer

from relayd.config import load_settings
from tests.conftest import RELAY_KEY
from tests.fakes.openai import FakeOpenAI
from tests.test_daemon import Relayd, Start, _env, start
from tests.test_memory import memory, report
from tests.test_tls_config import write_pair

__all__ = ["start"]  # the fixture, shared with test_daemon

pytestmark = pytest.mark.process

ROOT = Path(__file__).resolve().parent.parent
CLIENT_ADDR = "127.0.0.2"
AUTH = {"Authorization": f"Bearer {RELAY_KEY}"}
UPLOAD_MIB = 256
BOUND = 20.0


def _binary(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if found is None:
        pytest.skip(f"LOUD SKIP: {name} is not installed (apt-get install -y nginx-light caddy)")
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _nginx_conf(
    tmp: Path, port: int, http_port: int, upstreams: Sequence[int], cert: Path, key: Path
) -> str:
    """The shipped site, on loopback, its ``upstream relayd`` block listing ``upstreams``
    (several: the fleet of tests/fleet.py)."""
    servers = "\n    ".join(f"server 127.0.0.1:{upstream};" for upstream in upstreams)
    site = (ROOT / "conf/nginx/relayd.conf").read_text()
    for old, new in {
        "listen 80;": f"listen 127.0.0.1:{http_port};",
        "listen [::]:80;\n": "",
        "listen 443 ssl;": f"listen 127.0.0.1:{port} ssl;",
        "listen [::]:443 ssl;\n": "",
        "server 127.0.0.1:8080;": servers,
        "/etc/letsencrypt/live/relay.example.com/fullchain.pem": str(cert),
        "/etc/letsencrypt/live/relay.example.com/privkey.pem": str(key),
        "/var/www/certbot": str(tmp / "certbot"),
    }.items():
        assert old in site, f"the shipped nginx site lost {old!r}"
        site = site.replace(old, new)
    temps = "\n".join(
        f"    {name}_temp_path {tmp}/{name};"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        f"pid {tmp}/nginx.pid;\nerror_log {tmp}/error.log;\nworker_processes 1;\n"
        + ("user root;\n" if os.geteuid() == 0 else "")
        + f"events {{}}\nhttp {{\n    access_log off;\n{temps}\n{site}\n}}\n"
    )


def _caddyfile(tmp: Path, port: int, upstream: int, cert: Path, key: Path) -> str:
    site = (ROOT / "conf/caddy/Caddyfile").read_text()
    for old, new in {
        "relay.example.com {": f"https://127.0.0.1:{port} {{\n\ttls {cert} {key}",
        "reverse_proxy 127.0.0.1:8080 {": f"reverse_proxy 127.0.0.1:{upstream} {{",
    }.items():
        assert old in site, f"the shipped Caddyfile lost {old!r}"
        site = site.replace(old, new)
    return "{\n\tadmin off\n\tauto_https off\n}\n\n" + site


class Front:
    def __init__(self, relayd: Relayd, port: int, trust: ssl.SSLContext) -> None:
        self.relayd = relayd
        self.port = port
        self.trust = trust

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.port}{path}"

    def session(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(ssl=self.trust, local_addr=(CLIENT_ADDR, 0))
        return aiohttp.ClientSession(connector=connector)


async def _wait_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 10
    while True:
        if process.poll() is not None:
            raise AssertionError(f"the front exited:\n{log.read_text(errors='replace')}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return


@pytest.fixture(params=["nginx", "caddy"])
async def front(
    request: pytest.FixtureRequest, start: Start, fake_server: TestServer, tmp_path: Path
) -> AsyncIterator[Front]:
    binary = _binary(request.param)
    env = _env(str(fake_server.make_url("")).rstrip("/"), RELAYD_TRUSTED_PROXIES="127.0.0.1")
    relayd = await start(env=env)
    assert relayd.port is not None
    ca = trustme.CA()
    cert, key = write_pair(ca, tmp_path)
    port = _free_port()
    log = tmp_path / "front.log"
    if request.param == "nginx":
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi", "certbot"):
            (tmp_path / name).mkdir()
        conf = tmp_path / "nginx.conf"
        conf.write_text(_nginx_conf(tmp_path, port, _free_port(), [relayd.port], cert, key))
        argv = [binary, "-p", str(tmp_path), "-c", str(conf), "-g", "daemon off;"]
        front_env = dict(os.environ)
    else:
        conf = tmp_path / "Caddyfile"
        conf.write_text(_caddyfile(tmp_path, port, relayd.port, cert, key))
        argv = [binary, "run", "--config", str(conf), "--adapter", "caddyfile"]
        front_env = {
            **os.environ,
            "HOME": str(tmp_path),
            "XDG_DATA_HOME": str(tmp_path / "data"),
            "XDG_CONFIG_HOME": str(tmp_path / "config"),
        }
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=front_env, start_new_session=True
        )
    try:
        await _wait_port(port, process, log)
        trust = ssl.create_default_context()
        ca.configure_trust(trust)
        yield Front(relayd, port, trust)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


async def _access_client(relayd: Relayd, route: str) -> str:
    line = await relayd.wait_line(f"route={route}", timeout=5)
    return line.split("client=", 1)[1].split()[0]


async def test_sse_events_arrive_paced_through_the_front(front: Front, fake: FakeOpenAI) -> None:
    fake.pace = 0.3
    arrivals: list[float] = []
    async with asyncio.timeout(BOUND), front.session() as session:
        body = {"model": "slow", "input": "hi", "stream": True}
        async with session.post(front.url("/v1/responses"), json=body, headers=AUTH) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/event-stream")
            async for line in response.content:
                if line.startswith(b"event: "):
                    arrivals.append(time.monotonic())
    assert len(arrivals) >= 5
    # Paced as sent: the first event long before the last, none bunched at the end.
    assert arrivals[-1] - arrivals[0] >= 0.3 * (len(arrivals) - 2)
    assert arrivals[1] - arrivals[0] >= 0.2


async def test_the_access_line_names_the_client_behind_the_front(
    front: Front,
) -> None:
    async with asyncio.timeout(BOUND), front.session() as session:
        async with session.get(front.url("/v1/models"), headers=AUTH) as response:
            assert response.status == 200
    assert await _access_client(front.relayd, "/v1/models") == CLIENT_ADDR


async def test_a_client_hang_up_mid_stream_cancels_upstream(front: Front, fake: FakeOpenAI) -> None:
    fake.pace = 0.5
    fake.events = 40
    async with asyncio.timeout(BOUND), front.session() as session:
        body = {"model": "slow", "input": "hi", "stream": True}
        async with session.post(front.url("/v1/responses"), json=body, headers=AUTH) as response:
            assert response.status == 200
            async for line in response.content:
                if line.startswith(b"event: "):
                    break
        # Leaving the block closes the connection mid-stream.
    await fake.wait_cancelled("/v1/responses", timeout=10)


async def test_the_realtime_bridge_works_through_the_front(front: Front) -> None:
    http_client = openai.DefaultAsyncHttpxClient(verify=front.trust)
    client = openai.AsyncOpenAI(
        base_url=front.url("/v1"),
        api_key=RELAY_KEY,
        max_retries=0,
        timeout=30,
        http_client=http_client,
    )
    async with client, asyncio.timeout(BOUND):
        async with client.realtime.connect(
            model="gpt-realtime",
            websocket_connection_options={"ssl": front.trust, "local_addr": (CLIENT_ADDR, 0)},  # type: ignore[typeddict-unknown-key]
        ) as connection:
            await connection.session.update(
                session={"type": "realtime", "instructions": "Answer briefly."}
            )
            event = await connection.recv()
    assert event.type == "session.updated"


async def test_a_large_upload_streams_with_flat_relayd_memory(
    front: Front, fake: FakeOpenAI, tmp_path: Path
) -> None:
    big = tmp_path / "big.bin"
    with big.open("wb") as out:
        out.truncate(UPLOAD_MIB * 1024 * 1024)  # sparse: no disk, zeros on read
    pid = front.relayd.process.pid
    before, _ = memory(pid)
    async with asyncio.timeout(60), front.session() as session:
        with big.open("rb") as data:
            form = aiohttp.FormData()
            form.add_field("purpose", "assistants")
            form.add_field("file", data, filename="big.bin")
            async with session.post(front.url("/v1/files"), data=form, headers=AUTH) as response:
                assert response.status == 200, await response.text()
    grown = memory(pid)[0] - before
    report(f"{UPLOAD_MIB} MiB upload through the front", relayd_peak_growth=grown)
    sizes = [p["size"] for s in fake.seen for p in s.parts if p["filename"] == "big.bin"]
    assert sizes == [UPLOAD_MIB * 1024 * 1024]
    assert grown < 64, f"relayd's peak RSS grew {grown:.0f} MiB for a {UPLOAD_MIB} MiB upload"


def _seconds(conf: str, directive: str) -> list[float]:
    found = re.findall(rf"^\s*{directive}\s+(\d+)s;?\s*$", conf, re.MULTILINE)
    assert found, f"no {directive}"
    return [float(value) for value in found]


def test_the_shipped_fronts_outwait_relayd_and_take_its_largest_body() -> None:
    """Issue 13: a front's timeout shorter than relayd's own timers would cut a stream
    relayd still holds; nginx's body cap is relayd's (Caddy has none by default)."""
    settings = load_settings(None, {"OPENAI_API_KEY": "sk-test"})
    longest = max(
        settings.upstream.idle_timeout_s,
        settings.upstream.first_byte_timeout_s,
        settings.realtime.idle_timeout_s,
    )
    nginx = (ROOT / "conf/nginx/relayd.conf").read_text()
    caddy = (ROOT / "conf/caddy/Caddyfile").read_text()
    for conf, directive in [
        (nginx, "proxy_read_timeout"),
        (nginx, "proxy_send_timeout"),
        (caddy, "read_timeout"),
        (caddy, "write_timeout"),
    ]:
        assert min(_seconds(conf, directive)) >= longest, directive
    cap = re.search(r"client_max_body_size (\d+)m;", nginx)
    assert cap is not None and int(cap.group(1)) * 1024 * 1024 == settings.limits.max_body_bytes
