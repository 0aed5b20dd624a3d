"""Two relayd applications sharing one redis-server behave as one relay: a link made
through one is served by the other, an app linked through one is honoured by the
other, and a store that stops answering is a 503, never a 401 or a hang.

The OAuth tests imported at the end are tests/test_oauth.py's own, run here with this
module's ``start`` fixture: the same behaviour over the Redis grant store.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient
from redis.asyncio import Redis

from relayd.app import create_app
from relayd.config import ConfigError
from relayd.oauth.endpoints import COOKIE
from tests.conftest import CANARY, RELAY_KEY, RelayFactory, make_settings
from tests.fakes.openai import FakeOpenAI
from tests.filehost import PNG
from tests.oauthflow import (
    bearer,
    hidden_fields,
    login,
    pkce_pair,
    refresh,
    register,
    request_params,
    tokens,
)
from tests.redisserver import RedisServer

# The tests of tests/test_oauth.py this module runs again over Redis (pytest collects
# them here, where ``start`` and ``relay`` are this module's).
from tests.test_oauth import (  # noqa: F401
    MCP,
    PING,
    PUBLIC_URL,
    test_a_linked_app_acts_as_the_key_and_refreshes,
    test_a_removed_or_rotated_key_kills_its_tokens,
    test_a_reused_code_fails_and_revokes_what_it_issued,
    test_a_reused_refresh_token_revokes_the_family,
    test_an_expired_code_is_refused,
    test_failed_logins_are_limited_per_address,
    test_revoke_ends_the_grant,
    test_token_requests_are_checked_exactly,
)

SECRET = "signing-secret-for-every-instance-0123456789"
LINKS = "https://relay.example.com"

Start = Callable[..., Awaitable[TestClient]]


def shared(url: str, **store: Any) -> dict[str, Any]:
    """The sections that put a relay on the shared store at ``url``."""
    return {
        "store": {"backend": "redis", "redis_url": url, **store},
        "actions": {"signing_secret": SECRET, "inline_max_bytes": 0},
    }


@pytest.fixture
def start(aiohttp_client: AiohttpClient, redis_url: str) -> Start:
    """tests/test_oauth.py's ``start``, on the shared store."""

    async def start(**sections: Any) -> TestClient:
        sections.setdefault("server", {"public_url": PUBLIC_URL})
        settings = make_settings(shared(redis_url), **sections)
        return await aiohttp_client(create_app(settings), trace_configs=[CANARY.trace()])

    return start


@pytest.fixture
async def relay(start: Start) -> TestClient:
    return await start()


async def test_an_image_made_through_one_instance_is_fetched_through_the_other(
    relay_factory: RelayFactory, fake: FakeOpenAI, redis_url: str
) -> None:
    maker = await relay_factory(shared(redis_url), server={"public_url": LINKS})
    other = await relay_factory(shared(redis_url), server={"public_url": LINKS})
    fake.image_bytes = PNG
    made = await maker.post(
        "/v1/actions/images/generations",
        json={"prompt": "p"},
        headers={"Authorization": f"Bearer {RELAY_KEY}"},
    )
    assert made.status == 200
    (link,) = (await made.json())["openaiFileResponse"]
    fetched = await other.get(link.removeprefix(LINKS))  # no key: the signature is the credential
    assert fetched.status == 200
    assert await fetched.read() == PNG
    assert fetched.headers["Content-Type"] == "image/png"
    assert fetched.headers["Content-Disposition"].startswith('attachment; filename="image-1.png"')


async def test_workers_of_one_machine_share_links_without_a_configured_secret(
    relay_factory: RelayFactory, fake: FakeOpenAI
) -> None:
    local = {"actions": {"inline_max_bytes": 0}, "server": {"public_url": LINKS}}
    maker, other = await relay_factory(local), await relay_factory(local)  # one state dir
    fake.image_bytes = PNG
    made = await maker.post(
        "/v1/actions/images/generations",
        json={"prompt": "p"},
        headers={"Authorization": f"Bearer {RELAY_KEY}"},
    )
    (link,) = (await made.json())["openaiFileResponse"]
    fetched = await other.get(link.removeprefix(LINKS))
    assert fetched.status == 200
    assert await fetched.read() == PNG


