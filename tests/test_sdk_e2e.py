"""End to end: the official async SDK, pointed at relayd, against the fake OpenAI.

Each test drives one API family the way a team script would (``base_url`` is
relayd, ``api_key`` a relay key) and then checks both ends: what the SDK got
back, and what the fake upstream saw (path, method, body, multipart parts, and
that only the upstream key ever left relayd).

Every test that drives the SDK runs twice: over plain http, and over https with
relayd's own TLS context (relayd/tls.py) and a certificate from a throwaway CA
(issue 13); both runs together take about 10 s.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest
import trustme
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from openai.types.chat import ChatCompletionMessageParam
from openai.types.responses import (
    ResponseCompletedEvent,
    ResponseStreamEvent,
    ResponseTextDeltaEvent,
)
from pytest_aiohttp import AiohttpServer

from relayd.app import create_app
from relayd.state import METRICS
from relayd.tls import ServedCertificate
from tests.conftest import RELAY_KEY, RelayFactory, assert_no_secret_logged, make_settings
from tests.fakes.openai import UPSTREAM_KEY, FakeOpenAI, Seen, pattern_block
from tests.test_tls_config import write_pair

# Small but real PNG signatures: the relay must not care what the bytes are.
PNG = b"\x89PNG\r\n\x1a\n" + os.urandom(2048)
MASK = b"\x89PNG\r\n\x1a\n" + os.urandom(1024)


@pytest.fixture(params=["http", "https"])
def scheme(request: pytest.FixtureRequest) -> str:
    """Every SDK test runs over plain http and over relayd's own TLS."""
    return str(request.param)


