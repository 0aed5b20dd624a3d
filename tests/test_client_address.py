"""The client address relayd logs (and will limit by): the peer's own, or, behind a
trusted front proxy, the right-most forwarded address that is not a trusted proxy.
A forged X-Forwarded-For from anyone else changes nothing (issue 13)."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from relayd.clientaddr import TrustedProxies
from relayd.config import ConfigError, load_settings
from tests.conftest import RELAY_KEY, RelayFactory
from tests.test_daemon import Relayd, Start, start
from tests.test_daemon import _env as daemon_env

__all__ = ["start"]  # the fixture, shared with test_daemon

AUTH = {"Authorization": f"Bearer {RELAY_KEY}"}
BOUND = 5.0


def client(
    trusted: tuple[str, ...],
    peer: str | None,
    xff: tuple[str, ...] = (),
    forwarded: tuple[dict[str, str], ...] = (),
) -> str:
    return TrustedProxies(trusted).client(peer, forwarded, xff)


@pytest.mark.parametrize(
    ("trusted", "peer", "xff", "expected"),
    [
        # No proxy is trusted: the headers are somebody's claim, never believed.
        ((), "203.0.113.9", ("198.51.100.1",), "203.0.113.9"),
        # A peer outside the trusted list forges the header: ignored.
        (("127.0.0.1",), "203.0.113.9", ("198.51.100.1",), "203.0.113.9"),
        # nginx's $proxy_add_x_forwarded_for: the client's own entry is left of the
        # address nginx saw; relayd takes the right-most untrusted one.
        (("127.0.0.1",), "127.0.0.1", ("6.6.6.6, 198.51.100.1",), "198.51.100.1"),
        # A chain of trusted proxies is walked, however it was split into headers.
        (("127.0.0.1", "10.0.0.0/8"), "127.0.0.1", ("198.51.100.1, 10.1.2.3",), "198.51.100.1"),
        (("127.0.0.1", "10.0.0.0/8"), "127.0.0.1", ("198.51.100.1", "10.1.2.3"), "198.51.100.1"),
        # Every hop trusted: the left-most is closest to the client.
        (("127.0.0.1", "10.0.0.0/8"), "127.0.0.1", ("10.9.9.9, 10.1.2.3",), "10.9.9.9"),
        # A trusted proxy that forwards nothing: the peer itself.
        (("127.0.0.1",), "127.0.0.1", (), "127.0.0.1"),
        # IPv6, with and without brackets and ports, and v4-mapped peers.
        (("::1",), "::1", ("2001:db8::7",), "2001:db8::7"),
        (("127.0.0.1",), "::ffff:127.0.0.1", ("198.51.100.1",), "198.51.100.1"),
        (("127.0.0.1",), "127.0.0.1", ("198.51.100.1:4711",), "198.51.100.1"),
        # What a trusted proxy says that is no address is reported as it said it.
        (("127.0.0.1",), "127.0.0.1", ("unknown",), "unknown"),
        (("127.0.0.1",), "127.0.0.1", ("_gateway-2",), "_gateway-2"),
        # Any other text is no address to log: a line cannot be forged through it.
        (("127.0.0.1",), "127.0.0.1", ("x key=admin status=200",), "unknown"),
        # A Unix-socket peer (no address) is trusted only when "unix" says so.
        (("unix",), "", ("198.51.100.1",), "198.51.100.1"),
        (("127.0.0.1",), "", ("198.51.100.1",), "unix"),
    ],
)
def test_the_client_is_the_right_most_untrusted_forwarded_address(
    trusted: tuple[str, ...], peer: str, xff: tuple[str, ...], expected: str
) -> None:
    assert client(trusted, peer, xff) == expected


def test_forwarded_is_read_as_rfc_7239_and_wins_over_x_forwarded_for() -> None:
    forwarded = ({"for": "198.51.100.1", "proto": "https"}, {"for": "[2001:db8::7]:4711"})
    assert client(("127.0.0.1",), "127.0.0.1", ("6.6.6.6",), forwarded) == "2001:db8::7"
    hidden = ({"for": "_hidden"},)
    assert client(("127.0.0.1",), "127.0.0.1", (), hidden) == "_hidden"


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        (
            {"RELAYD_TRUSTED_PROXIES": "127.0.0.1, 10.0.0.0/8,unix"},
            ("127.0.0.1", "10.0.0.0/8", "unix"),
        ),
        ({}, ()),
    ],
)
def test_trusted_proxies_come_from_the_environment(
    environ: dict[str, str], expected: tuple[str, ...]
) -> None:
    settings = load_settings(None, {"OPENAI_API_KEY": "sk-test", **environ})
    assert settings.server.trusted_proxies == expected


@pytest.mark.parametrize("entry", ["nginx.local", "10.0.0.0/33", "127.0.0.1/8/8"])
def test_an_entry_that_is_not_an_address_is_refused_by_name(entry: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"'{entry}' is not an address or CIDR"):
        load_settings(None, {"OPENAI_API_KEY": "sk-test", "RELAYD_TRUSTED_PROXIES": entry})
    config = tmp_path / "relayd.toml"
    config.write_text(f'[server]\ntrusted_proxies = ["127.0.0.1", "{entry}"]\n')
    with pytest.raises(ConfigError, match="is not an address or CIDR"):
        load_settings(config, {"OPENAI_API_KEY": "sk-test"})


async def _access_line(caplog: pytest.LogCaptureFixture, route: str) -> dict[str, Any]:
    async with asyncio.timeout(BOUND):
        while True:
            for record in caplog.records:
                fields = getattr(record, "fields", None)
                if record.name == "relayd.access" and fields and fields["route"] == route:
                    return dict(fields)
            await asyncio.sleep(0.01)


async def _client_logged(
    relay: TestClient, caplog: pytest.LogCaptureFixture, **headers: str
) -> Any:
    caplog.clear()
    response = await relay.get("/v1/models", headers={**AUTH, **headers})
    assert response.status == 200
    return (await _access_line(caplog, "/v1/models"))["client"]


async def test_the_access_line_names_the_client_a_trusted_front_reports(
    relay_factory: RelayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    behind = await relay_factory(server={"trusted_proxies": ("127.0.0.1",)})
    forwarded = {"X-Forwarded-For": "6.6.6.6, 198.51.100.1"}
    assert await _client_logged(behind, caplog, **forwarded) == "198.51.100.1"
    assert await _client_logged(behind, caplog, Forwarded="for=192.0.2.60") == "192.0.2.60"
    assert await _client_logged(behind, caplog) == "127.0.0.1"


async def test_a_forged_forwarded_header_from_an_untrusted_peer_changes_nothing(
    relay_factory: RelayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    direct = await relay_factory(server={"trusted_proxies": ("10.0.0.0/8",)})
    forged = {"X-Forwarded-For": "198.51.100.1", "Forwarded": "for=192.0.2.60"}
    assert await _client_logged(direct, caplog, **forged) == "127.0.0.1"
    nobody = await relay_factory()
    assert await _client_logged(nobody, caplog, **forged) == "127.0.0.1"


# --------------------------------------------------------------------------- a real relayd


async def _logged_client(relayd: Relayd, session: aiohttp.ClientSession, url: str, xff: str) -> str:
    request_id = f"client-address-{len(relayd.lines)}"
    headers = {**AUTH, "X-Forwarded-For": xff, "X-Request-Id": request_id}
    async with session.get(url, headers=headers) as response:
        assert response.status == 200
    line = await relayd.wait_line(request_id, timeout=BOUND)
    match = re.search(r"client=(\S+)", line)
    assert match, line
    return match.group(1)


@pytest.mark.process
async def test_a_real_relayd_believes_only_its_trusted_peers_on_tcp_and_unix_sockets(
    start: Start, fake_server: TestServer, tmp_path: Path
) -> None:
    upstream = str(fake_server.make_url("")).rstrip("/")
    # The front is 127.0.0.2; a client on 127.0.0.1 forging the header changes nothing.
    tcp = await start(env=daemon_env(upstream, RELAYD_TRUSTED_PROXIES="127.0.0.2, 10.0.0.0/8"))
    url = tcp.url("/v1/models")
    async with aiohttp.ClientSession() as direct:
        assert await _logged_client(tcp, direct, url, "198.51.100.1") == "127.0.0.1"
    front = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with aiohttp.ClientSession(connector=front) as behind:
        forwarded = "6.6.6.6, 198.51.100.1, 10.1.2.3"
        assert await _logged_client(tcp, behind, url, forwarded) == "198.51.100.1"
    # A front on the same machine talking over relayd's Unix socket, trusted as "unix".
    sock = tmp_path / "relayd.sock"
    unix = await start(
        env=daemon_env(upstream, RELAYD_LISTEN=f"unix:{sock}", RELAYD_TRUSTED_PROXIES="unix")
    )
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as local:
        logged = await _logged_client(unix, local, "http://relayd/v1/models", "198.51.100.7")
        assert logged == "198.51.100.7"