async def test_an_app_linked_through_one_instance_works_through_the_other(
    start: Start,
) -> None:
    first, second = await start(), await start()
    client_id = await register(first)
    done = await login(first, client_id, RELAY_KEY, scope="mcp offline_access")
    status, granted = await tokens(second, done)  # the code is redeemed elsewhere
    assert status == 200, granted
    assert (await second.post(MCP.path, json=PING, headers=bearer(granted["access_token"]))).ok
    status, renewed = await refresh(second, client_id, granted["refresh_token"])
    assert status == 200
    # The rotation holds for both: the old refresh token is a replay on the first,
    # which revokes the grant everywhere.
    status, body = await refresh(first, client_id, granted["refresh_token"])
    assert (status, body["error"]) == (400, "invalid_grant")
    ended = await first.post(MCP.path, json=PING, headers=bearer(renewed["access_token"]))
    assert ended.status == 401


async def test_a_grant_store_that_stops_answering_is_a_503_then_recovers(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        settings = make_settings(
            shared(server.url, timeout_s=0.2), server={"public_url": PUBLIC_URL}
        )
        relay = await aiohttp_client(create_app(settings), trace_configs=[CANARY.trace()])
        client_id = await register(relay)
        _, granted = await tokens(relay, await login(relay, client_id, RELAY_KEY))
        server.stop()
        started = time.monotonic()
        down = await relay.post(MCP.path, json=PING, headers=bearer(granted["access_token"]))
        assert time.monotonic() - started < 2
        assert down.status == 503  # never a 401: ChatGPT would drop the token
        error = (await down.json())["error"]
        assert error["code"] == "store_unavailable"
        assert down.headers["Retry-After"] == "1"
        assert (await relay.get("/health")).status == 200
        server.start()  # an empty server again: the token is gone, but nothing hangs
        after = await relay.post(MCP.path, json=PING, headers=bearer(granted["access_token"]))
        assert after.status == 401
        assert (await relay.post(MCP.path, json=PING, headers=bearer(RELAY_KEY))).status == 200
    finally:
        server.stop()


async def test_the_token_endpoint_answers_503_in_oauths_shape_when_the_store_is_down(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        settings = make_settings(
            shared(server.url, timeout_s=0.2), server={"public_url": PUBLIC_URL}
        )
        relay = await aiohttp_client(create_app(settings))
        client_id = await register(relay)
        done = await login(relay, client_id, RELAY_KEY)
        server.stop()
        status, body = await tokens(relay, done)
        assert (status, body["error"]) == (503, "temporarily_unavailable")
    finally:
        server.stop()


def test_without_a_signing_secret_a_redis_relay_is_not_built(redis_url: str) -> None:
    settings = make_settings(store={"backend": "redis", "redis_url": redis_url})
    with pytest.raises(ConfigError, match="actions_signing_secret"):
        create_app(settings)


async def test_the_redis_grant_store_holds_no_code_or_token(start: Start, redis_url: str) -> None:
    relay = await start()
    client_id = await register(relay)
    done = await login(relay, client_id, RELAY_KEY, scope="mcp offline_access")
    _, granted = await tokens(relay, done)
    _, renewed = await refresh(relay, client_id, granted["refresh_token"])
    server = Redis.from_url(redis_url)
    try:
        stored = b""
        for name in await server.keys("*"):
            kind = await server.type(name)
            stored += name
            if kind == b"hash":
                stored += b"".join(k + v for k, v in (await server.hgetall(name)).items())
            elif kind == b"string":
                stored += await server.get(name) or b""
    finally:
        await server.aclose()
    issued = [done.code, *granted.values(), *renewed.values(), RELAY_KEY]
    found = [str(i)[:6] for i in issued if len(str(i)) > 20 and str(i).encode() in stored]
    assert not found, f"stored in the clear: {found}"


async def test_a_login_page_shown_by_one_instance_is_posted_to_the_other(start: Start) -> None:
    first, second = await start(), await start()
    client_id = await register(first)
    _, challenge = pkce_pair()
    page = await first.get("/oauth/authorize", params=request_params(client_id, challenge))
    assert page.status == 200
    form = hidden_fields(await page.text()) | {"relay_key": RELAY_KEY, "action": "allow"}
    cookie = {"Cookie": f"{COOKIE}={page.cookies[COOKIE].value}"}
    posted = await second.post("/oauth/authorize", data=form, headers=cookie, allow_redirects=False)
    assert posted.status == 303  # the form's CSRF key is the shared store's
    assert "code=" in posted.headers["Location"]
