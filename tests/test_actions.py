"""The ChatGPT Actions surface: wrappers, answers within ChatGPT's limits, files back.

Every wrapper test records exactly what went upstream (part names, filenames,
content types, bytes); every refusal test records that nothing did.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpServer

from relayd.config import RelayKey, parse_keys_env
from relayd.state import KEYRING
from tests.conftest import RELAY_KEY, RelayFactory
from tests.fakes.openai import FakeOpenAI, Seen
from tests.filehost import JPEG, PNG, FileHost, fetch_settings, start_file_host

AUTH = {"Authorization": f"Bearer {RELAY_KEY}"}
PUBLIC = "https://relay.example.com"  # signed links name the public url, never Host


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def parts(seen: Seen) -> list[tuple[str, str | None, str | None, bytes]]:
    return [(p["name"], p["filename"], p["content_type"], p["data"]) for p in seen.parts]


def only(fake: FakeOpenAI, method: str, path: str) -> Seen:
    matches = [s for s in fake.seen if (s.method, s.path) == (method, path)]
    assert len(matches) == 1, [(s.method, s.path) for s in fake.seen]
    return matches[0]


def assert_refused(body: dict[str, Any], param: str | None, code: str | None = None) -> None:
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error


@pytest.fixture
async def host(aiohttp_server: AiohttpServer, tmp_path: Path) -> FileHost:
    return await start_file_host(aiohttp_server, tmp_path)


@pytest.fixture
async def actions(relay_factory: RelayFactory, host: FileHost) -> TestClient:
    return await relay_factory(
        fetch_settings(host),
        actions={"poll_interval_s": 0.05},
        server={"public_url": PUBLIC},
    )


async def post(client: TestClient, path: str, body: Any) -> tuple[int, Any]:
    response = await client.post(path, json=body, headers=AUTH)
    data = await response.json() if response.content_type == "application/json" else None
    return response.status, data


# ------------------------------------------------------------------ files and uploads


async def test_file_upload_from_base64_sends_file_and_purpose(
    actions: TestClient, fake: FakeOpenAI
) -> None:
    status, body = await post(
        actions,
        "/v1/actions/files/upload",
        {
            "purpose": "assistants",
            "filename": "café notes.txt",
            "mime_type": "text/markdown",
            "data_base64": b64(b"# hello\n"),
            "expires_after": {"anchor": "created_at", "seconds": 3600},
        },
    )
    assert status == 200
    seen = only(fake, "POST", "/v1/files")
    assert parts(seen) == [
        ("purpose", None, None, b"assistants"),
        ("expires_after[anchor]", None, None, b"created_at"),
        ("expires_after[seconds]", None, None, b"3600"),
        ("file", "café notes.txt", "text/markdown", b"# hello\n"),
    ]
    assert seen.headers["Authorization"] != AUTH["Authorization"]
    assert body == fake.files[body["id"]].object() | {"created_at": body["created_at"]}


async def test_file_upload_from_an_attached_file_fetches_and_sniffs_it(
    actions: TestClient, fake: FakeOpenAI, host: FileHost
) -> None:
    pdf = b"%PDF-1.7\n" + bytes(range(256)) * 40
    link = host.put("report", pdf)
    status, body = await post(
        actions,
        "/v1/actions/files/upload",
        {
            "purpose": "user_data",
            "openaiFileIdRefs": [
                {
                    "name": "report.pdf",
                    "id": "file-x",
                    "mime_type": "text/plain",
                    "download_link": link,
                }
            ],
        },
    )
    assert status == 200, body
    assert parts(only(fake, "POST", "/v1/files"))[-1] == (
        "file",
        "report.pdf",
        "application/pdf",
        pdf,
    )
    assert host.hits == ["/files/report"]


async def test_file_upload_keeps_a_claimed_text_type_over_plain_text(
    actions: TestClient, fake: FakeOpenAI, host: FileHost
) -> None:
    link = host.put("table", b"a,b\n1,2\n")
    status, _ = await post(
        actions,
        "/v1/actions/files/upload",
        {
            "purpose": "assistants",
            "openaiFileIdRefs": [
                {"name": "table.csv", "mime_type": "text/csv", "download_link": link}
            ],
        },
    )
    assert status == 200
    assert parts(only(fake, "POST", "/v1/files"))[-1][1:3] == ("table.csv", "text/csv")


@pytest.mark.parametrize(
    "body, param, status",
    [
        ({"filename": "a.txt", "data_base64": "aGk="}, "purpose", 400),
        ({"purpose": "assistants", "data_base64": "aGk="}, "filename", 400),
        ({"purpose": "assistants"}, "data_base64", 400),
        (
            {"purpose": "assistants", "filename": "a.txt", "data_base64": "not base64!"},
            "data_base64",
            400,
        ),
        ({"purpose": "assistants", "filename": "a.txt", "data_base64": ""}, "data_base64", 400),
        (
            {"purpose": "assistants", "filename": "../etc/passwd", "data_base64": "aGk="},
            "filename",
            400,
        ),
        (
            {"purpose": "assistants", "filename": "a\r\nb.txt", "data_base64": "aGk="},
            "filename",
            400,
        ),
        (
            {
                "purpose": "assistants",
                "filename": "a.txt",
                "mime_type": "text/plain\r\nX: y",
                "data_base64": "aGk=",
            },
            "mime_type",
            400,
        ),
        ({"purpose": "assistants", "openaiFileIdRefs": ["file-abc"]}, "openaiFileIdRefs[0]", 400),
        (
            {"purpose": "assistants", "filename": "a.bin", "data_base64": b64(b"x" * 1025)},
            "data_base64",
            413,
        ),
    ],
    ids=[
        "no-purpose",
        "no-filename",
        "no-file",
        "bad-base64",
        "empty",
        "path-filename",
        "crlf-filename",
        "crlf-type",
        "bare-id-ref",
        "over-cap",
    ],
)
async def test_bad_upload_payloads_are_refused_before_upstream(
    relay_factory: RelayFactory,
    fake: FakeOpenAI,
    body: dict[str, Any],
    param: str,
    status: int,
) -> None:
    relay = await relay_factory(actions={"max_file_bytes": 1024})
    got, answer = await post(relay, "/v1/actions/files/upload", body)
    assert got == status
    assert_refused(answer, param)
    assert fake.seen == []


async def test_uploads_create_part_complete_cancel(actions: TestClient, fake: FakeOpenAI) -> None:
    status, upload = await post(
        actions,
        "/v1/actions/uploads",
        {
            "purpose": "assistants",
            "filename": "big.jsonl",
            "bytes": 6,
            "mime_type": "application/jsonl",
            "future_field": {"kept": True},
        },
    )
    assert status == 200
    # Unknown fields in pass-through JSON are not dropped.
    assert json.loads(only(fake, "POST", "/v1/uploads").body) == {
        "purpose": "assistants",
        "filename": "big.jsonl",
        "bytes": 6,
        "mime_type": "application/jsonl",
        "future_field": {"kept": True},
    }
    upload_id = upload["id"]
    ids = []
    for chunk in (b"abc", b"def"):
        status, part = await post(
            actions, f"/v1/actions/uploads/{upload_id}/parts", {"data_base64": b64(chunk)}
        )
        assert status == 200
        ids.append(part["id"])
    sent = [s for s in fake.seen if s.path.endswith("/parts")]
    assert [parts(s) for s in sent] == [
        [("data", "part", "application/octet-stream", b"abc")],
        [("data", "part", "application/octet-stream", b"def")],
    ]
    status, done = await post(
        actions, f"/v1/actions/uploads/{upload_id}/complete", {"part_ids": ids}
    )
    assert status == 200 and done["status"] == "completed"
    sent = only(fake, "POST", f"/v1/uploads/{upload_id}/complete")
    assert json.loads(sent.body) == {"part_ids": ids}
    assert fake.files[done["file"]["id"]].data == b"abcdef"
    response = await actions.post(f"/v1/actions/uploads/{upload_id}/cancel", headers=AUTH)
    assert response.status == 200
    assert fake.seen[-1].path == f"/v1/uploads/{upload_id}/cancel"


async def test_upload_ids_cannot_smuggle_path_tricks(actions: TestClient, fake: FakeOpenAI) -> None:
    response = await actions.post(
        "/v1/actions/uploads/up%2F..%2Fadmin/complete", json={"part_ids": ["p"]}, headers=AUTH
    )
    assert response.status in (400, 404)
    assert fake.seen == []


# ------------------------------------------------------------------ images


async def test_image_edit_sends_images_and_mask_and_hands_back_files(
    actions: TestClient, fake: FakeOpenAI, host: FileHost
) -> None:
    fake.image_bytes = PNG
    links = [host.put("a", PNG), host.put("b", JPEG), host.put("m", PNG)]
    status, body = await post(
        actions,
        "/v1/actions/images/edits",
        {
            "prompt": "combine them",
            "model": "gpt-image-1",
            "quality": "high",
            "openaiFileIdRefs": [
                {"name": "cat.png", "download_link": links[0]},
                links[1],  # a plain string, as ChatGPT sometimes sends
                {"name": "mask.png", "download_link": links[2]},
            ],
            "mask_index": 2,
        },
    )
    assert status == 200, body
    seen = only(fake, "POST", "/v1/images/edits")
    assert parts(seen) == [
        ("model", None, None, b"gpt-image-1"),
        ("prompt", None, None, b"combine them"),
        ("quality", None, None, b"high"),
        ("image[]", "cat.png", "image/png", PNG),
        ("image[]", "b.jpg", "image/jpeg", JPEG),
        ("mask", "mask.png", "image/png", PNG),
    ]
    assert "b64_json" not in body["data"][0] and body["data"][0]["file"] == "image-1.png"
    assert body["openaiFileResponse"] == [
        {"name": "image-1.png", "mime_type": "image/png", "content": b64(PNG)}
    ]
    assert body["usage"]["total_tokens"] == 12  # upstream's own fields stay


async def test_image_edit_from_url_and_base64_with_mask_base64(
    actions: TestClient, fake: FakeOpenAI, host: FileHost
) -> None:
    status, _ = await post(
        actions,
        "/v1/actions/images/edits",
        {"prompt": "p", "image_url": host.put("u", JPEG), "mask_base64": b64(PNG)},
    )
    assert status == 200
    assert [(n, f, t) for n, f, t, _ in parts(only(fake, "POST", "/v1/images/edits"))] == [
        ("prompt", None, None),
        ("image", "u.jpg", "image/jpeg"),
        ("mask", "mask.png", "image/png"),
    ]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "p"}, "openaiFileIdRefs"),
        ({"image_base64": b64(PNG)}, "prompt"),
        ({"prompt": "p", "image_base64": b64(b"%PDF-1.4 not an image")}, "image_base64"),
        ({"prompt": "p", "image_base64": b64(PNG), "mask_base64": b64(JPEG)}, "mask_base64"),
        ({"prompt": "p", "openaiFileIdRefs": ["https://x.test/a"], "mask_index": 3}, "mask_index"),
        ({"prompt": "p", "image_base64": b64(PNG), "n": 11}, "n"),
    ],
    ids=["no-image", "no-prompt", "not-an-image", "jpeg-mask", "mask-index-out", "n-too-big"],
)
async def test_bad_image_edits_are_refused_before_upstream(
    actions: TestClient, fake: FakeOpenAI, body: dict[str, Any], param: str
) -> None:
    status, answer = await post(actions, "/v1/actions/images/edits", body)
    assert status == 400
    assert_refused(answer, param)
    assert fake.seen == []


async def test_image_variation_sends_one_image_part(actions: TestClient, fake: FakeOpenAI) -> None:
    fake.image_bytes = PNG
    status, body = await post(
        actions, "/v1/actions/images/variations", {"image_base64": b64(PNG), "n": 2}
    )
    assert status == 200
    assert parts(only(fake, "POST", "/v1/images/variations")) == [
        ("n", None, None, b"2"),
        ("image", "image.png", "image/png", PNG),
    ]
    assert [f["name"] for f in body["openaiFileResponse"]] == ["image-1.png", "image-2.png"]


async def test_image_generation_goes_as_json_without_stream(
    actions: TestClient, fake: FakeOpenAI
) -> None:
    fake.image_bytes = PNG
    status, body = await post(
        actions,
        "/v1/actions/images/generations",
        {"prompt": "a relay", "stream": True, "partial_images": 2, "style": "vivid"},
    )
    assert status == 200
    assert json.loads(only(fake, "POST", "/v1/images/generations").body) == {
        "prompt": "a relay",
        "style": "vivid",
    }
    assert body["openaiFileResponse"][0]["content"] == b64(PNG)


# ------------------------------------------------------------------ files handed back


async def test_large_images_come_back_as_signed_links_anyone_can_fetch_briefly(
    relay_factory: RelayFactory, fake: FakeOpenAI
) -> None:
    relay = await relay_factory(
        actions={"inline_max_bytes": 0, "link_ttl_s": 1.0},
        server={"public_url": "https://relay.example.com"},
    )
    fake.image_bytes = PNG
    status, body = await post(relay, "/v1/actions/images/generations", {"prompt": "p"})
    assert status == 200
    (link,) = body["openaiFileResponse"]
    assert link.startswith("https://relay.example.com/v1/actions/downloads/")
    path = link.removeprefix("https://relay.example.com")
    download = await relay.get(path)  # no relay key: the signature is the credential
    assert download.status == 200
    assert await download.read() == PNG
    assert download.headers["Content-Type"] == "image/png"
    assert download.headers["Content-Disposition"].startswith('attachment; filename="image-1.png"')
    tampered = path[:-3] + ("AAA" if not path.endswith("AAA") else "BBB")
    assert (await relay.get(tampered)).status == 404
    await asyncio.sleep(1.1)
    expired = await relay.get(path)
    assert expired.status == 404
    assert (await expired.json())["error"]["code"] == "link_expired"


async def test_without_a_public_url_a_link_is_refused_never_guessed_from_host(
    relay_factory: RelayFactory, fake: FakeOpenAI
) -> None:
    # Issue 11, item 7: a link built from Host points wherever the client said.
    relay = await relay_factory(actions={"inline_max_bytes": 100})
    small = fake.add_file(b"hello, chat", filename="hello.txt")
    big = fake.add_file(bytes(range(256)) * 4, filename="data.bin")
    forged = {**AUTH, "Host": "rebind.attacker.example"}
    response = await relay.get(f"/v1/actions/files/{big}/content", headers=forged)
    assert response.status == 500
    body = await response.json()
    assert_refused(body, None, "public_url_not_set")
    assert "RELAYD_PUBLIC_URL" in body["error"]["message"]
    assert "attacker" not in json.dumps(body)
    # Inline answers need no origin, and still work.
    response = await relay.get(f"/v1/actions/files/{small}/content", headers=forged)
    assert (await response.json())["openaiFileResponse"][0]["content"] == b64(b"hello, chat")


@pytest.mark.parametrize(
    "token",
    ["abc.d%C3%A9f", "%C3%A9t%C3%A9.abc", "abc.%E2%80%A8", "abc.\u00e9", "x.%F0%9F%98%80"],
)
async def test_a_token_with_non_ascii_characters_is_an_invalid_link(
    relay: TestClient, caplog: pytest.LogCaptureFixture, token: str
) -> None:
    # Issue 11: comparing a non-ASCII signature raised TypeError, a 500 with a traceback.
    response = await relay.get(f"/v1/actions/downloads/{token}")
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "link_invalid"
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


async def test_file_content_comes_back_inline_or_as_a_link(
    relay_factory: RelayFactory, fake: FakeOpenAI
) -> None:
    relay = await relay_factory(
        actions={"inline_max_bytes": 100},
        server={"public_url": PUBLIC},
    )
    small = fake.add_file(b"hello, chat", filename="hello.txt")
    big = fake.add_file(bytes(range(256)) * 4, filename="data.bin")
    response = await relay.get(f"/v1/actions/files/{small}/content", headers=AUTH)
    body = await response.json()
    assert body["openaiFileResponse"] == [
        {"name": "hello.txt", "mime_type": "text/plain", "content": b64(b"hello, chat")}
    ]
    response = await relay.get(f"/v1/actions/files/{big}/content", headers=AUTH)
    (link,) = (await response.json())["openaiFileResponse"]
    download = await relay.get(link.removeprefix(PUBLIC))
    assert download.status == 200
    assert await download.read() == bytes(range(256)) * 4
    assert download.headers["Content-Type"] == "application/octet-stream"
    assert 'filename="data.bin"' in download.headers["Content-Disposition"]


async def test_user_data_files_are_not_handed_out(actions: TestClient, fake: FakeOpenAI) -> None:
    private = fake.add_file(b"secret", purpose="user_data", filename="me.txt")
    response = await actions.get(f"/v1/actions/files/{private}/content", headers=AUTH)
    assert response.status == 403
    assert [s.path for s in fake.seen] == [f"/v1/files/{private}"]  # metadata only


async def test_finished_video_comes_back_as_a_link(actions: TestClient, fake: FakeOpenAI) -> None:
    fake.video_status = "in_progress"
    body = await (await actions.get("/v1/actions/videos/video_1/content", headers=AUTH)).json()
    assert body["status"] == "in_progress" and "openaiFileResponse" not in body
    fake.video_status = "completed"
    body = await (await actions.get("/v1/actions/videos/video_1/content", headers=AUTH)).json()
    (link,) = body["openaiFileResponse"]
    download = await actions.get(link.removeprefix(PUBLIC))
    assert download.headers["Content-Type"] == "video/mp4"
    assert len(await download.read()) == 256 * 1024
    assert fake.seen[-1].path == "/v1/videos/video_1/content"
    assert fake.seen[-1].query == {"variant": "video"}


# ------------------------------------------------------------------ videos


async def test_video_create_and_remix_send_checked_json(
    actions: TestClient, fake: FakeOpenAI
) -> None:
    status, _ = await post(
        actions, "/v1/actions/videos", {"prompt": "waves", "seconds": 8, "size": "1280x720"}
    )
    assert status == 200
    assert json.loads(only(fake, "POST", "/v1/videos").body) == {
        "prompt": "waves",
        "seconds": "8",
        "size": "1280x720",
    }
    status, _ = await post(actions, "/v1/actions/videos/video_9/remix", {"prompt": "at night"})
    assert status == 200
    assert json.loads(only(fake, "POST", "/v1/videos/video_9/remix").body) == {"prompt": "at night"}


async def test_video_generation_posts_multipart_to_v1_videos(
    actions: TestClient, fake: FakeOpenAI
) -> None:
    status, _ = await post(
        actions,
        "/v1/actions/videos/generations",
        {
            "prompt": "a cat",
            "model": "sora-2",
            "size": "720x1280",
            "duration_seconds": 4,
            "frames": 96,
            "input_reference_base64": b64(JPEG),
        },
    )
    assert status == 200
    assert [s.path for s in fake.seen] == ["/v1/videos"]  # not /v1/videos/generations
    assert parts(fake.seen[0]) == [
        ("prompt", None, None, b"a cat"),
        ("model", None, None, b"sora-2"),
        ("size", None, None, b"720x1280"),
        ("seconds", None, None, b"4"),
        ("input_reference", "input.jpg", "image/jpeg", JPEG),
    ]


@pytest.mark.parametrize(
    "extra, param, status",
    [
        ({"prompt": None}, "prompt", 400),
        ({"model": "invalid-model"}, "model", 400),
        ({"size": "999x999"}, "size", 400),
        ({"seconds": 13}, "seconds", 400),
        ({"duration_seconds": 31}, "duration_seconds", 400),
        ({"frames": 301}, "frames", 400),
        ({"data_base64": "not-base64!!"}, "data_base64", 400),
        ({"data_base64": ""}, "data_base64", 400),
        ({"data_base64": b64(b"x" * 2048)}, "data_base64", 413),
    ],
    ids=["prompt", "model", "size", "seconds", "duration", "frames", "base64", "empty", "too-big"],
)
async def test_video_generation_checks_refuse_before_upstream(
    relay_factory: RelayFactory,
    fake: FakeOpenAI,
    extra: dict[str, Any],
    param: str,
    status: int,
) -> None:
    relay = await relay_factory(actions={"video_max_bytes": 1024})
    body = {k: v for k, v in ({"prompt": "a cat"} | extra).items() if v is not None}
    got, answer = await post(relay, "/v1/actions/videos/generations", body)
    assert got == status
    assert_refused(answer, param)
    assert fake.seen == []


async def test_video_allowed_sets_are_configurable(
    relay_factory: RelayFactory, fake: FakeOpenAI
) -> None:
    relay = await relay_factory(
        actions={"video_models": ("sora-3",), "video_seconds": (20,)},
    )
    status, _ = await post(
        relay, "/v1/actions/videos/generations", {"prompt": "p", "model": "sora-3", "seconds": 20}
    )
    assert status == 200
    status, answer = await post(
        relay, "/v1/actions/videos/generations", {"prompt": "p", "model": "sora-2"}
    )
    assert status == 400 and answer["error"]["param"] == "model"


# ------------------------------------------------------------------ answers


async def test_a_quick_model_answers_with_its_text(actions: TestClient, fake: FakeOpenAI) -> None:
    status, body = await post(
        actions,
        "/v1/actions/responses",
        {"input": "hi", "stream": True, "reasoning": {"effort": "low"}},
    )
    assert status == 200
    assert body["status"] == "completed"
    assert body["output_text"] == "answer to: hi"
    assert body["model"] == "gpt-5" and body["id"].startswith("resp_")
    assert body["usage"]["total_tokens"] == 14
    sent = json.loads(only(fake, "POST", "/v1/responses").body)
    assert sent == {
        "input": "hi",
        "reasoning": {"effort": "low"},
        "model": "gpt-5",
        "stream": False,
        "background": True,
        "store": True,
    }


async def test_a_slow_model_gets_a_handle_in_time_and_the_poll_returns_the_text(
    relay_factory: RelayFactory, fake: FakeOpenAI
) -> None:
    relay = await relay_factory(actions={"answer_budget_s": 0.3, "poll_interval_s": 0.05})
    started = time.monotonic()
    async with asyncio.timeout(2):
        status, body = await post(
            relay, "/v1/actions/responses", {"model": "wait-1.0", "input": "think"}
        )
    assert status == 200
    assert time.monotonic() - started < 0.9  # the budget, not the model, set the pace
    assert body["status"] in ("queued", "in_progress") and "output_text" not in body
    assert body["poll_after_s"] > 0 and "getActionResponse" in body["relay_note"]
    async with asyncio.timeout(5):
        while body["status"] != "completed":
            response = await relay.get(f"/v1/actions/responses/{body['id']}", headers=AUTH)
            assert response.status == 200
            body = await response.json()
    assert body["output_text"] == "answer to: think"


async def test_a_huge_answer_is_cut_under_chatgpts_limit_and_says_so(
    actions: TestClient,
) -> None:
    response = await actions.post(
        "/v1/actions/responses", json={"model": "huge", "input": "x"}, headers=AUTH
    )
    text = await response.text()
    assert len(text) < 100_000
    body = json.loads(text)
    assert body["output_text"].endswith("…[cut by the relay]")
    assert "300" in body["relay_note"] and body["status"] == "completed"


async def test_upstream_errors_pass_through_the_answer_route(actions: TestClient) -> None:
    status, body = await post(
        actions, "/v1/actions/responses", {"model": "error-429", "input": "x"}
    )
    assert status == 429
    assert body["error"]["message"] == "Simulated upstream error 429"


async def test_streaming_wrapper_forces_stream_and_streams(
    actions: TestClient, fake: FakeOpenAI
) -> None:
    response = await actions.post(
        "/v1/actions/responses/stream", json={"input": "hi"}, headers=AUTH
    )
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert b"event: response.completed" in await response.read()
    assert json.loads(only(fake, "POST", "/v1/responses").body)["stream"] is True


# ------------------------------------------------------------------ privacy


async def test_privacy_page_needs_no_key(relay_factory: RelayFactory) -> None:
    relay = await relay_factory()
    response = await relay.get("/privacy")
    assert response.status == 200
    assert "does not store the content" in await response.text()
    relay = await relay_factory(actions={"privacy_url": "https://example.com/privacy"})
    response = await relay.get("/privacy", allow_redirects=False)
    assert response.status == 302
    assert response.headers["Location"] == "https://example.com/privacy"


# ------------------------------------------------------------------ links end with their key


async def test_a_link_ends_when_its_key_is_removed_or_its_secret_replaced(
    relay_factory: RelayFactory, fake: FakeOpenAI
) -> None:
    # Issue 11, item 7: a removed key's links stayed alive until they expired.
    relay = await relay_factory(
        actions={"inline_max_bytes": 0},
        server={"public_url": PUBLIC},
    )
    fake.image_bytes = PNG
    _, body = await post(relay, "/v1/actions/images/generations", {"prompt": "p"})
    path = body["openaiFileResponse"][0].removeprefix(PUBLIC)
    assert RELAY_KEY not in path and hashlib.sha256(RELAY_KEY.encode()).hexdigest() not in path
    keyring = relay.server.app[KEYRING]
    team, other = keyring.keys
    keyring.replace([other])
    response = await relay.get(path)
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "link_revoked"
    keyring.replace([team, other])  # back: the link works again until it expires
    assert (await relay.get(path)).status == 200
    keyring.replace([RelayKey("team", hashlib.sha256(b"a new secret for team").digest()), other])
    assert (await relay.get(path)).status == 404  # same name, new secret: revoked


async def test_a_keyless_link_ends_once_keys_are_required(
    relay_factory: RelayFactory, fake: FakeOpenAI
) -> None:
    relay = await relay_factory(
        auth={"keys": ()},
        actions={"inline_max_bytes": 0},
        server={"public_url": PUBLIC},
    )
    fake.image_bytes = PNG
    response = await relay.post("/v1/actions/images/generations", json={"prompt": "p"})
    path = (await response.json())["openaiFileResponse"][0].removeprefix(PUBLIC)
    assert (await relay.get(path)).status == 200
    relay.server.app[KEYRING].replace(parse_keys_env(f"team:{RELAY_KEY}"))
    response = await relay.get(path)
    assert (await response.json())["error"]["code"] == "link_revoked"
