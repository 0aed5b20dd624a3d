"""Bad input on every route: a clear 4xx in OpenAI's error shape, and nothing upstream.

The routes come from the route table, so a route added tomorrow is covered by
the same checks. ``tests/test_security.py`` holds the first examples of each
refusal; these tests sweep them over every route that can meet them.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator

import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient

from relayd.routes import TABLE
from relayd.routing import Body, Exposure, Route
from tests import rawhttp
from tests.conftest import RELAY_KEY, RelayFactory
from tests.fakes.openai import FakeOpenAI
from tests.reliability.conftest import AUTH
from tests.reliability.faults import FaultServer, scripts

KEY = {"Authorization": f"Bearer {RELAY_KEY}"}
MULTIPART = "multipart/form-data; boundary=relaydtestboundary"
CAPS = {"max_body_bytes": 1024 * 1024, "max_json_bytes": 64 * 1024}

ROUTES = [r for r in TABLE if r.exposure is not Exposure.INTERNAL]
WITH_BODY = [r for r in ROUTES if r.body in (Body.JSON, Body.MULTIPART, Body.JSON_OR_MULTIPART)]
# Routes whose JSON body relayd itself parses (and so must refuse when it is bad).
PARSING = [
    r
    for r in ROUTES
    if r.request_schema is not None or r.path in ("/v1/responses:stream", "/v1/realtime/sessions")
]
WITH_PARAMS = [r for r in ROUTES if "{" in r.path]


def ids(routes: list[Route]) -> list[str]:
    return [f"{r.method} {r.path}" for r in routes]


def concrete(path: str, value: str = "x1") -> str:
    return re.sub(r"\{[^}]+\}", value, path)


def assert_openai_error(raw: bytes, status: int) -> dict[str, object]:
    assert 400 <= status < 500, (status, raw[:200])
    error = json.loads(raw)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    return error  # type: ignore[no-any-return]


def nothing_upstream(fake: FakeOpenAI) -> None:
    assert fake.seen == [], [s.path for s in fake.seen]
    assert fake.realtime.sessions == []


async def post_raw(
    relay: TestClient,
    route: Route,
    body: bytes,
    content_type: str | None,
    target: str | None = None,
) -> rawhttp.RawResponse:
    headers = dict(KEY)
    if content_type is not None:
        headers["Content-Type"] = content_type
    return await rawhttp.request(relay, route.method, target or concrete(route.path), headers, body)


# --------------------------------------------------------------------------- media types


@pytest.mark.parametrize("route", WITH_BODY, ids=ids(WITH_BODY))
@pytest.mark.parametrize(
    "content_type",
    ["text/plain", None, "application/x-www-form-urlencoded"],
    ids=["text-plain", "missing", "form-urlencoded"],
)
async def test_a_body_of_the_wrong_or_no_media_type_is_415(
    relay: TestClient, fake: FakeOpenAI, route: Route, content_type: str | None
) -> None:
    async with asyncio.timeout(5):
        response = await post_raw(relay, route, b"{}", content_type)
    assert response.status == 415, route.path
    assert assert_openai_error(response.body, 415)["code"] == "unsupported_media_type"
    nothing_upstream(fake)


MULTIPART_ROUTES = [r for r in WITH_BODY if r.body is not Body.JSON]


@pytest.mark.parametrize("route", MULTIPART_ROUTES, ids=ids(MULTIPART_ROUTES))
async def test_multipart_without_a_boundary_is_400(
    relay: TestClient, fake: FakeOpenAI, route: Route
) -> None:
    async with asyncio.timeout(5):
        response = await post_raw(
            relay, route, b"--x\r\n\r\nhello\r\n--x--\r\n", "multipart/form-data"
        )
    assert response.status == 400
    assert assert_openai_error(response.body, 400)["code"] == "invalid_multipart"
    nothing_upstream(fake)


# --------------------------------------------------------------------------- JSON


BAD_JSON = {
    "malformed": b"{not json",
    "truncated": b'{"model": "gpt-5", "input": "hel',
    "invalid-utf8": b'{"input": "\xff\xfe"}',
    "not-an-object": b"[1, 2, 3]",
    "empty": b" ",
    "nul": b'{"a": 1}\x00',
}


@pytest.mark.parametrize("route", PARSING, ids=ids(PARSING))
async def test_bad_json_on_every_parsing_route_is_400(
    relay: TestClient, fake: FakeOpenAI, route: Route
) -> None:
    for name, body in BAD_JSON.items():
        async with asyncio.timeout(5):
            response = await post_raw(relay, route, body, "application/json")
        assert response.status == 400, (name, response.body[:200])
        assert_openai_error(response.body, 400)
    nothing_upstream(fake)


# --------------------------------------------------------------------------- sizes


async def _declared(relay: TestClient, route: Route, length: int, content_type: str) -> int:
    """Announce ``length`` bytes, send none: the answer must not wait for them."""
    reader, writer = await rawhttp.open_raw(relay)
    try:
        writer.write(
            rawhttp.head(
                route.method,
                concrete(route.path),
                {**KEY, "Content-Type": content_type, "Content-Length": str(length)},
            )
        )
        await writer.drain()
        async with asyncio.timeout(2):
            status, headers = await rawhttp.read_head(reader)
            body = await reader.readexactly(int(headers.get("content-length", "0")))
    finally:
        writer.close()
    assert_openai_error(body, status)
    return status


def _media(route: Route) -> str:
    return "application/json" if route.body in (Body.JSON, Body.JSON_OR_MULTIPART) else MULTIPART


@pytest.mark.parametrize("route", WITH_BODY, ids=ids(WITH_BODY))
async def test_a_declared_body_past_the_cap_is_413_before_reading_it(
    relay_factory: RelayFactory, fake: FakeOpenAI, route: Route
) -> None:
    relay = await relay_factory(limits=CAPS)
    assert await _declared(relay, route, CAPS["max_body_bytes"] + 1, _media(route)) == 413
    if route in PARSING:  # bodies relayd parses have the smaller JSON cap
        assert await _declared(relay, route, CAPS["max_json_bytes"] + 1, _media(route)) == 413
    nothing_upstream(fake)


@pytest.mark.parametrize("route", WITH_BODY, ids=ids(WITH_BODY))
async def test_a_chunked_body_past_the_cap_is_413(
    relay_factory: RelayFactory, route: Route
) -> None:
    relay = await relay_factory(limits=CAPS)
    cap = CAPS["max_json_bytes"] if route in PARSING else CAPS["max_body_bytes"]
    block = b"x" * 65536

    async def body() -> AsyncIterator[bytes]:  # no Content-Length: counted as it streams
        for _ in range(cap // len(block) + 2):
            yield block

    async with asyncio.timeout(10):
        response = await relay.request(
            route.method,
            concrete(route.path),
            data=body(),
            headers={**KEY, "Content-Type": _media(route)},
        )
        raw = await response.read()
    assert response.status == 413, (route.path, raw[:200])
    assert_openai_error(raw, 413)


# --------------------------------------------------------------------------- base64


BASE64_FIELDS = [
    ("/v1/actions/files/upload", {"purpose": "assistants", "filename": "a.txt"}, "data_base64"),
    ("/v1/actions/uploads/upload_1/parts", {}, "data_base64"),
    ("/v1/actions/images/edits", {"prompt": "p"}, "image_base64"),
    ("/v1/actions/images/variations", {}, "image_base64"),
    ("/v1/actions/videos/generations", {"prompt": "p"}, "data_base64"),
    ("/v1/actions/videos/generations", {"prompt": "p"}, "input_reference_base64"),
]
BAD_BASE64 = ["not base64!", "aGk", "====", "data:image/png;base64,@@@", "aGk=\x00"]


@pytest.mark.parametrize(
    ("path", "base", "field"), BASE64_FIELDS, ids=[f"{p}:{f}" for p, _, f in BASE64_FIELDS]
)
async def test_bad_base64_is_400_naming_the_field(
    relay: TestClient, fake: FakeOpenAI, path: str, base: dict[str, str], field: str
) -> None:
    for bad in BAD_BASE64:
        async with asyncio.timeout(5):
            response = await relay.post(path, json={**base, field: bad}, headers=KEY)
            raw = await response.read()
        assert response.status == 400, (bad, raw[:200])
        # input_reference_base64 is an alias, reported under the name it stands for.
        expected = "data_base64" if field == "input_reference_base64" else field
        assert assert_openai_error(raw, 400)["param"] == expected, bad
    nothing_upstream(fake)


# --------------------------------------------------------------------------- paths

TRICKS = ["..%2Forganization%2Fusers", "%2e%2e", "a%5C..%5Cb", "x%00y", "%2F", "", ".", ".."]


@pytest.mark.parametrize("route", WITH_PARAMS, ids=ids(WITH_PARAMS))
async def test_path_tricks_in_every_route_family_never_reach_upstream(
    relay_factory: RelayFactory, fake: FakeOpenAI, route: Route
) -> None:
    relay = await relay_factory(
        policy={"allow": ("/v1/*",), "deny": ("/v1/organization*",)},
    )
    for trick in TRICKS:
        first, *_ = re.findall(r"\{[^}]+\}", route.path)
        if not trick and route.path.endswith(first):
            continue  # a trailing slash, not an empty segment: a path like any other
        target = concrete(route.path.replace(first, trick, 1))
        body = b"{}" if route.body is not Body.NONE else b""
        async with asyncio.timeout(5):
            response = await post_raw(
                relay, route, body, "application/json" if body else None, target
            )
        assert 400 <= response.status < 500, (target, response.status)
        if response.headers.get("content-type", "").startswith("application/json"):
            assert_openai_error(response.body, response.status)
    nothing_upstream(fake)


# --------------------------------------------------------------------------- heads


@pytest.mark.parametrize(
    "head",
    [
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Bad: a\rb\r\n",  # bare CR
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Bad: a\nX-Injected: b\r\n",  # bare LF
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Bad: a\r\n folded\r\n",  # obs-fold
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n",
        b"GET /v1/mo\xffdels HTTP/1.1\r\nHost: x\r\n",  # invalid byte in the target
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-H%d: v\r\n" % i for i in range(200)),  # too many header lines
        b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
        b"Transfer-Encoding: chunked\r\n",  # both lengths: a smuggling classic
    ],
    ids=[
        "bare-cr",
        "bare-lf",
        "obs-fold",
        "huge-header-line",
        "invalid-target-byte",
        "too-many-headers",
        "cl-and-te",
    ],
)
async def test_a_malformed_head_is_refused_and_nothing_goes_upstream(
    relay: TestClient, fake: FakeOpenAI, head: bytes
) -> None:
    raw = head + b"Authorization: Bearer " + RELAY_KEY.encode() + b"\r\n\r\n"
    reader, writer = await rawhttp.open_raw(relay)
    try:
        writer.write(raw)
        await writer.drain()
        async with asyncio.timeout(3):
            status, _ = await rawhttp.read_head(reader)
            rest = await reader.read()
    finally:
        writer.close()
    assert status in (400, 431)
    assert RELAY_KEY.encode() not in rest  # see the xfail below for the shape
    nothing_upstream(fake)


@pytest.mark.xfail(
    strict=True,
    reason="aiohttp answers a head its parser rejects itself (plain text, quoting the "
    "offending line) before any middleware runs; relayd would need its own "
    "RequestHandler to answer in OpenAI's shape (431 for a too-long header line)",
)
async def test_a_malformed_head_gets_openai_shape_without_echoing_it(relay: TestClient) -> None:
    head = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + b"rk-echo\rX: y"
    reader, writer = await rawhttp.open_raw(relay)
    try:
        writer.write(head + b"\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(3):
            status, headers = await rawhttp.read_head(reader)
            rest = await reader.read()
    finally:
        writer.close()
    assert b"rk-echo" not in rest
    assert_openai_error(rest, status)


# --------------------------------------------------------------------------- WebSocket


async def test_oversized_binary_frame_from_the_client_closes_1009_and_upstream_1011(
    relay_factory: RelayFactory, fake: FakeOpenAI
) -> None:
    relay = await relay_factory(realtime={"max_message_bytes": 1024})
    async with asyncio.timeout(5):
        async with relay.ws_connect("/v1/realtime?model=gpt-realtime", headers=KEY) as ws:
            await ws.send_bytes(b"\x00" * 4096)
            msg = await ws.receive()
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1009)
        while fake.realtime.last().close_code is None:
            await asyncio.sleep(0.01)
    assert fake.realtime.last().close_code == 1011


async def test_oversized_frame_from_upstream_never_reaches_the_client(
    relay_factory: RelayFactory, fault_server: FaultServer
) -> None:
    fault_server.script = scripts.websocket("stall", frames=(b"x" * 4096,))
    relay = await relay_factory(
        upstream={"url": fault_server.url},
        realtime={"max_message_bytes": 1024},
    )
    async with asyncio.timeout(5):
        async with relay.ws_connect("/v1/realtime?model=gpt-realtime", headers=AUTH) as ws:
            msg = await ws.receive()
    assert msg.type is WSMsgType.CLOSE and msg.data == 1011, msg
