"""The safe fetcher for user file links (docs/security.md#files-and-links): what it
refuses, and where.

Refusals use the default configuration (https only, ChatGPT's hosts, no private
peers) wherever the case allows; the cases that need a server to misbehave use the
loopback https file host, which the tests may reach only by allowing private peers.
Every refusal is a clear 4xx and nothing goes upstream.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpServer

from relayd.actions.fetch import check_link
from relayd.config import DEFAULT_FETCH_HOSTS, Settings, load_settings, updated
from relayd.connectors import PublicOnlyConnector, non_public_reason, refuse_non_public
from relayd.errors import ForbiddenAddressError, PermissionDeniedError
from tests.conftest import RELAY_KEY, RelayFactory
from tests.fakes.openai import FakeOpenAI
from tests.filehost import PNG, FileHost, fetch_settings, start_file_host

AUTH = {"Authorization": f"Bearer {RELAY_KEY}"}


async def upload_from(relay: TestClient, link: str) -> tuple[int, dict[str, Any]]:
    response = await relay.post(
        "/v1/actions/files/upload",
        json={
            "purpose": "assistants",
            "openaiFileIdRefs": [{"name": "f.png", "download_link": link}],
        },
        headers=AUTH,
    )
    return response.status, await response.json()


@pytest.fixture
async def host(aiohttp_server: AiohttpServer, tmp_path: Path) -> FileHost:
    return await start_file_host(aiohttp_server, tmp_path)


@pytest.mark.parametrize(
    "link, words",
    [
        ("https://127.0.0.1/file", "not fetched"),
        ("https://[::1]/file", "not fetched"),
        ("https://169.254.169.254/latest/meta-data/", "not fetched"),
        ("http://files.oaiusercontent.com/file-abc", "https"),
        ("https://user:pw@files.oaiusercontent.com/file-abc", "credentials"),
        ("https://evil.example.com/file", "not fetched"),
        ("file:///etc/passwd", "https"),
        # Anyone can register an Azure storage account named oaidalle<anything>.
        ("https://oaidalleattacker.blob.core.windows.net/private/x.png", "not fetched"),
    ],
    ids=[
        "loopback",
        "loopback-v6",
        "metadata",
        "plain-http",
        "userinfo",
        "other-host",
        "file-scheme",
        "lookalike-storage-account",
    ],
)
async def test_default_config_refuses_links_before_connecting(
    relay_factory: RelayFactory, fake: FakeOpenAI, link: str, words: str
) -> None:
    relay = await relay_factory()
    status, body = await upload_from(relay, link)
    assert status == 403
    assert body["error"]["code"] == "file_url_forbidden"
    assert body["error"]["param"] == "openaiFileIdRefs[0]"
    assert words in body["error"]["message"]
    assert fake.seen == []


@pytest.mark.parametrize(
    "link, reason",
    [
        ("https://127.0.0.1:1/file", "loopback"),
        ("https://[::1]:1/file", "loopback"),
        ("https://169.254.169.254/latest/meta-data/", "link-local"),
        ("https://10.0.0.8/file", "private"),
        ("https://[::ffff:127.0.0.1]/file", "loopback"),
    ],
    ids=["127.0.0.1", "[::1]", "169.254.169.254", "10/8", "v4-mapped"],
)
async def test_allowlisted_ip_literals_still_must_be_public(
    relay_factory: RelayFactory, fake: FakeOpenAI, link: str, reason: str
) -> None:
    hosts = ("127.0.0.1", "::1", "169.254.169.254", "10.0.0.8", "::ffff:7f00:1")
    relay = await relay_factory(actions={"fetch_hosts": hosts})
    status, body = await upload_from(relay, link)
    assert status == 403, body
    assert reason in body["error"]["message"]
    assert fake.seen == []


async def test_a_name_that_resolves_to_a_private_address_is_refused(
    relay_factory: RelayFactory, fake: FakeOpenAI
) -> None:
    relay = await relay_factory(actions={"fetch_hosts": ("localhost",)})
    status, body = await upload_from(relay, "https://localhost:1/file")
    assert status == 403
    assert "non-public" in body["error"]["message"]
    assert fake.seen == []


async def test_a_redirect_is_never_followed(
    relay_factory: RelayFactory, fake: FakeOpenAI, host: FileHost
) -> None:
    relay = await relay_factory(**fetch_settings(host))
    status, body = await upload_from(relay, host.url("/redirect"))
    assert status == 403
    assert "redirect" in body["error"]["message"]
    assert host.hits == ["/redirect"]  # and not the metadata address behind it
    assert fake.seen == []


async def test_an_oversized_body_is_cut_off(
    relay_factory: RelayFactory, fake: FakeOpenAI, host: FileHost
) -> None:
    relay = await relay_factory(**fetch_settings(host, max_file_bytes=256 * 1024))
    status, body = await upload_from(relay, host.url("/endless"))
    assert status == 413
    assert body["error"]["code"] == "file_too_large"
    assert fake.seen == []


async def test_a_slow_body_times_out(
    relay_factory: RelayFactory, fake: FakeOpenAI, host: FileHost
) -> None:
    relay = await relay_factory(**fetch_settings(host, fetch_timeout_s=0.5))
    status, body = await upload_from(relay, host.url("/slow"))
    assert status == 400
    assert body["error"]["code"] == "file_fetch_timeout"
    assert fake.seen == []


async def test_an_expired_link_is_a_clear_400(
    relay_factory: RelayFactory, fake: FakeOpenAI, host: FileHost
) -> None:
    relay = await relay_factory(**fetch_settings(host))
    status, body = await upload_from(relay, host.url("/files/gone"))
    assert status == 400
    assert "HTTP 403" in body["error"]["message"] and "five minutes" in body["error"]["message"]
    assert fake.seen == []


async def test_an_allowed_link_arrives_whole(
    relay_factory: RelayFactory, fake: FakeOpenAI, host: FileHost
) -> None:
    relay = await relay_factory(**fetch_settings(host))
    status, _ = await upload_from(relay, host.put("pic", PNG))
    assert status == 200
    assert fake.seen[0].parts[-1]["data"] == PNG


def test_default_hosts_are_exact_names() -> None:
    # No wildcard: a pattern can match hosts nobody at OpenAI controls.
    assert "files.oaiusercontent.com" in DEFAULT_FETCH_HOSTS
    assert not any(set(h) & set("*?[") for h in DEFAULT_FETCH_HOSTS)
    settings = updated(Settings(), upstream={"api_key": "sk-test"})
    for link in (
        "https://files.oaiusercontent.com/file-abc?sig=x",
        "https://oaidalleapiprodscus.blob.core.windows.net/private/img.png",
    ):
        assert check_link(link, settings).host is not None


def test_operator_wildcards_still_match(tmp_path: Path) -> None:
    config = tmp_path / "relayd.toml"
    config.write_text('[actions]\nfetch_hosts = ["*.files.example", "cdn?.example"]\n')
    settings = load_settings(config, {"OPENAI_API_KEY": "sk-test"})
    for link in ("https://a.files.example/x", "https://cdn1.example/x"):
        assert check_link(link, settings).host is not None
    for link in ("https://files.example.evil/x", "https://files.oaiusercontent.com/x"):
        with pytest.raises(PermissionDeniedError):
            check_link(link, settings)


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "::1",
        "169.254.169.254",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "100.64.0.1",
        "0.0.0.0",
        "::",
        "224.0.0.1",
        "fd00:ec2::254",
        "fe80::1%eth0",
        "::ffff:10.0.0.1",
        "64:ff9b::a9fe:a9fe",
        "2002:7f00:1::1",
        "192.0.2.1",
    ],
)
def test_non_public_addresses_are_named(address: str) -> None:
    assert non_public_reason(address) is not None


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700::1111"])
def test_public_addresses_pass(address: str) -> None:
    assert non_public_reason(address) is None


class _LyingResolver(AbstractResolver):
    """Says a public-looking name lives on loopback (DNS rebinding, a poisoned cache)."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            {
                "hostname": host,
                "host": "127.0.0.1",
                "port": port,
                "family": socket.AF_INET,
                "proto": 0,
                "flags": 0,
            }
        ]

    async def close(self) -> None:
        pass


