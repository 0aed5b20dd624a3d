"""``/v1/proxy``: an allowlist and blocks, deny by default, no path tricks
(docs/security.md#the-proxy-envelope)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from relayd.actions.proxy_policy import normalise_path
from relayd.config import RelayKey
from tests.conftest import RELAY_KEY
from tests.fakes.openai import FakeOpenAI

AUTH = {"Authorization": f"Bearer {RELAY_KEY}"}


async def call(relay: TestClient, envelope: dict[str, Any]) -> tuple[int, Any]:
    response = await relay.post("/v1/proxy", json=envelope, headers=AUTH)
    return response.status, await response.json()


ALLOWED = [
    ("POST", "/v1/responses", {"model": "gpt-5", "input": "hi"}),
    ("GET", "/v1/responses/resp_1", None),
    ("DELETE", "/v1/responses/resp_1", None),
    ("POST", "/v1/responses/resp_1/cancel", None),
    ("GET", "/v1/responses/resp_1/input_items", None),
    ("POST", "/v1/responses/input_tokens", {"model": "gpt-5", "input": "hi"}),
    ("POST", "/v1/responses/compact", {"model": "gpt-5", "input": "hi"}),
    ("POST", "/v1/embeddings", {"model": "e", "input": "hi"}),
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/gpt-5", None),
    ("POST", "/v1/images/generations", {"prompt": "p"}),
    ("GET", "/v1/videos", None),
    ("GET", "/v1/videos/video_1", None),
    ("DELETE", "/v1/videos/video_1", None),
    ("GET", "/v1/vector_stores", None),
    ("POST", "/v1/vector_stores", {"name": "kb"}),
    ("GET", "/v1/vector_stores/vs_1", None),
    ("POST", "/v1/vector_stores/vs_1", {"name": "kb2"}),
    ("DELETE", "/v1/vector_stores/vs_1", None),
    ("POST", "/v1/vector_stores/vs_1/search", {"query": "q"}),
    ("GET", "/v1/vector_stores/vs_1/files", None),
    ("POST", "/v1/vector_stores/vs_1/files", {"file_id": "file-1"}),
    ("GET", "/v1/vector_stores/vs_1/files/file-1", None),
    ("DELETE", "/v1/vector_stores/vs_1/files/file-1", None),
    ("POST", "/v1/vector_stores/vs_1/file_batches", {"file_ids": ["file-1"]}),
    ("GET", "/v1/vector_stores/vs_1/file_batches/vsfb_1", None),
    ("POST", "/v1/vector_stores/vs_1/file_batches/vsfb_1/cancel", None),
    ("GET", "/v1/vector_stores/vs_1/file_batches/vsfb_1/files", None),
    ("GET", "/v1/containers", None),
    ("POST", "/v1/containers", {"name": "c"}),
    ("GET", "/v1/containers/cntr_1", None),
    ("DELETE", "/v1/containers/cntr_1", None),
    ("POST", "/v1/conversations", {}),
    ("GET", "/v1/conversations/conv_1", None),
    ("POST", "/v1/conversations/conv_1", {"metadata": {"a": "b"}}),
    ("DELETE", "/v1/conversations/conv_1", None),
    ("GET", "/v1/files", None),
    ("GET", "/v1/files/file-abc", None),
    ("DELETE", "/v1/files/file-abc", None),
    ("GET", "/v1/batches", None),
    ("POST", "/v1/batches", {"input_file_id": "file-1", "endpoint": "/v1/responses"}),
    ("GET", "/v1/batches/batch_1", None),
    ("POST", "/v1/batches/batch_1/cancel", None),
]


@pytest.mark.parametrize("method, path, body", ALLOWED, ids=[f"{m} {p}" for m, p, _ in ALLOWED])
async def test_allowlisted_calls_go_upstream_as_sent(
    relay: TestClient, fake: FakeOpenAI, method: str, path: str, body: Any
) -> None:
    envelope: dict[str, Any] = {"method": method, "path": path}
    if body is not None:
        envelope["body"] = body
    status, _ = await call(relay, envelope)
    assert [(s.method, s.path) for s in fake.seen] == [(method, path)]
    assert status == 200 or status == 404  # the fake has no such file: upstream said so
    if method in ("POST",):
        assert json.loads(fake.seen[0].body) == (body if body is not None else {})
    else:
        assert fake.seen[0].body == b""


DENIED = [
    ("POST", "/v1/responses", {"model": "gpt-5", "stream": True}, "stream=true"),
    ("POST", "/v1/responses:stream", {}, "':' paths"),
    ("GET", "/v1/files/file-abc/content", None, "/content"),
    ("GET", "/v1/batches/batch_1/results", None, "/results"),
    ("GET", "/v1/containers/cntr_1/files/f/content", None, "/content"),
    ("POST", "/v1/files", {}, "multipart"),
    ("POST", "/v1/images/edits", {}, "multipart"),
    ("POST", "/v1/images/variations", {}, "multipart"),
    ("POST", "/v1/videos", {"prompt": "p"}, "multipart"),
    ("POST", "/v1/uploads", {}, "/v1/uploads family"),
    ("POST", "/v1/audio/speech", {}, "/v1/audio family"),
    ("POST", "/v1/realtime/client_secrets", {}, "/v1/realtime family"),
    ("POST", "/v1/moderations", {"input": "x"}, "/v1/moderations family"),
    ("GET", "/v1/organization/users", None, "/v1/organization family"),
    ("GET", "/v1/admin_api_keys", None, "/v1/admin family"),
    ("POST", "/v1/webhooks", {}, "/v1/webhooks family"),
    ("POST", "/v1/proxy", {}, "/v1/proxy is blocked"),
    ("POST", "/v1/chat/completions", {"model": "m"}, "not on the allowlist"),
    ("GET", "/v1/conversations/conv_1/items", None, "not on the allowlist"),
    ("GET", "/v1/containers/cntr_1/files", None, "not on the allowlist"),
    ("DELETE", "/v1/models/ft-x", None, "not on the allowlist"),
    ("PUT", "/v1/vector_stores", {}, "not on the allowlist"),
    ("POST", "/v1/files/file-abc", {}, "not on the allowlist"),
    ("GET", "/v1/assistants", None, "not on the allowlist"),
    ("GET", "https://api.openai.com/v1/models", None, "not a URL"),
    ("GET", "//evil.example/v1/models", None, "not a URL"),
    ("GET", "javascript:alert(1)", None, "not a URL"),
]


@pytest.mark.parametrize(
    "method, path, body, reason", DENIED, ids=[f"{m} {p}" for m, p, _, _ in DENIED]
)
async def test_denied_calls_are_403_with_a_reason_and_nothing_goes_upstream(
    relay: TestClient, fake: FakeOpenAI, method: str, path: str, body: Any, reason: str
) -> None:
    envelope: dict[str, Any] = {"method": method, "path": path}
    if body is not None:
        envelope["body"] = body
    status, answer = await call(relay, envelope)
    assert status == 403, answer
    assert answer["error"]["type"] == "permission_error"
    assert answer["error"]["code"] == "proxy_blocked"
    assert reason in answer["error"]["message"]
    assert fake.seen == []


TRICKS = [
    ("/v1/files/file-abc/%63ontent", "/content"),
    ("/v1/files/%2e%2e/admin", "'..' segments"),
    ("/v1/files/..%2Fadmin", "'..' segments"),
    ("/v1/%252e%252e/organization", "'..' segments"),
    ("/v1/%25252e%25252e/x", "more than twice"),
    ("/v1/./models", "'..' segments"),
    ("/v1//uploads", "/v1/uploads family"),
    ("/v1\\uploads", "/v1/uploads family"),
    ("/v1/%5Cuploads", "/v1/uploads family"),
    ("/V1/Uploads", "/v1/uploads family"),
    ("/v1/Files/file-abc/CONTENT", "/content"),
    ("/v1/%2561dmin/keys", "/v1/admin family"),
    ("/v1/responses%3Astream", "':' paths"),
    ("/v1/files%3Fpurpose=user_data", "'?' or '#'"),
    ("/v1/files%23x", "'?' or '#'"),
    ("/v1/files%09", "whitespace"),
    ("/v1/models%00", "control"),
    ("/v1/RESPONSES", "not on the allowlist"),
    ("/%76%31/uploads", "/v1/uploads family"),
]


@pytest.mark.parametrize("path, reason", TRICKS, ids=[p for p, _ in TRICKS])
async def test_path_tricks_never_reach_a_denied_path(
    relay: TestClient, fake: FakeOpenAI, path: str, reason: str
) -> None:
    status, answer = await call(relay, {"method": "GET", "path": path})
    assert status == 403, answer
    assert reason in answer["error"]["message"]
    assert fake.seen == []


@pytest.mark.parametrize(
    "raw, canonical",
    [
        ("models", "/v1/models"),
        ("/models", "/v1/models"),
        ("v1/models/", "/v1/models"),
        ("/v1/models%2Fgpt-5", "/v1/models/gpt-5"),
        ("/V1//models", "/v1/models"),
        ("  /v1/files  ", "/v1/files"),
    ],
)
def test_normalisation_finds_the_canonical_path(raw: str, canonical: str) -> None:
    assert normalise_path(raw) == canonical


async def test_query_and_aliases_are_encoded_for_upstream(
    relay: TestClient, fake: FakeOpenAI
) -> None:
    status, _ = await call(
        relay,
        {
            "method": "get",
            "path": "/v1/files",
            "params": {"limit": 2, "purpose": "batch", "include": ["a", "b"], "x": True},
        },
    )
    assert status == 200
    seen = fake.seen[0]
    assert seen.path == "/v1/files"
    # (the fake keeps the first of repeated names: include=a&include=b)
    assert seen.query == {"limit": "2", "purpose": "batch", "include": "a", "x": "true"}
    status, _ = await call(
        relay, {"method": "POST", "path": "/v1/embeddings", "json": {"model": "e", "input": "x"}}
    )
    assert status == 200
    assert json.loads(fake.seen[-1].body) == {"model": "e", "input": "x"}


@pytest.mark.parametrize(
    "envelope, param",
    [
        ({"path": "/v1/models"}, "method"),
        ({"method": "GET"}, "path"),
        ({"method": "TRACE", "path": "/v1/models"}, "method"),
        ({"method": "GET", "path": "/v1/models", "extra": 1}, "extra"),
        ({"method": "GET", "path": "/v1/models", "query": {}, "params": {}}, "params"),
        ({"method": "GET", "path": "/v1/models", "body": {"a": 1}}, "body"),
        ({"method": "GET", "path": "/v1/models", "query": {"a": {"b": 1}}}, "query"),
        ({"method": "GET", "path": "/v1/files?purpose=x"}, "path"),
    ],
    ids=[
        "no-method",
        "no-path",
        "bad-method",
        "unknown-field",
        "both-query-names",
        "body-on-get",
        "nested-query",
        "query-in-path",
    ],
)
async def test_malformed_envelopes_are_400_naming_the_field(
    relay: TestClient, fake: FakeOpenAI, envelope: dict[str, Any], param: str
) -> None:
    status, answer = await call(relay, envelope)
    assert status == 400, answer
    assert answer["error"]["param"] == param
    assert fake.seen == []


async def test_a_huge_json_answer_is_cut_under_chatgpts_limit(
    relay: TestClient, fake: FakeOpenAI
) -> None:
    response = await relay.post(
        "/v1/proxy",
        json={
            "method": "POST",
            "path": "/v1/embeddings",
            "body": {"model": "e", "input": ["x"] * 5000},
        },
        headers=AUTH,
    )
    text = await response.text()
    assert response.status == 200
    assert len(text) < 100_000
    answer = json.loads(text)
    assert 0 < len(answer["data"]) < 5000
    assert "cut it" in answer["relay_note"]


async def test_upstream_errors_come_back_redacted(relay: TestClient) -> None:
    status, answer = await call(
        relay, {"method": "POST", "path": "/v1/responses", "body": {"model": "error-500"}}
    )
    assert status == 500
    assert answer["error"]["message"] == "Simulated upstream error 500"


# ----------------------------------------------------------------------- issue 11

SCOPED_SECRET = "rk-proxy-only-key-0000000000"


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("GET", "/v1/files", None),
        ("DELETE", "/v1/files/file-abc", None),
        ("POST", "/v1/responses", {"model": "gpt-5", "input": "hi"}),
        ("GET", "/v1/models", None),
    ],
)
async def test_a_proxy_call_needs_the_scope_of_the_route_it_reaches(
    relay_factory: Any, fake: FakeOpenAI, method: str, path: str, body: Any
) -> None:
    proxy_only = RelayKey(
        "gpt-proxy", hashlib.sha256(SCOPED_SECRET.encode()).digest(), frozenset({"proxy"})
    )
    relay = await relay_factory(auth={"keys": (proxy_only,)})
    envelope: dict[str, Any] = {"method": method, "path": path}
    if body is not None:
        envelope["body"] = body
    response = await relay.post(
        "/v1/proxy", json=envelope, headers={"Authorization": f"Bearer {SCOPED_SECRET}"}
    )
    answer = await response.json()
    assert response.status == 403, answer
    assert answer["error"]["code"] == "key_scope"
    assert "gpt-proxy" in answer["error"]["message"]
    assert fake.seen == []


async def test_a_proxy_call_passes_with_both_scopes(relay_factory: Any, fake: FakeOpenAI) -> None:
    both = RelayKey(
        "gpt-files",
        hashlib.sha256(SCOPED_SECRET.encode()).digest(),
        frozenset({"proxy", "files"}),
    )
    relay = await relay_factory(auth={"keys": (both,)})
    headers = {"Authorization": f"Bearer {SCOPED_SECRET}"}
    response = await relay.post(
        "/v1/proxy", json={"method": "GET", "path": "/v1/files"}, headers=headers
    )
    assert response.status == 200
    response = await relay.post(
        "/v1/proxy", json={"method": "GET", "path": "/v1/models"}, headers=headers
    )
    assert response.status == 403
    assert [s.path for s in fake.seen] == ["/v1/files"]


@pytest.mark.parametrize(
    "envelope",
    [
        {"body": {"model": "gpt-5", "stream": "true"}},
        {"body": {"model": "gpt-5", "stream": "True"}},
        {"body": {"model": "gpt-5", "stream": 1}},
        {"body": {"model": "gpt-5", "stream": "1"}},
        {"body": {"model": "gpt-5", "stream": ["true"]}},
        {"body": {"model": "gpt-5", "stream": {"x": 1}}},
        {"body": {"model": "gpt-5", "stream": "false"}},  # truthy to a lax reader
        {"body": {"model": "gpt-5"}, "query": {"stream": "true"}},
        {"body": {"model": "gpt-5"}, "query": {"stream": True}},
        {"body": {"model": "gpt-5"}, "query": {"stream": "TRUE"}},
        {"body": {"model": "gpt-5"}, "query": {"stream": ["false", "true"]}},
        {"body": {"model": "gpt-5"}, "query": {"Stream": "yes"}},
        {"body": {"model": "gpt-5"}, "params": {"stream": 1}},
    ],
    ids=[
        "str-true",
        "str-True",
        "one",
        "str-one",
        "list",
        "object",
        "str-false",
        "query",
        "query-bool",
        "query-upper",
        "query-list",
        "query-name-case",
        "params",
    ],
)
async def test_every_spelling_of_stream_true_is_refused(
    relay: TestClient, fake: FakeOpenAI, envelope: dict[str, Any]
) -> None:
    status, answer = await call(relay, {"method": "POST", "path": "/v1/responses", **envelope})
    assert status == 403, answer
    assert answer["error"]["code"] == "proxy_blocked"
    assert "stream" in answer["error"]["message"]
    assert fake.seen == []


@pytest.mark.parametrize(
    "envelope",
    [
        {"body": {"model": "gpt-5", "stream": False}},
        {"body": {"model": "gpt-5", "stream": None}},
        {"body": {"model": "gpt-5"}, "query": {"stream": False}},
        {"body": {"model": "gpt-5"}, "query": {"stream": "False"}},
    ],
)
async def test_stream_false_still_passes(
    relay: TestClient, fake: FakeOpenAI, envelope: dict[str, Any]
) -> None:
    status, answer = await call(relay, {"method": "POST", "path": "/v1/responses", **envelope})
    assert status == 200, answer
