"""Shared fixtures: a fake OpenAI upstream, relayd in front of it, the official SDK.

Every secret in the suite is a canary: the final check in each test that uses the
``relay`` fixture greps the captured log for them.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestClient, TestServer
from pytest_aiohttp import AiohttpClient, AiohttpServer

from relayd.app import create_app
from relayd.config import Settings, parse_keys_env
from tests.fakes.openai import UPSTREAM_KEY, FakeOpenAI

RELAY_KEY = "rk-canary-relay-0123456789abcdef"
OTHER_KEY = "rk-canary-other-fedcba9876543210"
SECRETS = (UPSTREAM_KEY, RELAY_KEY, OTHER_KEY)


@pytest.fixture
def fake() -> FakeOpenAI:
    return FakeOpenAI()


@pytest.fixture
async def fake_server(aiohttp_server: AiohttpServer, fake: FakeOpenAI) -> TestServer:
    return await aiohttp_server(fake.app)


def make_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "upstream_key": UPSTREAM_KEY,
        "keys": parse_keys_env(f"team:{RELAY_KEY},other:{OTHER_KEY}"),
        "sse_keepalive_s": None,
    }
    values.update(overrides)
    return Settings(**values)


RelayFactory = Callable[..., Any]


@pytest.fixture
def relay_factory(aiohttp_client: AiohttpClient, fake_server: TestServer) -> RelayFactory:
    """Start relayd (in-process, real loopback socket) with settings overrides."""

    async def start(**overrides: Any) -> TestClient:
        overrides.setdefault("upstream_url", str(fake_server.make_url("")))
        settings = make_settings(**overrides)
        return await aiohttp_client(create_app(settings))

    return start


@pytest.fixture
async def relay(
    relay_factory: RelayFactory, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[TestClient]:
    caplog.set_level(logging.DEBUG)
    client = await relay_factory()
    yield client
    for record in caplog.records:
        line = record.getMessage() + str(getattr(record, "fields", ""))
        for secret in SECRETS:
            assert secret not in line, f"a secret reached the log: {record.name}"


@pytest.fixture
def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {RELAY_KEY}"}


@pytest.fixture
async def sdk(relay: TestClient) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(
        base_url=str(relay.make_url("/v1")), api_key=RELAY_KEY, max_retries=0, timeout=30
    )
    async with client:
        yield client