async def _plain_server(aiohttp_server: AiohttpServer) -> Any:
    async def reached(request: web.Request) -> web.Response:
        return web.Response(text="reached")

    app = web.Application()
    app.router.add_get("/", reached)
    return await aiohttp_server(app)


async def test_the_connected_address_is_checked_not_only_the_name(
    aiohttp_server: AiohttpServer,
) -> None:
    server = await _plain_server(aiohttp_server)
    # The socket factory sees the address each socket is about to connect to.
    connector = aiohttp.TCPConnector(resolver=_LyingResolver(), socket_factory=refuse_non_public)
    async with aiohttp.ClientSession(connector=connector) as session:
        with pytest.raises(aiohttp.ClientConnectorError) as caught:
            await session.get(f"http://public.example:{server.port}/")
    assert isinstance(caught.value.__cause__, ForbiddenAddressError)


async def test_the_peer_is_checked_again_after_connect(aiohttp_server: AiohttpServer) -> None:
    server = await _plain_server(aiohttp_server)
    connector = PublicOnlyConnector(resolver=_LyingResolver())
    async with aiohttp.ClientSession(connector=connector) as session:
        with pytest.raises(aiohttp.ClientOSError) as caught:
            await session.get(f"http://public.example:{server.port}/")
    assert isinstance(caught.value.__cause__, ForbiddenAddressError)
