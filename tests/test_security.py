"""Security model (docs/security.md): relay keys, credential hygiene, refusals in
OpenAI's shape."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import socket
from collections.abc import Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from relayd.config import RelayKey, parse_keys_env
from relayd.headers import redact_secrets
from tests import rawhttp
from tests.conftest import OTHER_KEY, RELAY_KEY, RelayFactory
from tests.fakes.openai import UPSTREAM_KEY, FakeOpenAI, Scripted, error_answer


def assert_openai_error(body: dict[str, object], code: str | None = None) -> None:
    error = body["error"]
    assert isinstance(error, dict)
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": f"Bearer {RELAY_KEY}"},
        {"X-Relay-Key": RELAY_KEY},
        {"Authorization": f"bearer {OTHER_KEY}"},
    ],
    ids=["bearer", "x-relay-key", "lowercase-scheme"],
)
async def test_relay_key_is_accepted_where_clients_put_it(
    relay: TestClient, headers: dict[str, str]
) -> None:
    response = await relay.get("/v1/models", headers=headers)
    assert response.status == 200


@pytest.mark.parametrize(
    "headers, code",
    [
        ({}, "missing_api_key"),
        ({"Authorization": "Bearer rk-wrong-key-0000000000000"}, "invalid_api_key"),
        ({"Authorization": f"Basic {RELAY_KEY}"}, "missing_api_key"),
        ({"Authorization": f"Bearer {UPSTREAM_KEY}"}, "invalid_api_key"),
    ],
    ids=["missing", "wrong", "wrong-scheme", "upstream-key-is-not-a-relay-key"],
)
async def test_bad_or_missing_key_is_401_and_nothing_goes_upstream(
    relay: TestClient, fake: FakeOpenAI, headers: dict[str, str], code: str
) -> None:
    response = await relay.post("/v1/responses", json={"model": "gpt-5"}, headers=headers)
    assert response.status == 401
    assert_openai_error(await response.json(), code)
    assert fake.seen == []


async def test_auth_happens_before_the_body_is_read(relay: TestClient, fake: FakeOpenAI) -> None:
    # A 100 MB upload announced without a key: the 401 must come back while the
    # body is still unsent (peer-failures: uploads allocate before authentication).
    reader, writer = await rawhttp.open_raw(relay)
    try:
        async with asyncio.timeout(2):
            writer.write(
                rawhttp.head(
                    "POST",
                    "/v1/files",
                    {
                        "Content-Type": "multipart/form-data; boundary=x",
                        "Content-Length": str(100 * 1024 * 1024),
                    },
                )
            )
            await writer.drain()
            status, _ = await rawhttp.read_head(reader)
    finally:
        writer.close()
    assert status == 401
    assert fake.seen == []


async def _expect_continue(
    relay: TestClient, headers: dict[str, str], body: bytes, *, length: int | None = None
) -> list[int]:
    """Statuses a client announcing ``Expect: 100-continue`` sees, in order.

    The body goes out only after a 100, as a client that waits for it would do.
    """
    reader, writer = await rawhttp.open_raw(relay)
    statuses = []
    try:
        async with asyncio.timeout(2):
            writer.write(
                rawhttp.head(
                    "POST",
                    "/v1/embeddings",
                    {
                        **headers,
                        "Content-Type": "application/json",
                        "Content-Length": str(len(body) if length is None else length),
                        "Expect": "100-continue",
                        "Connection": "close",
                    },
                )
            )
            await writer.drain()
            status, _ = await rawhttp.read_head(reader)
            statuses.append(status)
            if status == 100:
                writer.write(body)
                await writer.drain()
                status, _ = await rawhttp.read_head(reader)
                statuses.append(status)
    finally:
        writer.close()
    return statuses


async def test_expect_continue_is_answered_only_after_auth_and_limits(
    relay_factory: RelayFactory, fake: FakeOpenAI
) -> None:
    relay = await relay_factory(limits={"max_body_bytes": 1024})
    body = json.dumps({"model": "text-embedding-3-small", "input": "hi"}).encode()
    auth = {"Authorization": f"Bearer {RELAY_KEY}"}
    assert await _expect_continue(relay, {}, body) == [401]
    assert await _expect_continue(relay, {"Authorization": "Bearer rk-wrong"}, body) == [401]
    assert await _expect_continue(relay, auth, body, length=4096) == [413]
    assert fake.seen == []
    assert await _expect_continue(relay, auth, body) == [100, 200]
    assert json.loads(fake.last("/v1/embeddings").body)["input"] == "hi"


async def test_an_unknown_expectation_is_a_417_after_auth(relay: TestClient) -> None:
    auth = {"Authorization": f"Bearer {RELAY_KEY}"}
    for headers, status in (({"Expect": "x-teapot"}, 401), ({**auth, "Expect": "x-teapot"}, 417)):
        response = await rawhttp.request(
            relay,
            "POST",
            "/v1/embeddings",
            {**headers, "Content-Type": "application/json"},
            b"{}",
        )
        assert response.status == status
        assert_openai_error(json.loads(response.body))


async def test_scoped_key_reaches_only_its_groups(
    relay_factory: RelayFactory, fake: FakeOpenAI
) -> None:
    scoped = RelayKey(
        "scraper", hashlib.sha256(b"rk-scoped-key-000000000").digest(), frozenset({"models"})
    )
    relay = await relay_factory(auth={"keys": (scoped,)})
    headers = {"Authorization": "Bearer rk-scoped-key-000000000"}
    assert (await relay.get("/v1/models", headers=headers)).status == 200
    response = await relay.post("/v1/responses", json={"model": "gpt-5"}, headers=headers)
    assert response.status == 403
    assert_openai_error(await response.json(), "key_scope")
    assert [s.path for s in fake.seen] == ["/v1/models"]


async def test_hashed_keys_work(relay_factory: RelayFactory) -> None:
    digest = hashlib.sha256(b"rk-hashed-secret-123456").hexdigest()
    relay = await relay_factory(auth={"keys": parse_keys_env(f"ops:sha256:{digest}")})
    response = await relay.get("/v1/models", headers={"X-Relay-Key": "rk-hashed-secret-123456"})
    assert response.status == 200


async def test_without_keys_loopback_relay_is_open(relay_factory: RelayFactory) -> None:
    relay = await relay_factory(auth={"keys": ()})
    assert (await relay.get("/v1/models")).status == 200


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/health",
        "/v1/health",
        "/manifest",
        "/openapi.json",
        "/openapi.actions.json",
        "/.well-known/ai-plugin.json",
    ],
)
async def test_public_routes_need_no_key_and_reveal_no_secret(relay: TestClient, path: str) -> None:
    response = await relay.get(path)
    assert response.status == 200
    text = await response.text()
    for secret in (UPSTREAM_KEY, RELAY_KEY, OTHER_KEY):
        assert secret not in text


_HEALTH_PUBLIC = {"object", "status", "environment", "default_model", "timestamp"}
_HEALTH_DETAILS = {"relay", "upstream", "meta"}  # upstream URL, key count, PID


@pytest.mark.parametrize("path", ["/", "/health", "/v1/health"])
async def test_public_health_shows_deployment_details_only_to_a_key_holder(
    relay: TestClient, path: str
) -> None:
    for headers in ({}, {"Authorization": "Bearer rk-wrong-key-0123456789"}):
        response = await relay.get(path, headers=headers)
        assert response.status == 200  # public: a wrong key is no refusal either
        assert set(await response.json()) == _HEALTH_PUBLIC
    for headers in ({"Authorization": f"Bearer {RELAY_KEY}"}, {"X-Relay-Key": OTHER_KEY}):
        response = await relay.get(path, headers=headers)
        assert response.status == 200
        assert set(await response.json()) == _HEALTH_PUBLIC | _HEALTH_DETAILS


async def test_keyless_health_shows_details_since_every_route_is_open(
    relay_factory: RelayFactory,
) -> None:
    relay = await relay_factory(auth={"keys": ()})
    response = await relay.get("/health")
    assert set(await response.json()) == _HEALTH_PUBLIC | _HEALTH_DETAILS


@pytest.mark.parametrize("case", [str, str.lower, str.upper], ids=["as-is", "lower", "upper"])
async def test_upstream_sees_only_the_upstream_key_and_clean_headers(
    relay_factory: RelayFactory, fake: FakeOpenAI, case: Callable[[str], str]
) -> None:
    relay = await relay_factory(
        upstream={"organization": "org-team", "project": "proj-team"},
    )
    headers = {
        "Authorization": f"Bearer {RELAY_KEY}",
        "X-Relay-Key": RELAY_KEY,
        "Cookie": "session=abc",
        "X-Forwarded-For": "203.0.113.9",
        "OpenAI-Organization": "org-client-chosen",
        "Connection": "keep-alive, X-Hop",
        "X-Hop": "drop me",
        "X-Custom": "keep me",
    }
    if case is str.upper:
        headers["Authorization"] = f"BEARER {RELAY_KEY}"
    response = await relay.get(
        "/v1/models",
        headers={case(k) if k != "Authorization" else k: v for k, v in headers.items()},
    )
    assert response.status == 200
    seen = {k.lower(): v for k, v in fake.last("/v1/models").headers.items()}
    assert seen["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert seen["openai-organization"] == "org-team"
    assert seen["openai-project"] == "proj-team"
    assert seen["x-custom"] == "keep me"
    assert RELAY_KEY not in json.dumps(seen)
    for dropped in ("x-relay-key", "cookie", "x-forwarded-for", "x-hop"):
        assert dropped not in seen
    assert seen["host"].startswith("127.0.0.1:")


# Headers some upstream stack honours as a method or target override, or as the
# client's network identity: none of them is the client's to set upstream.
_OVERRIDE_AND_IDENTITY = {
    "X-HTTP-Method-Override": "DELETE",
    "X-HTTP-Method": "DELETE",
    "X-Method-Override": "DELETE",
    "X-Original-URL": "/v1/organization/admin_api_keys",
    "X-Rewrite-URL": "/v1/organization/admin_api_keys",
    "X-Forwarded-For": "203.0.113.9",
    "X-Real-IP": "203.0.113.9",
    "Forwarded": "for=203.0.113.9;proto=https",
    "X-Forwarded-Host": "evil.example",
    "X-Forwarded-Proto": "https",
    "True-Client-IP": "203.0.113.9",
    "CF-Connecting-IP": "203.0.113.9",
    "X-Client-IP": "203.0.113.9",
}


async def test_override_and_client_ip_headers_never_reach_upstream(
    relay: TestClient, auth: dict[str, str], fake: FakeOpenAI
) -> None:
    headers = {**auth, **_OVERRIDE_AND_IDENTITY, "X-Custom": "keep me"}
    response = await relay.get("/v1/models", headers=headers)
    assert response.status == 200
    async with asyncio.timeout(5):
        async with relay.ws_connect("/v1/realtime?model=gpt-realtime", headers=headers):
            pass
    for seen in (fake.last("/v1/models").headers, fake.realtime.last().headers):
        names = {name.lower() for name in seen}
        assert "x-custom" in names
        assert not names & {name.lower() for name in _OVERRIDE_AND_IDENTITY}


async def test_only_useful_upstream_headers_reach_the_client(
    relay: TestClient, auth: dict[str, str]
) -> None:
    response = await relay.get("/v1/models", headers=auth)
    assert response.headers["x-request-id"].startswith("req_")
    assert response.headers["openai-processing-ms"] == "12"
    assert response.headers["x-ratelimit-remaining-requests"] == "9999"
    assert "set-cookie" not in response.headers
    assert "openai-organization" not in response.headers
    assert response.headers["X-Relay-Request-Id"]


async def test_upstream_401_echoing_the_key_is_redacted(
    relay_factory: RelayFactory, auth: dict[str, str]
) -> None:
    wrong = "sk-canary-wrong-upstream-key-abcdef123456"
    relay = await relay_factory(upstream={"api_key": wrong})
    response = await relay.get("/v1/models", headers=auth)
    assert response.status == 401
    text = await response.text()
    assert "Incorrect API key provided" in text
    assert wrong not in text and wrong[:8] not in text and wrong[-4:] not in text
    assert int(response.headers["Content-Length"]) == len(text.encode())


@pytest.mark.parametrize("status", [429, 500, 503])
async def test_upstream_errors_pass_through_with_retry_hints(
    relay: TestClient, auth: dict[str, str], status: int
) -> None:
    response = await relay.post(
        "/v1/responses", json={"model": f"error-{status}", "input": "x"}, headers=auth
    )
    assert response.status == status
    assert response.headers["retry-after"] == "7"
    assert response.headers["x-should-retry"] == "false"
    body = await response.json()
    assert body["error"]["message"] == f"Simulated upstream error {status}"


def test_redaction_catches_masked_and_whole_keys() -> None:
    body = b'{"message": "Incorrect API key provided: sk-proj-****abcd. and sk-live-123"}'
    redacted = redact_secrets(body, ("sk-live-123",))
    assert b"sk-" not in redacted and b"abcd" not in redacted


# ----------------------------------------------------------------------- refusals


async def test_unknown_route_is_404_in_openai_shape(
    relay: TestClient, auth: dict[str, str]
) -> None:
    for path in ("/nothing/here", "/v1/nothing"):
        response = await relay.get(path, headers=auth)
        assert response.status == 404, path
        assert_openai_error(await response.json(), "unknown_url")


async def test_denied_families_are_403(
    relay: TestClient, auth: dict[str, str], fake: FakeOpenAI
) -> None:
    for path in (
        "/v1/organization/users",
        "/v1/organization/admin_api_keys",
        "/v1/admin/x",
        "/v1/Organization/users",
    ):
        response = await relay.get(path, headers=auth)
        assert response.status == 403, path
        assert_openai_error(await response.json(), "path_denied")
    assert fake.seen == []


async def test_policy_can_allow_further_families(
    relay_factory: RelayFactory, auth: dict[str, str], fake: FakeOpenAI
) -> None:
    relay = await relay_factory(policy={"allow": ("/v1/evals*",)})
    response = await relay.get("/v1/evals?limit=2", headers=auth)
    assert response.status == 200
    assert fake.last("/v1/evals").query == {"limit": "2"}
    assert (await relay.get("/v1/fine_tuning/jobs", headers=auth)).status == 404


async def test_known_path_with_wrong_method_is_405(relay: TestClient, auth: dict[str, str]) -> None:
    response = await relay.delete("/v1/embeddings", headers=auth)
    assert response.status == 405
    assert response.headers["Allow"] == "POST"
    assert_openai_error(await response.json(), "method_not_allowed")


@pytest.mark.parametrize(
    "target",
    [
        "/v1/files/..%2Forganization%2Fusers/content",
        "/v1/files/%2e%2e/content",
        "/v1/models/x%5C..%5Cy",
        "/v1//organization/users",
        "/v1/files/./x",
        "/v1/files/../organization/users",
        "/v1/evals/%00",
    ],
)
async def test_path_tricks_are_refused_before_upstream(
    relay_factory: RelayFactory, fake: FakeOpenAI, target: str
) -> None:
    relay = await relay_factory(
        policy={"allow": ("/v1/*",), "deny": ("/v1/organization*",)},
    )
    response = await rawhttp.request(relay, "GET", target, {"Authorization": f"Bearer {RELAY_KEY}"})
    assert response.status in (400, 403, 404), target
    assert_openai_error(json.loads(response.body))
    assert fake.seen == []


@pytest.mark.parametrize(
    "target",
    [
        "/v1/%6frganization/admin_api_keys",  # 'o' encoded: upstream decodes it
        "/v1/%61dmin/keys",
        "/v1/%4Frganization/users",  # upper-case hex, and the policy ignores case
        "/v1/evals/%7e",  # '~' is unreserved too
        "/v1/evals/x#/../../organization/users",  # a fragment no server receives
        "/v1/organization/users/..#",  # '..' hidden from the dot-segment rule by '#'
        "/v1/evals#",
        "/v1/evals?after=x#y",
        "/v1/evals/%2561dmin",  # an encoded '%': a second decoding would differ
        "/v1/evals/..;/organization/users",  # a dot segment once ";" params are dropped
    ],
)
async def test_the_policy_judges_the_path_upstream_will_see(
    relay_factory: RelayFactory, fake: FakeOpenAI, target: str
) -> None:
    # Issue 11: with an allow pattern that also covers a denied family, encoded
    # letters and fragments reached upstream, which decodes them.
    relay = await relay_factory(policy={"allow": ("/v1/*",)})
    response = await rawhttp.request(relay, "GET", target, {"Authorization": f"Bearer {RELAY_KEY}"})
    assert response.status == 400, target
    assert_openai_error(json.loads(response.body), "invalid_path")
    assert fake.seen == []


@pytest.mark.parametrize(
    "target",
    ["/v1/models/%67pt-5", "/v1/models/gpt-5#x", "/v1/files/../models", "/v1/responses/%2e"],
)
async def test_path_tricks_are_400_on_every_route_before_the_key_is_asked(
    relay: TestClient, fake: FakeOpenAI, target: str
) -> None:
    response = await rawhttp.request(relay, "GET", target)  # no key at all
    assert response.status == 400, target
    assert_openai_error(json.loads(response.body), "invalid_path")
    assert fake.seen == []


async def test_honest_encodings_still_pass(relay_factory: RelayFactory, fake: FakeOpenAI) -> None:
    # Reserved characters and UTF-8 stay encodable: they mean the same to upstream.
    relay = await relay_factory(policy={"allow": ("/v1/evals*",)})
    auth = {"Authorization": f"Bearer {RELAY_KEY}"}
    response = await rawhttp.request(relay, "GET", "/v1/evals/ev%3A1%20caf%C3%A9?q=%61", auth)
    assert response.status == 200
    assert fake.seen[-1].path == "/v1/evals/ev:1 café"
    response = await rawhttp.request(relay, "GET", "/v1/models/ft%3Agpt-4o%3Aorg", auth)
    assert response.status == 200
    assert fake.seen[-1].path == "/v1/models/ft:gpt-4o:org"


@pytest.mark.parametrize(
    "path, content_type",
    [
        ("/v1/responses", "text/plain"),
        ("/v1/files", "application/json"),
        ("/v1/embeddings", "application/x-www-form-urlencoded"),
    ],
)
async def test_wrong_media_type_is_415(
    relay: TestClient, auth: dict[str, str], fake: FakeOpenAI, path: str, content_type: str
) -> None:
    response = await relay.post(path, data=b"{}", headers={**auth, "Content-Type": content_type})
    assert response.status == 415
    assert_openai_error(await response.json(), "unsupported_media_type")
    assert fake.seen == []


async def test_declared_oversize_body_is_413_before_reading(
    relay_factory: RelayFactory, fake: FakeOpenAI
) -> None:
    relay = await relay_factory(limits={"max_body_bytes": 1024})
    reader, writer = await rawhttp.open_raw(relay)
    try:
        async with asyncio.timeout(2):
            writer.write(
                rawhttp.head(
                    "POST",
                    "/v1/responses",
                    {
                        "Authorization": f"Bearer {RELAY_KEY}",
                        "Content-Type": "application/json",
                        "Content-Length": "5000",
                    },
                )
            )
            await writer.drain()
            status, _ = await rawhttp.read_head(reader)
    finally:
        writer.close()
    assert status == 413
    assert fake.seen == []


async def test_huge_headers_are_431(relay_factory: RelayFactory, auth: dict[str, str]) -> None:
    relay = await relay_factory(limits={"max_header_bytes": 4096})
    headers = {**auth, **{f"X-Pad-{i}": "p" * 1000 for i in range(8)}}
    response = await relay.get("/v1/models", headers=headers)
    assert response.status == 431
    assert_openai_error(await response.json(), "request_header_too_large")


@pytest.mark.parametrize(
    "body, code",
    [(b"{not json", "invalid_json"), (b"\xff\xfe", "invalid_json"), (b"[1, 2]", "invalid_json")],
    ids=["malformed", "invalid-utf8", "not-an-object"],
)
async def test_bad_json_on_a_parsing_route_is_400(
    relay: TestClient, auth: dict[str, str], fake: FakeOpenAI, body: bytes, code: str
) -> None:
    response = await relay.post(
        "/v1/responses:stream", data=body, headers={**auth, "Content-Type": "application/json"}
    )
    assert response.status == 400
    assert_openai_error(await response.json(), code)
    assert fake.seen == []


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/actions/responses", "[" * 100_000),
        ("/v1/responses:stream", "[" * 100_000),
        ("/v1/proxy", "[" * 100_000),
        (
            "/v1/proxy",
            '{"method": "POST", "path": "/v1/embeddings", "body": {"input": ' + _nested(900) + "}}",
        ),
        ("/v1/responses:stream", '{"model": "gpt-5", "input": ' + _nested(900) + "}"),
        (
            "/v1/actions/responses",
            '{"input": "hi", "metadata": ' + '{"a":' * 300 + "1" + "}" * 300 + "}",
        ),
    ],
    ids=[
        "wrapper-unclosed",
        "stream-unclosed",
        "proxy-unclosed",
        "proxy-deep",
        "stream-deep",
        "wrapper-deep-object",
    ],
)
async def test_deeply_nested_json_is_400_not_500(
    relay: TestClient, auth: dict[str, str], fake: FakeOpenAI, path: str, body: str
) -> None:
    # Issue 11: Python's parser (and every encoder after it) recurses; deep nesting
    # raised RecursionError, a 500.
    response = await relay.post(
        path, data=body.encode(), headers={**auth, "Content-Type": "application/json"}
    )
    assert response.status == 400, await response.text()
    assert_openai_error(await response.json(), "invalid_json")
    assert "nest" in (await response.json())["error"]["message"]
    assert fake.seen == []


async def test_responses_stream_route_forces_stream(
    relay: TestClient, auth: dict[str, str], fake: FakeOpenAI
) -> None:
    response = await relay.post(
        "/v1/responses:stream",
        json={"model": "gpt-5", "input": "hi", "extra": {"a": 1}},
        headers=auth,
    )
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    sent = json.loads(fake.last("/v1/responses").body)
    assert sent == {"model": "gpt-5", "input": "hi", "extra": {"a": 1}, "stream": True}
    await response.read()


async def test_client_request_id_is_kept_when_sane(relay: TestClient) -> None:
    response = await relay.get("/health", headers={"X-Request-Id": "abc-123"})
    assert response.headers["X-Relay-Request-Id"] == "abc-123"
    response = await relay.get("/health", headers={"X-Request-Id": "bad id with spaces"})
    assert response.headers["X-Relay-Request-Id"] != "bad id with spaces"
    fresh = [(await relay.get("/health")).headers["X-Relay-Request-Id"] for _ in range(20)]
    fresh.append(response.headers["X-Relay-Request-Id"])
    assert all(re.fullmatch(r"[0-9a-f]{32}", made) for made in fresh), fresh
    assert len(set(fresh)) == len(fresh)  # each request its own


async def test_user_data_files_cannot_be_downloaded(
    relay: TestClient, auth: dict[str, str], fake: FakeOpenAI
) -> None:
    private = fake.add_file(b"secret", purpose="user_data")
    public = fake.add_file(b"shared", purpose="assistants")
    response = await relay.get(f"/v1/files/{private}/content", headers=auth)
    assert response.status == 403
    assert_openai_error(await response.json(), "user_data_download_forbidden")
    assert not any(s.path.endswith("/content") for s in fake.seen)
    response = await relay.get(f"/v1/files/{public}/content", headers=auth)
    assert response.status == 200 and await response.read() == b"shared"


def _metadata_answer(status: int, body: object) -> Scripted:
    async def answer(request: web.Request) -> web.StreamResponse:
        if status >= 400:
            return error_answer(status)
        return web.json_response(body, status=status)

    return answer


# Every route that hands out a stored file's content asks the same question first.
FILE_CONTENT_ROUTES = [
    pytest.param("/v1/files/{}/content", id="passthrough"),
    pytest.param("/v1/actions/files/{}/content", id="actions"),
]


@pytest.mark.parametrize("route", FILE_CONTENT_ROUTES)
@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (429, None, 429),  # upstream's own 429 (with its retry hints) comes back
        (500, None, 502),
        (503, None, 502),
        (401, None, 401),
        (200, {"id": "f", "object": "file"}, 502),  # a 200 that names no purpose
        (200, {"id": "f", "purpose": None}, 502),
        (200, ["not", "an", "object"], 502),
        (202, {"id": "f", "purpose": "assistants"}, 502),  # only a 200 is a verdict
    ],
    ids=["429", "500", "503", "401", "no-purpose", "null-purpose", "not-object", "202"],
)
async def test_user_data_guard_fails_closed_when_metadata_is_not_a_clear_200(
    relay: TestClient,
    auth: dict[str, str],
    fake: FakeOpenAI,
    route: str,
    status: int,
    body: object,
    expected: int,
) -> None:
    private = fake.add_file(b"someone's diary", purpose="user_data")
    fake.script("GET", f"/v1/files/{private}", _metadata_answer(status, body))
    response = await relay.get(route.format(private), headers=auth)
    assert response.status == expected
    assert_openai_error(await response.json())
    if expected == 429:
        assert response.headers["Retry-After"] == "7"
    assert not any(s.path.endswith("/content") for s in fake.seen)


@pytest.mark.parametrize("route", FILE_CONTENT_ROUTES)
async def test_user_data_guard_fails_closed_when_upstream_is_unreachable(
    relay_factory: RelayFactory, auth: dict[str, str], route: str
) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    relay = await relay_factory(upstream={"url": f"http://127.0.0.1:{port}"})
    response = await relay.get(route.format("file-x"), headers=auth)
    assert response.status == 502
    assert_openai_error(await response.json())


async def test_missing_file_download_passes_upstream_404(
    relay: TestClient, auth: dict[str, str]
) -> None:
    response = await relay.get("/v1/files/file-nope/content", headers=auth)
    assert response.status == 404
    assert_openai_error(await response.json())
