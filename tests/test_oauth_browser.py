"""The login page in a real browser: Debian's chromium, driven by chromedriver over
the W3C WebDriver HTTP API on loopback (no client library needed for five calls).

The page renders, a wrong key shows a clear error and no code, the right key
sends the browser to the app's redirect URI with ``code``, ``state`` and ``iss``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from relayd.app import create_app
from tests.browser import CHROMEDRIVER, CHROMIUM, headless_args
from tests.conftest import CANARY, RELAY_KEY, make_settings
from tests.oauthflow import pkce_pair, request_params
from tests.test_oauth import PUBLIC_URL

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # W3C WebDriver's element reference key


class Browser:
    """One WebDriver session: navigate, find, type, click, read."""

    def __init__(self, http: aiohttp.ClientSession, base: str, session: str) -> None:
        self._http, self._base = http, f"{base}/session/{session}"

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        async with self._http.request(method, self._base + path, json=body) as response:
            answer = await response.json()
            assert response.status == 200, answer
            return answer["value"]

    async def go(self, url: str) -> None:
        await self._call("POST", "/url", {"url": url})

    async def find(self, css: str) -> str:
        found = await self._call("POST", "/element", {"using": "css selector", "value": css})
        return str(found[ELEMENT])

    async def type(self, css: str, text: str) -> None:
        await self._call("POST", f"/element/{await self.find(css)}/value", {"text": text})

    async def click(self, css: str) -> None:
        await self._call("POST", f"/element/{await self.find(css)}/click", {})

    async def text(self, css: str) -> str:
        return str(await self._call("GET", f"/element/{await self.find(css)}/text"))

    async def url(self) -> str:
        return str(await self._call("GET", "/url"))

    async def wait_for_path(self, path: str) -> str:
        """The URL once the browser got to ``path`` (a click's navigation is not
        awaited by WebDriver); bounded by the caller's timeout."""
        while urlsplit(url := await self.url()).path != path:
            await asyncio.sleep(0.05)
        return url

    async def title(self) -> str:
        return str(await self._call("GET", "/title"))


@pytest.fixture
async def browser(tmp_path: Path, unused_tcp_port: int) -> AsyncIterator[Browser]:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip(
            "LOUD SKIP: chromium or chromedriver is not installed "
            "(apt-get install -y chromium chromium-driver); the login page was not "
            "tried in a browser"
        )
    driver = await asyncio.create_subprocess_exec(
        CHROMEDRIVER,
        f"--port={unused_tcp_port}",
        "--allowed-ips=127.0.0.1",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{unused_tcp_port}"
    try:
        async with aiohttp.ClientSession() as http:
            async with asyncio.timeout(15):
                while True:
                    with contextlib.suppress(aiohttp.ClientError):
                        async with http.get(f"{base}/status") as status:
                            if (await status.json())["value"]["ready"]:
                                break
                    await asyncio.sleep(0.05)  # polling chromedriver's readiness, bounded
            options = {
                "binary": CHROMIUM,
                "args": headless_args(tmp_path / "profile"),
            }
            capabilities = {"alwaysMatch": {"goog:chromeOptions": options}}
            async with asyncio.timeout(30):
                async with http.post(
                    f"{base}/session", json={"capabilities": capabilities}
                ) as created:
                    answer = await created.json()
                    assert created.status == 200, answer
            session = answer["value"]["sessionId"]
            # Finding an element waits up to 5 s for it: a click's page load is not awaited.
            async with http.post(
                f"{base}/session/{session}/timeouts", json={"implicit": 5000}
            ) as timeouts:
                assert timeouts.status == 200
            try:
                yield Browser(http, base, session)
            finally:
                async with http.delete(f"{base}/session/{session}"):
                    pass
    finally:
        driver.terminate()
        async with asyncio.timeout(10):
            await driver.wait()


async def _app_callback(request: web.Request) -> web.Response:
    return web.Response(text="<title>linked</title>app callback", content_type="text/html")


async def test_the_login_page_works_in_a_real_browser(
    browser: Browser, aiohttp_server: AiohttpServer
) -> None:
    app = web.Application()
    app.router.add_get("/callback", _app_callback)
    # No access log: the app's callback URL carries the code (relayd logs no query).
    callback_server: TestServer = await aiohttp_server(app, access_log=None)
    callback = str(callback_server.make_url("/callback"))
    settings = make_settings(server={"public_url": PUBLIC_URL})
    relay: TestServer = await aiohttp_server(create_app(settings))
    async with aiohttp.ClientSession() as http:
        registered = await http.post(
            relay.make_url("/oauth/register"),
            json={"redirect_uris": [callback], "client_name": "Browser test app"},
        )
        client_id = (await registered.json())["client_id"]
    _, challenge = pkce_pair()
    params = request_params(client_id, challenge, redirect_uri=callback, scope="mcp")
    page = relay.make_url("/oauth/authorize").with_query(params)

    async with asyncio.timeout(60):
        await browser.go(str(page))
        assert "Link an app" in await browser.title()
        assert "Browser test app" in await browser.text("main")

        await browser.type("#relay_key", "rk-this-is-not-the-key-0000")
        await browser.click("button[value=allow]")
        assert "not a valid relay key" in await browser.text("#login-error")
        assert urlsplit(await browser.url()).path == "/oauth/authorize"

        await browser.type("#relay_key", RELAY_KEY)
        await browser.click("button[value=allow]")
        landed = urlsplit(await browser.wait_for_path(urlsplit(callback).path))
    assert f"{landed.scheme}://{landed.netloc}{landed.path}" == callback
    answer = {k: v[0] for k, v in parse_qs(landed.query).items()}
    CANARY.watch_logs(answer["code"])
    prefixed = answer["code"].startswith("rlyac_")
    assert prefixed, "the redirect carries a code"
    assert answer["state"] == params["state"]
    assert answer["iss"] == PUBLIC_URL
