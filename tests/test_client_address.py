"""The client address relayd logs (and will limit by): the peer's own, or, behind a
trusted front proxy, the right-most forwarded address that is not a trusted proxy.
A forged X-Forwarded-For from anyone else changes nothing (issue 13)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from relayd.clientaddr import TrustedProxies
from relayd.config import ConfigError, load_settings
from tests.conftest import RELAY_KEY, RelayFactory

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
