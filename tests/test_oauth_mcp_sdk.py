"""The official MCP Python SDK's OAuth client provider does the whole dance with
relayd: a 401 from /mcp, protected resource metadata, server metadata, dynamic
registration, the login form posted with a relay key, the token; its client then
lists the tools, and does again after a refresh.

relayd listens on a port chosen first, so its public url (the test's loopback
origin) is the URL the SDK really reaches: the SDK checks every URL it is given.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import parse_qs, urlsplit

import aiohttp
import httpx2
import pytest
from aiohttp.test_utils import TestServer
from mcp import Client
from mcp.client.auth import OAuthClientProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import (
    AuthorizationCodeResult,
    OAuthClientInformationFull,
    OAuthClientMetadata,
    OAuthToken,
)
from pytest_aiohttp import AiohttpServer

from relayd.app import create_app
from relayd.openapi import DEFAULT_ACTIONS
from tests.conftest import CANARY, RELAY_KEY, make_settings
from tests.oauthflow import hidden_fields
from tests.test_oauth import MCP

CALLBACK = "http://127.0.0.1:9/callback"  # never reached: the test reads the redirect


class MemoryStorage:
    """The SDK's TokenStorage, in memory; every token it sees is watched in logs."""

    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client: OAuthClientInformationFull | None = None
        self.saved: list[OAuthToken] = []

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        CANARY.watch_logs(tokens.access_token)
        if tokens.refresh_token:
            CANARY.watch_logs(tokens.refresh_token)
        self.tokens = tokens
        self.saved.append(tokens)

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client = client_info


class Person:
    """What the user does in the browser: open the page, type the key, get sent back."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.answer: dict[str, str] = {}
        self.pages = 0

    async def open(self, url: str) -> None:
        self.pages += 1
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(cookie_jar=jar) as browser, asyncio.timeout(10):
            page = await browser.get(url)
            assert page.status == 200, await page.text()
            form = hidden_fields(await page.text()) | {"relay_key": self.key, "action": "allow"}
            posted = await browser.post(url, data=form, allow_redirects=False)
            assert posted.status == 303, await posted.text()
            location = posted.headers["Location"]
        self.answer = {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
        CANARY.watch_logs(self.answer["code"])

    async def back(self) -> AuthorizationCodeResult:
        return AuthorizationCodeResult(
            code=self.answer["code"], state=self.answer.get("state"), iss=self.answer.get("iss")
        )


@pytest.fixture
async def relayd_url(aiohttp_server: AiohttpServer, unused_tcp_port: int) -> AsyncIterator[str]:
    origin = f"http://127.0.0.1:{unused_tcp_port}"
    settings = make_settings(server={"public_url": origin})
    server: TestServer = await aiohttp_server(create_app(settings), port=unused_tcp_port)
    assert str(server.make_url("")).rstrip("/") == origin
    yield origin


def _provider(url: str, person: Person, storage: MemoryStorage) -> OAuthClientProvider:
    metadata = OAuthClientMetadata(
        client_name="MCP SDK test",
        redirect_uris=[CALLBACK],  # type: ignore[list-item]
        grant_types=["authorization_code", "refresh_token"],
        response_types=["code"],
        token_endpoint_auth_method="none",
    )
    return OAuthClientProvider(
        server_url=url,
        client_metadata=metadata,
        storage=storage,
        redirect_handler=person.open,
        callback_handler=person.back,
    )


async def _list_tools(url: str, http: httpx2.AsyncClient) -> list[str]:
    transport = streamable_http_client(url, http_client=http)
    async with Client(transport, mode="legacy", read_timeout_seconds=20) as client:
        listed = await client.list_tools()
    return sorted(tool.name for tool in listed.tools)


async def test_the_sdk_links_with_a_relay_key_lists_tools_and_refreshes(relayd_url: str) -> None:
    mcp_url = relayd_url + MCP.path
    person, storage = Person(RELAY_KEY), MemoryStorage()
    provider = _provider(mcp_url, person, storage)
    async with httpx2.AsyncClient(auth=provider, timeout=20) as http, asyncio.timeout(60):
        tools = await _list_tools(mcp_url, http)
        assert tools == sorted(DEFAULT_ACTIONS)
        assert person.pages == 1
        assert storage.client is not None and storage.client.client_id.startswith("rlyc_")
        assert storage.tokens is not None and storage.tokens.refresh_token
        granted = storage.tokens

        provider.context.token_expiry_time = 1.0  # as if an hour had passed: the SDK refreshes
        assert await _list_tools(mcp_url, http) == tools
    assert person.pages == 1  # the refresh needed nobody
    assert storage.tokens is not None
    # Compared without showing them: a failing assertion prints its operands.
    rotated = (
        storage.tokens.access_token != granted.access_token
        and storage.tokens.refresh_token != granted.refresh_token
    )
    assert rotated, "the refresh gave no new tokens"
