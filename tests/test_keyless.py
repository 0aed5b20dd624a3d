"""Keyless mode stays a loopback-only relay (issue 11, item 3).

With no relay keys every route is open to whoever reaches the port, so relayd must
make sure only this machine does: a web page using DNS rebinding reaches the
loopback port with its own ``Host`` and ``Origin``, and is refused on every route
(the realtime upgrade included, before it happens).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from relayd.config import ConfigError, load_settings
from relayd.loopback import is_loopback_host, is_loopback_origin
from tests.conftest import RELAY_KEY, RelayFactory
from tests.fakes.openai import UPSTREAM_KEY, FakeOpenAI
from tests.rawhttp import open_raw, read_head, websocket_upgrade
from tests.test_daemon import _env, socket_activated
from tests.test_security import assert_openai_error

BOUND = 5.0

LOOPBACK_HOSTS = [
    "localhost",
    "LocalHost:8080",
    "localhost:",
    "127.0.0.1",
    "127.0.0.1:9",
    "127.255.0.7:80",
    "[::1]",
    "[::1]:8080",
    "[::ffff:127.0.0.1]:80",
]
FOREIGN_HOSTS = [
    "rebind.attacker.example",
    "rebind.attacker.example:8080",
    "127.0.0.1.nip.io",
    "localhost.attacker.example",
    "0.0.0.0:8080",
    "10.0.0.1",
    "[::]:8080",
    "::1",
    "[::2]",
    "[::1]x",
    "localhost:80:80",
    "localhost:http",
    "",
    "local host",
]
LOOPBACK_ORIGINS = ["http://localhost:3000", "https://127.0.0.1", "http://[::1]:5173"]
FOREIGN_ORIGINS = [
    "null",
    "https://attacker.example",
    "http://localhost.attacker.example",
    "http://0.0.0.0:8080",
    "file://",
    "http://user@localhost",
    "http://localhost/path",
    "chrome-extension://abcdef",
    "http://localhost:99999",
]


@pytest.mark.parametrize("value", LOOPBACK_HOSTS)
def test_loopback_hosts(value: str) -> None:
    assert is_loopback_host(value)


@pytest.mark.parametrize("value", FOREIGN_HOSTS)
def test_foreign_hosts(value: str) -> None:
    assert not is_loopback_host(value)


@pytest.mark.parametrize("value", LOOPBACK_ORIGINS)
def test_loopback_origins(value: str) -> None:
    assert is_loopback_origin(value)


@pytest.mark.parametrize("value", FOREIGN_ORIGINS)
def test_foreign_origins(value: str) -> None:
    assert not is_loopback_origin(value)


@pytest.fixture
async def keyless(relay_factory: RelayFactory) -> TestClient:
    return await relay_factory(auth={"keys": ()})


async def _refused(response: aiohttp.ClientResponse) -> None:
    assert response.status == 403
    assert_openai_error(await response.json(), "keyless_loopback_only")


# Routes of every kind: relay API, public, the catch-all, an unknown path, a body.
ROUTES = [
    ("GET", "/v1/models"),
    ("GET", "/health"),
    ("GET", "/openapi.json"),
    ("GET", "/v1/vector_stores"),
    ("GET", "/no/such/route"),
    ("POST", "/v1/files"),
]


@pytest.mark.parametrize("method, path", ROUTES)
@pytest.mark.parametrize(
    "headers",
    [
        {"Host": "rebind.attacker.example:8080"},
        {"Origin": "https://attacker.example"},
        {"Origin": "null"},
        {"Host": "localhost", "Origin": "http://rebind.attacker.example"},
    ],
    ids=["host", "origin", "origin-null", "loopback-host-foreign-origin"],
)
async def test_keyless_refuses_foreign_host_or_origin_on_every_route(
    keyless: TestClient, fake: FakeOpenAI, method: str, path: str, headers: dict[str, str]
) -> None:
    response = await keyless.request(method, path, headers=headers, data=b"x" * 10)
    await _refused(response)
    assert fake.seen == []


async def test_keyless_refuses_a_rebound_realtime_upgrade_before_it_happens(
    keyless: TestClient, fake: FakeOpenAI
) -> None:
    headers = {**websocket_upgrade(), "Origin": "https://attacker.example"}
    async with asyncio.timeout(BOUND):
        response = await keyless.get("/v1/realtime?model=gpt-realtime", headers=headers)
        await _refused(response)
        with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
            await keyless.ws_connect(
                "/v1/realtime?model=gpt-realtime", headers={"Host": "rebind.attacker.example"}
            )
    assert caught.value.status == 403
    assert fake.realtime.sessions == []


@pytest.mark.parametrize("host", ["localhost:1234", "127.0.0.1", "[::1]:8080"])
@pytest.mark.parametrize("origin", [None, "http://localhost:3000", "http://127.0.0.1:8080"])
async def test_keyless_serves_loopback_host_and_origin(
    keyless: TestClient, host: str, origin: str | None
) -> None:
    headers = {"Host": host} | ({"Origin": origin} if origin else {})
    assert (await keyless.get("/v1/models", headers=headers)).status == 200


async def test_keyless_serves_a_request_without_host(keyless: TestClient) -> None:
    # HTTP/1.0 needs no Host; nothing then names another site.
    async with asyncio.timeout(BOUND):
        reader, writer = await open_raw(keyless)
        writer.write(b"GET /v1/models HTTP/1.0\r\n\r\n")
        status, _ = await read_head(reader)
        writer.close()
    assert status == 200


async def test_keyless_realtime_from_a_loopback_page_is_bridged(
    keyless: TestClient, fake: FakeOpenAI
) -> None:
    async with asyncio.timeout(BOUND):
        async with keyless.ws_connect(
            "/v1/realtime?model=gpt-realtime", headers={"Origin": "http://localhost:3000"}
        ) as ws:
            await ws.send_str("ping")
            assert (await ws.receive()).data == "ping"
    assert fake.realtime.last().accepted


async def test_with_keys_any_host_is_fine_and_auth_decides(relay: TestClient) -> None:
    headers = {"Host": "relay.example.com", "Origin": "https://chatgpt.com"}
    assert (await relay.get("/v1/models", headers=headers)).status == 401
    headers["Authorization"] = f"Bearer {RELAY_KEY}"
    assert (await relay.get("/v1/models", headers=headers)).status == 200


async def test_auth_disabled_leaves_host_to_the_layer_in_front(
    relay_factory: RelayFactory,
) -> None:
    relay = await relay_factory(auth={"keys": (), "disabled": True})
    response = await relay.get("/v1/models", headers={"Host": "relay.example.com"})
    assert response.status == 200


def test_a_public_url_needs_relay_keys(tmp_path: Path) -> None:
    environ = {"OPENAI_API_KEY": UPSTREAM_KEY, "RELAYD_PUBLIC_URL": "https://relay.example.com"}
    with pytest.raises(ConfigError, match="public url .* no relay keys"):
        load_settings(None, environ)
    assert load_settings(None, {**environ, "RELAYD_KEYS": f"team:{RELAY_KEY}"}).auth.keys
    # Another layer that authenticates every request may still publish relayd.
    config = tmp_path / "relayd.toml"
    config.write_text("[auth]\ndisabled = true\n")
    assert load_settings(config, environ).auth.disabled


# --------------------------------------------------------------------------- inherited sockets


def _keyless_env(fake_server: TestServer, **env: str) -> dict[str, str]:
    """Keyless, with a config that claims a loopback address."""
    return _env(
        str(fake_server.make_url("")).rstrip("/"),
        RELAYD_KEYS="",
        RELAYD_LISTEN="127.0.0.1:1",
        **env,
    )


@pytest.mark.process
@pytest.mark.parametrize("workers", ["1", "2"])
async def test_keyless_refuses_an_inherited_socket_that_is_not_loopback(
    fake_server: TestServer, workers: str
) -> None:
    # Bound, never listening: nothing outside can connect while relayd decides.
    env = _keyless_env(fake_server, RELAYD_WORKERS=workers)
    async with socket_activated(env, host="0.0.0.0", listening=False) as (relayd, port):
        async with asyncio.timeout(15):
            code = await relayd.process.wait()
            await relayd._reader
    assert code == 2
    assert not any("Traceback" in line for line in relayd.lines)
    (line,) = [line for line in relayd.lines if line.startswith("relayd: ")]
    assert line.startswith("relayd: configuration error: ")
    assert f"http://0.0.0.0:{port}" in line and "not a loopback address" in line


@pytest.mark.process
async def test_keyless_warning_names_the_socket_really_served(fake_server: TestServer) -> None:
    async with socket_activated(_keyless_env(fake_server)) as (relayd, port):
        line = await relayd.wait_line("NO RELAY KEYS")
        assert f"http://127.0.0.1:{port}" in line and "127.0.0.1:1 " not in line
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/v1/models") as response:
                assert response.status == 200
        assert await relayd.stop() == 0