@pytest.fixture
async def sdk(
    scheme: str,
    relay_factory: RelayFactory,
    aiohttp_server: AiohttpServer,
    fake_server: TestServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> AsyncIterator[openai.AsyncOpenAI]:
    """The SDK pointed at relayd, over http or over relayd's own TLS."""
    caplog.set_level(logging.DEBUG)
    if scheme == "http":
        base_url, http_client = str((await relay_factory()).make_url("/v1")), None
    else:
        ca = trustme.CA()
        cert, key = write_pair(ca, tmp_path)
        settings = make_settings(
            upstream={"url": str(fake_server.make_url(""))},
            server={"tls_cert": str(cert), "tls_key": str(key)},
        )
        app = create_app(settings)
        served = ServedCertificate(settings.server, app[METRICS])
        server = await aiohttp_server(app, ssl=served.context)
        assert server.scheme == "https"
        trust = ssl.create_default_context()
        ca.configure_trust(trust)
        base_url = str(server.make_url("/v1"))
        http_client = openai.DefaultAsyncHttpxClient(verify=trust)
    client = openai.AsyncOpenAI(
        base_url=base_url, api_key=RELAY_KEY, max_retries=0, timeout=30, http_client=http_client
    )
    async with client:
        yield client
    assert_no_secret_logged(caplog)


def only(fake: FakeOpenAI, method: str, path: str) -> Seen:
    """The one request upstream saw for ``method path`` (exact path)."""
    matches = [s for s in fake.seen if s.method == method and s.path == path]
    assert len(matches) == 1, f"upstream saw {len(matches)} × {method} {path}"
    return matches[0]


def assert_relay_credentials_stayed_behind(seen: Seen) -> None:
    headers = {k.lower(): v for k, v in seen.headers.items()}
    assert headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert "x-relay-key" not in headers
    assert "cookie" not in headers
    assert RELAY_KEY not in json.dumps(seen.headers)


# --------------------------------------------------------------------- responses


async def test_responses_create_passes_the_sdk_body_through_with_the_upstream_key(
    sdk: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    raw = await sdk.responses.with_raw_response.create(
        model="gpt-5",
        input="Say hello",
        instructions="Be brief.",
        metadata={"team": "relayd"},
        # Lowercase on purpose: header hygiene must not depend on spelling.
        extra_headers={"x-relay-key": RELAY_KEY, "cookie": "session=canary-cookie"},
    )
    response = raw.parse()

    assert response.output_text == "Hello there!"
    seen = only(fake, "POST", "/v1/responses")
    assert seen.body == raw.http_request.content
    assert json.loads(seen.body) == {
        "model": "gpt-5",
        "input": "Say hello",
        "instructions": "Be brief.",
        "metadata": {"team": "relayd"},
    }
    assert_relay_credentials_stayed_behind(seen)


async def test_responses_stream_delivers_every_event_in_order(
    sdk: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    events: list[ResponseStreamEvent] = []
    async with asyncio.timeout(10):
        stream = await sdk.responses.create(model="gpt-5", input="hi", stream=True)
        async with stream:
            assert stream.response.headers["content-type"].startswith("text/event-stream")
            assert stream.response.headers["cache-control"] == "no-cache"
            assert stream.response.headers["x-accel-buffering"] == "no"
            async for event in stream:
                events.append(event)

    kinds = [e.type for e in events]
    deltas = fake.events
    assert kinds == [
        "response.created",
        *["response.output_text.delta"] * deltas,
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(deltas + 2))
    text = "".join(e.delta for e in events if isinstance(e, ResponseTextDeltaEvent))
    assert text == "".join(f"tok{n} " for n in range(deltas))
    completed = events[-1]
    assert isinstance(completed, ResponseCompletedEvent)
    assert completed.response.output_text == "Hello there!"
    seen = only(fake, "POST", "/v1/responses")
    assert json.loads(seen.body)["stream"] is True
    assert_relay_credentials_stayed_behind(seen)


async def test_responses_retrieve_delete_cancel_and_input_items_reach_upstream(
    sdk: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    retrieved = await sdk.responses.retrieve("resp_abc123")
    assert retrieved.id == "resp_abc123"
    assert retrieved.output_text == "Hello there!"

    await sdk.responses.delete("resp_abc123")

    cancelled = await sdk.responses.cancel("resp_abc123")
    assert cancelled.object == "response"

    items = await sdk.responses.input_items.list("resp_abc123", limit=5, order="asc")
    assert items.data == []
    assert items.has_more is False

    only(fake, "GET", "/v1/responses/resp_abc123")
    only(fake, "DELETE", "/v1/responses/resp_abc123")
    only(fake, "POST", "/v1/responses/resp_abc123/cancel")
    listing = only(fake, "GET", "/v1/responses/resp_abc123/input_items")
    assert listing.query == {"limit": "5", "order": "asc"}
    for seen in fake.seen:
        assert_relay_credentials_stayed_behind(seen)


async def test_responses_stream_route_forces_stream_true_and_answers_with_sse(
    relay: TestClient[web.Request, web.Application], auth: dict[str, str], fake: FakeOpenAI
) -> None:
    async with asyncio.timeout(10):
        answer = await relay.post(
            "/v1/responses:stream", json={"model": "gpt-5", "input": "hi"}, headers=auth
        )
        body = await answer.read()

    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith("text/event-stream")
    assert answer.headers["Cache-Control"] == "no-cache"
    seen = only(fake, "POST", "/v1/responses")
    assert json.loads(seen.body) == {"model": "gpt-5", "input": "hi", "stream": True}
    assert_relay_credentials_stayed_behind(seen)
    names = [line for line in body.decode().splitlines() if line.startswith("event: ")]
    assert names[0] == "event: response.created"
    assert names[-1] == "event: response.completed"
    assert len(names) == fake.events + 2


# --------------------------------------------------------------------- embeddings, models


async def test_embeddings_create_returns_vectors(sdk: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    result = await sdk.embeddings.create(
        model="text-embedding-3-small", input=["one", "two"], encoding_format="float"
    )

    assert [d.embedding for d in result.data] == [[0.1, 0.2, 0.3], [0.1, 0.2, 0.3]]
    seen = only(fake, "POST", "/v1/embeddings")
    assert json.loads(seen.body) == {
        "model": "text-embedding-3-small",
        "input": ["one", "two"],
        "encoding_format": "float",
    }
    assert_relay_credentials_stayed_behind(seen)


async def test_models_list_passes_useful_headers_and_drops_account_headers(
    sdk: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    raw = await sdk.models.with_raw_response.list()
    page = raw.parse()

    assert [m.id for m in page.data] == ["gpt-5", "gpt-5-mini", "text-embedding-3-small"]
    assert raw.headers["x-request-id"].startswith("req_")
    assert raw.request_id == raw.headers["x-request-id"]
    assert raw.headers["x-ratelimit-limit-requests"] == "10000"
    assert raw.headers["x-ratelimit-remaining-requests"] == "9999"
    assert raw.headers["openai-processing-ms"] == "12"
    assert "set-cookie" not in raw.headers
    assert "openai-organization" not in raw.headers
    assert "org-secret-canary" not in str(raw.headers)
    assert_relay_credentials_stayed_behind(only(fake, "GET", "/v1/models"))


# --------------------------------------------------------------------- files and uploads


async def test_files_create_and_content_round_trip_64_mib_unchanged(
    sdk: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    data = os.urandom(64 * 1024 * 1024)
    digest = hashlib.sha256(data).hexdigest()

    async with asyncio.timeout(30):
        created = await sdk.files.create(
            file=("big.jsonl", data, "application/jsonl"), purpose="batch"
        )
        content = await sdk.files.content(created.id)

    assert created.bytes == len(data)
    assert created.filename == "big.jsonl"
    assert created.purpose == "batch"
    assert hashlib.sha256(content.content).hexdigest() == digest
    upload = only(fake, "POST", "/v1/files")
    parts = {p["name"]: p for p in upload.parts}
    assert set(parts) == {"file", "purpose"}
    assert parts["file"]["filename"] == "big.jsonl"
    assert parts["file"]["content_type"] == "application/jsonl"
    assert parts["file"]["size"] == len(data)
    assert parts["file"]["sha256"] == digest
    assert parts["purpose"]["data"] == b"batch"
    assert_relay_credentials_stayed_behind(upload)
    assert_relay_credentials_stayed_behind(only(fake, "GET", f"/v1/files/{created.id}/content"))


async def test_uploads_parts_complete_yield_a_file_with_the_concatenated_bytes(
    sdk: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    first, second = os.urandom(300_000), os.urandom(123_457)

    upload = await sdk.uploads.create(
        bytes=len(first) + len(second),
        filename="joined.bin",
        mime_type="application/octet-stream",
        purpose="assistants",
    )
    part_ids = [
        (await sdk.uploads.parts.create(upload.id, data=chunk)).id for chunk in (first, second)
    ]
    completed = await sdk.uploads.complete(upload.id, part_ids=part_ids)

    assert completed.status == "completed"
    assert completed.file is not None
    content = await sdk.files.content(completed.file.id)
    assert content.content == first + second
    parts_seen = [s for s in fake.seen if s.path == f"/v1/uploads/{upload.id}/parts"]
    assert [[p["name"] for p in s.parts] for s in parts_seen] == [["data"], ["data"]]
    assert [s.parts[0]["size"] for s in parts_seen] == [len(first), len(second)]
    complete = only(fake, "POST", f"/v1/uploads/{upload.id}/complete")
    assert json.loads(complete.body) == {"part_ids": part_ids}


async def test_user_data_file_content_is_refused_without_asking_upstream_for_it(
    sdk: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    private = fake.add_file(b"someone's diary", purpose="user_data")
    public = fake.add_file(b"team notes", purpose="assistants")

    with pytest.raises(openai.PermissionDeniedError) as refused:
        await sdk.files.content(private)

    assert refused.value.status_code == 403
    error = refused.value.response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] and error["code"]
    assert "user_data" in error["message"]
    assert not any(s.path == f"/v1/files/{private}/content" for s in fake.seen)

    content = await sdk.files.content(public)
    assert content.content == b"team notes"


# --------------------------------------------------------------------- vector stores, conversations


async def test_vector_store_create_retrieve_add_file_and_search(
    sdk: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    file_id = fake.add_file(b"relayd streams bytes", purpose="assistants")

    store = await sdk.vector_stores.create(name="docs", metadata={"team": "relayd"})
    retrieved = await sdk.vector_stores.retrieve(store.id)
    attached = await sdk.vector_stores.files.create(vector_store_id=store.id, file_id=file_id)
    results = await sdk.vector_stores.search(store.id, query="streams", max_num_results=3)

    assert store.name == "docs"
    assert retrieved.id == store.id
    assert attached.object is not None
    assert [(r.file_id, r.content[0].text) for r in results.data] == [("file-hit", "streams")]
    assert json.loads(only(fake, "POST", "/v1/vector_stores").body) == {
        "name": "docs",
        "metadata": {"team": "relayd"},
    }
    only(fake, "GET", f"/v1/vector_stores/{store.id}")
    assert json.loads(only(fake, "POST", f"/v1/vector_stores/{store.id}/files").body) == {
        "file_id": file_id
    }
    search = only(fake, "POST", f"/v1/vector_stores/{store.id}/search")
    assert json.loads(search.body) == {"query": "streams", "max_num_results": 3}
    for seen in fake.seen:
        assert_relay_credentials_stayed_behind(seen)


async def test_conversation_with_items_create_list_and_retrieve(
    sdk: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    conversation = await sdk.conversations.create(
        metadata={"topic": "relay"},
        items=[{"type": "message", "role": "user", "content": "hello"}],
    )
    await sdk.conversations.items.create(
        conversation.id, items=[{"type": "message", "role": "user", "content": "again"}]
    )
    items = await sdk.conversations.items.list(conversation.id, limit=10)
    retrieved = await sdk.conversations.retrieve(conversation.id)

    assert retrieved.id == conversation.id
    assert items.has_more is False
    created = json.loads(only(fake, "POST", "/v1/conversations").body)
    assert created["metadata"] == {"topic": "relay"}
    added = only(fake, "POST", f"/v1/conversations/{conversation.id}/items")
    assert json.loads(added.body)["items"][0]["content"] == "again"
    listing = only(fake, "GET", f"/v1/conversations/{conversation.id}/items")
    assert listing.query == {"limit": "10"}
    only(fake, "GET", f"/v1/conversations/{conversation.id}")


# --------------------------------------------------------------------- batches


async def test_batches_create_retrieve_cancel_and_list(
    sdk: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    batch = await sdk.batches.create(
        input_file_id="file-in", endpoint="/v1/responses", completion_window="24h"
    )
    retrieved = await sdk.batches.retrieve(batch.id)
    cancelled = await sdk.batches.cancel(batch.id)
    listed = await sdk.batches.list(limit=2)

    assert retrieved.id == batch.id
    assert cancelled.object is not None
    assert listed.data == []
    assert json.loads(only(fake, "POST", "/v1/batches").body) == {
        "input_file_id": "file-in",
        "endpoint": "/v1/responses",
        "completion_window": "24h",
    }
    only(fake, "GET", f"/v1/batches/{batch.id}")
    only(fake, "POST", f"/v1/batches/{batch.id}/cancel")
    assert only(fake, "GET", "/v1/batches").query == {"limit": "2"}


# --------------------------------------------------------------------- images, videos


async def test_images_edit_sends_image_and_mask_as_multipart_parts(
    sdk: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    result = await sdk.images.edit(
        image=("photo.png", PNG, "image/png"),
        mask=("mask.png", MASK, "image/png"),
        prompt="add a hat",
        model="gpt-image-1",
    )

    assert result.data is not None and result.data[0].b64_json == "aGVsbG8="
    seen = only(fake, "POST", "/v1/images/edits")
    parts = {p["name"]: p for p in seen.parts}
    assert parts["image"]["filename"] == "photo.png"
    assert parts["image"]["content_type"] == "image/png"
    assert parts["image"]["sha256"] == hashlib.sha256(PNG).hexdigest()
    assert parts["mask"]["filename"] == "mask.png"
    assert parts["mask"]["sha256"] == hashlib.sha256(MASK).hexdigest()
    assert parts["prompt"]["data"] == b"add a hat"
    assert parts["model"]["data"] == b"gpt-image-1"
    assert_relay_credentials_stayed_behind(seen)


async def test_images_generate_sends_json(sdk: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    result = await sdk.images.generate(model="gpt-image-1", prompt="a relay", size="1024x1024")

    assert result.data is not None and result.data[0].b64_json == "aGVsbG8="
    seen = only(fake, "POST", "/v1/images/generations")
    assert seen.headers["Content-Type"] == "application/json"
    assert json.loads(seen.body) == {
        "model": "gpt-image-1",
        "prompt": "a relay",
        "size": "1024x1024",
    }


# The SDK warns that Sora is deprecated; the pass-through is what is under test.
@pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")
async def test_videos_list_and_download_content_arrive_whole(
    sdk: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    videos = await sdk.videos.list(limit=3, order="desc")
    content = await sdk.videos.download_content("video_abc", variant="video")

    assert videos.data == []
    assert only(fake, "GET", "/v1/videos").query == {"limit": "3", "order": "desc"}
    assert content.response.headers["content-type"] == "video/mp4"
    body = content.content
    assert len(body) == 256 * 1024
    assert body == pattern_block()
    download = only(fake, "GET", "/v1/videos/video_abc/content")
    assert download.query == {"variant": "video"}
    assert_relay_credentials_stayed_behind(download)


# --------------------------------------------------------------------- chat completions


async def test_chat_completions_stream_is_data_only_sse_ending_with_done(
    sdk: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
    async with asyncio.timeout(10):
        async with sdk.chat.completions.with_streaming_response.create(
            model="gpt-5", messages=messages, stream=True
        ) as raw:
            lines = [line async for line in raw.iter_lines() if line]
        stream = await sdk.chat.completions.create(model="gpt-5", messages=messages, stream=True)
        async with stream:
            text = "".join([c.choices[0].delta.content or "" async for c in stream])

    assert raw.headers["content-type"].startswith("text/event-stream")
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert len(lines) == 4
    assert text == "Hello there!"
    chat = [s for s in fake.seen if s.path == "/v1/chat/completions"]
    assert len(chat) == 2
    for seen in chat:
        assert json.loads(seen.body)["stream"] is True
        assert_relay_credentials_stayed_behind(seen)


# ------------------------------------------------------------- a forgotten /v1


@pytest.mark.parametrize(
    "call",
    [
        lambda sdk: sdk.responses.create(model="gpt-5", input="hi"),
        lambda sdk: sdk.chat.completions.create(
            model="gpt-5", messages=[{"role": "user", "content": "hi"}]
        ),
        lambda sdk: sdk.files.retrieve("file-abc"),
        lambda sdk: sdk.models.list(),
    ],
    ids=["responses", "chat", "files", "models"],
)
async def test_a_base_url_without_v1_gets_a_404_that_says_to_add_it(
    relay: TestClient, fake: FakeOpenAI, call: Any
) -> None:
    # The operator's first hour (issue 11): OpenAI(base_url="http://host:8080").
    client = openai.AsyncOpenAI(
        base_url=str(relay.make_url("")), api_key=RELAY_KEY, max_retries=0, timeout=30
    )
    async with client:
        with pytest.raises(openai.NotFoundError) as caught:
            await call(client)
    error = caught.value.body
    assert isinstance(error, dict) and error["code"] == "unknown_url"
    assert error["type"] == "invalid_request_error"
    assert "/v1" in error["message"] and "base_url" in error["message"]
    assert fake.seen == []


async def test_an_unknown_path_outside_v1_gets_no_hint(relay: TestClient) -> None:
    response = await relay.get("/nothing/here", headers={"Authorization": f"Bearer {RELAY_KEY}"})
    assert response.status == 404
    assert "base_url" not in (await response.json())["error"]["message"]
