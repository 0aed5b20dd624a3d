"""Client ID metadata documents: allowlisted https URLs, fetched with care, trusted
only for what they say about themselves.

A stand-in for ChatGPT's document host runs on loopback over https (a throwaway
CA), serving a good document and each kind of bad one.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pytest_aiohttp import AiohttpClient, AiohttpServer

from relayd.app import create_app
from relayd.oauth.clients import client_from_document, document_allowed
from relayd.oauth.errors import LoginPageError
from tests.conftest import RELAY_KEY, make_settings
from tests.oauthflow import REDIRECT, login, tokens
from tests.test_oauth import PUBLIC_URL


class DocumentHost:
    def __init__(self) -> None:
        self.server: TestServer | None = None

    def url(self, name: str) -> str:
        assert self.server is not None
        return str(self.server.make_url(f"/{name}/client.json"))

    def document(self, name: str, **fields: Any) -> dict[str, Any]:
        document = {
            "client_id": self.url(name),
            "client_name": "ChatGPT (stand-in)",
            "redirect_uris": [REDIRECT],
            # ChatGPT's: private_key_jwt first; the legacy singular field is not read.
            "token_endpoint_auth_methods_supported": ["private_key_jwt", "none"],
            "token_endpoint_auth_method": "private_key_jwt",
        }
        document.update(fields)
        return document

    async def serve(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name == "moved":
            raise web.HTTPFound(self.url("good"))
        if name == "big":
            return web.json_response(self.document(name, padding="x" * 100_000))
        if name == "text":
            return web.Response(text=json.dumps(self.document(name)))
        if name == "liar":
            return web.json_response(self.document(name, client_id=self.url("good")))
        if name == "secretive":
            return web.json_response(self.document(name, client_secret="s3cret"))
        if name == "jwt-only":
            return web.json_response(
                self.document(name, token_endpoint_auth_methods_supported=["private_key_jwt"])
            )
        if name == "slow":
            await asyncio.sleep(5)
        return web.json_response(self.document(name))


@pytest.fixture
async def host(aiohttp_server: AiohttpServer) -> DocumentHost:
    host = DocumentHost()
    app = web.Application()
    app.router.add_get("/{name}/client.json", host.serve)
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    host.server = await aiohttp_server(app, ssl=context)
    host.ca_pem = ca.cert_pem  # type: ignore[attr-defined]
    return host


@pytest.fixture
async def relay(host: DocumentHost, aiohttp_client: AiohttpClient, tmp_path: Path) -> TestClient:
    ca_file = tmp_path / "ca.pem"
    host.ca_pem.write_to_path(str(ca_file))  # type: ignore[attr-defined]
    assert host.server is not None
    origin = str(host.server.make_url("")).rstrip("/")
    settings = make_settings(
        server={"public_url": PUBLIC_URL},
        oauth={
            "client_documents": (f"{origin}/*/client.json",),
            "client_document_timeout_s": 0.5,
        },
        # The link session may reach the loopback stand-in (tests only).
        actions={"fetch_allow_private": True, "fetch_ca_file": str(ca_file)},
    )
    return await aiohttp_client(create_app(settings))


async def test_a_document_client_links_and_gets_tokens(
    relay: TestClient, host: DocumentHost
) -> None:
    done = await login(relay, host.url("good"), RELAY_KEY, scope="mcp offline_access")
    status, granted = await tokens(relay, done)
    assert status == 200, granted
    assert "refresh_token" in granted


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("moved", "redirect"),
        ("big", "larger than"),
        ("text", "is not JSON"),
        ("liar", "names another client_id"),
        ("secretive", "client secret"),
        ("jwt-only", "token endpoint auth method"),
        ("slow", "took longer"),
    ],
)
async def test_a_bad_document_is_a_page_never_a_redirect(
    relay: TestClient, host: DocumentHost, name: str, reason: str
) -> None:
    params = {
        "response_type": "code",
        "client_id": host.url(name),
        "redirect_uri": REDIRECT,
        "code_challenge": "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM",
        "code_challenge_method": "S256",
        "state": "s",
    }
    async with asyncio.timeout(5):
        page = await relay.get("/oauth/authorize", params=params, allow_redirects=False)
    assert page.status == 400
    assert "Location" not in page.headers
    assert reason in await page.text()


async def test_a_document_outside_the_allowlist_is_never_fetched(
    relay: TestClient, host: DocumentHost
) -> None:
    client_id = host.url("good").replace("/good/client.json", "/a/b/client.json")
    page = await relay.get(
        "/oauth/authorize", params={"client_id": client_id, "redirect_uri": REDIRECT}
    )
    assert page.status == 400
    assert "not one this relay trusts" in await page.text()


def test_a_star_is_one_path_segment() -> None:
    patterns = ("https://chatgpt.com/oauth/*/client.json", "https://chatgpt.com/oauth/client.json")
    assert document_allowed("https://chatgpt.com/oauth/client.json", patterns)
    assert document_allowed("https://chatgpt.com/oauth/abc_D-9/client.json", patterns)
    assert not document_allowed("https://chatgpt.com/oauth/a/b/client.json", patterns)
    assert not document_allowed("https://chatgpt.com/oauth/../client.json", patterns)
    assert not document_allowed("https://chatgpt.com.evil.example/oauth/client.json", patterns)
    assert not document_allowed("https://chatgpt.com/oauth/client.json?x=1", patterns)


def test_redirect_uris_come_from_the_document_alone() -> None:
    url = "https://chatgpt.com/oauth/client.json"
    client = client_from_document(
        url, json.dumps({"client_id": url, "redirect_uris": [REDIRECT]}).encode()
    )
    assert client.redirect_uris == (REDIRECT,)
    assert client.auth_method == "none"
    with pytest.raises(LoginPageError, match="must be https"):
        client_from_document(
            url, json.dumps({"client_id": url, "redirect_uris": ["http://a.example/cb"]}).encode()
        )
