"""Shared fixtures: a fake OpenAI upstream, relayd in front of it, the official SDK.

Every secret in the suite is a canary: the final check in each test that uses the
``relay`` fixture greps the captured log for them, and :data:`CANARY` watches the
whole run (every log record, every response head and body byte relayd's test
clients receive) and fails the test in which one showed up.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestClient, TestServer
from pytest_aiohttp import AiohttpClient, AiohttpServer

from relayd.app import create_app
from relayd.config import Settings, parse_keys_env, updated
from tests.fakes.openai import UPSTREAM_KEY, FakeOpenAI
from tests.redisserver import RedisServer

RELAY_KEY = "rk-canary-relay-0123456789abcdef"
OTHER_KEY = "rk-canary-other-fedcba9876543210"
SECRETS = (UPSTREAM_KEY, RELAY_KEY, OTHER_KEY)


class CanaryWatch(logging.Handler):
    """Greps every log record and every response relayd's test clients receive.

    Logs: installed on the root logger for the whole run (level DEBUG), so records
    no test asked for are seen too. Responses: :meth:`trace` is an aiohttp
    ``TraceConfig`` given to every relay test client (heads and body chunks, with a
    tail kept so a secret split across chunks is still found); raw-socket helpers
    call :meth:`check` themselves. WebSocket frames and the SDK's httpx traffic are
    not watched here (the realtime tests check their own frames). Nor are the
    SDK's own client libraries' logs: at DEBUG they print the headers the SDK sends.
    """

    CLIENT_LOGGERS = ("websockets", "httpx", "httpcore", "openai", "hpack")

    def __init__(self, secrets: tuple[str, ...]) -> None:
        super().__init__(logging.NOTSET)
        self.secrets = secrets
        self.hits: list[str] = []
        self.test = "(outside any test)"
        # Secrets a test made at run time that relayd legitimately hands to the
        # client (OAuth codes and tokens): watched in log records only.
        self.log_only: list[str] = []

    def watch_logs(self, secret: str) -> str:
        self.log_only.append(secret)
        return secret

    def check(self, where: str, text: str | bytes) -> None:
        data = text if isinstance(text, str) else text.decode("latin-1")
        for secret in self.secrets:
            if secret in data:
                self.hits.append(f"{self.test}: {where} holds {secret[:12]}…")

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(self.CLIENT_LOGGERS):
            return
        text = record.getMessage() + str(getattr(record, "fields", ""))
        if record.exc_info:
            text += logging.Formatter().formatException(record.exc_info)
        self.check(f"log record {record.name}", text)
        for secret in self.log_only:
            if secret in text:
                self.hits.append(f"{self.test}: log record {record.name} holds {secret[:12]}…")

    def trace(self) -> aiohttp.TraceConfig:
        config = aiohttp.TraceConfig()
        overlap = max(len(s) for s in self.secrets)

        async def chunk(_: Any, ctx: Any, params: aiohttp.TraceResponseChunkReceivedParams) -> None:
            data = getattr(ctx, "tail", b"") + params.chunk
            self.check(f"response body {params.method} {params.url.path}", data)
            ctx.tail = data[-overlap:]

        async def end(_: Any, ctx: Any, params: aiohttp.TraceRequestEndParams) -> None:
            self.check(
                f"response head {params.method} {params.url.path}",
                str(params.response.raw_headers),
            )

        config.on_response_chunk_received.append(chunk)
        config.on_request_end.append(end)
        return config


CANARY = CanaryWatch(SECRETS)


@pytest.fixture(scope="session", autouse=True)
def canary_watch() -> Iterator[CanaryWatch]:
    """The final check: nothing captured during the whole run held a canary secret."""
    root = logging.getLogger()
    level = root.level
    root.addHandler(CANARY)
    root.setLevel(logging.DEBUG)
    yield CANARY
    root.removeHandler(CANARY)
    root.setLevel(level)
    assert not CANARY.hits, "canary secrets escaped:\n" + "\n".join(CANARY.hits)


@pytest.fixture(autouse=True)
def private_state_dir(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each test keeps relayd's state (relayd.store.state_dir) in a directory of its
    own, in-process and in the relayd processes it starts, never in the user's."""
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.delenv("RELAYD_STATE_DIR", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))


@pytest.fixture(autouse=True)
def canary_per_test(request: pytest.FixtureRequest, canary_watch: CanaryWatch) -> Iterator[None]:
    """Names the test for :data:`CANARY` and fails it if a secret escaped during it."""
    canary_watch.test = request.node.nodeid
    before = len(canary_watch.hits)
    yield
    canary_watch.test = "(between tests)"
    escaped = canary_watch.hits[before:]
    assert not escaped, "canary secrets escaped:\n" + "\n".join(escaped)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real ``redis-server`` for the run (tests/redisserver.py); tests that stop
    it make their own."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The shared server's URL, emptied for this test."""
    redis_server.start()  # a test may have stopped it
    redis_server.flush()
    return redis_server.url


@pytest.fixture
def fake() -> FakeOpenAI:
    return FakeOpenAI()


@pytest.fixture
async def fake_server(aiohttp_server: AiohttpServer, fake: FakeOpenAI) -> TestServer:
    return await aiohttp_server(fake.app)


def make_settings(
    *layers: Mapping[str, Mapping[str, Any]], **sections: Mapping[str, Any]
) -> Settings:
    """Test settings: a known upstream key, two relay keys, no SSE keepalives, then
    each layer (``{"limits": {"max_json_bytes": 1}}``) and ``sections`` in order."""
    settings = updated(
        Settings(),
        upstream={"api_key": UPSTREAM_KEY, "sse_keepalive_s": None},
        auth={"keys": parse_keys_env(f"team:{RELAY_KEY},other:{OTHER_KEY}")},
    )
    for layer in (*layers, sections):
        settings = updated(settings, **layer)
    return settings


RelayFactory = Callable[..., Any]


@pytest.fixture
def relay_factory(aiohttp_client: AiohttpClient, fake_server: TestServer) -> RelayFactory:
    """Start relayd (in-process, real loopback socket) with settings overrides."""

    async def start(
        *layers: Mapping[str, Mapping[str, Any]], **sections: Mapping[str, Any]
    ) -> TestClient:
        fake_upstream = {"upstream": {"url": str(fake_server.make_url(""))}}
        settings = make_settings(fake_upstream, *layers, **sections)
        return await aiohttp_client(create_app(settings), trace_configs=[CANARY.trace()])

    return start


@pytest.fixture
async def relay(
    relay_factory: RelayFactory, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[TestClient]:
    caplog.set_level(logging.DEBUG)
    client = await relay_factory()
    yield client
    assert_no_secret_logged(caplog)


def assert_no_secret_logged(caplog: pytest.LogCaptureFixture) -> None:
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
