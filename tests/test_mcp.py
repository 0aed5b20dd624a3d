"""relayd's /mcp driven by the official MCP Python SDK (``mcp`` 2.x), end to end.

The SDK connects with a relay key as bearer (as an IDE agent does), lists the tools
and calls every one of them against the fake OpenAI upstream: model answers, files
in (ChatGPT apps' file objects, fetched from a loopback https file host) and out
(signed links that download), images as image content, videos as links. Answers as
JSON and as server-sent events.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx2
import pytest
from aiohttp.test_utils import TestClient
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from pytest_aiohttp import AiohttpServer
from yarl import URL

from relayd.config import parse_keys_env
from relayd.openapi import DEFAULT_ACTIONS
from tests.conftest import OTHER_KEY, RELAY_KEY, RelayFactory, make_settings
from tests.fakes.openai import FakeOpenAI
from tests.filehost import PNG, FileHost, start_file_host

PUBLIC = "https://relay.example.com"  # signed links name the public url, never Host


@contextlib.asynccontextmanager
async def connected(
    relay: TestClient, key: str = RELAY_KEY, mode: str = "legacy"
) -> AsyncIterator[Client]:
    """The SDK's client on relayd's /mcp, the relay key as bearer, every wait bounded."""
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx2.AsyncClient(headers=headers, timeout=20) as http:
        transport = streamable_http_client(str(relay.make_url("/mcp")), http_client=http)
        async with Client(transport, mode=mode, read_timeout_seconds=20) as client:
            yield client


def structured(result: Any) -> dict[str, Any]:
    assert not result.is_error, result.content
    assert isinstance(result.structured_content, dict)
    return result.structured_content


def texts(result: Any) -> list[str]:
    return [block.text for block in result.content if block.type == "text"]


def links(result: Any) -> list[Any]:
    return [block for block in result.content if block.type == "resource_link"]


async def download(relay: TestClient, uri: str) -> tuple[int, bytes, str]:
    """Fetch a signed link through the relay (its origin is the public url)."""
    assert uri.startswith(PUBLIC + "/")
    response = await relay.get(URL(uri).path_qs)  # no key: the link is the credential
    return response.status, await response.read(), response.headers.get("Content-Type", "")


@pytest.fixture
async def host(aiohttp_server: AiohttpServer, tmp_path: Path) -> FileHost:
    return await start_file_host(aiohttp_server, tmp_path)


def _apps_fetch(host: FileHost) -> dict[str, dict[str, Any]]:
    # The loopback file host is allowed for MCP calls only ([mcp] fetch_hosts),
    # not for GPT Actions ([actions] fetch_hosts keeps its defaults).
    return {
        "actions": {
            "fetch_allow_private": True,
            "fetch_ca_file": host.ca_file,
            "fetch_timeout_s": 2.0,
            "poll_interval_s": 0.05,
        },
        "mcp": {"fetch_hosts": ("127.0.0.1",)},
        "server": {"public_url": PUBLIC},
    }


@pytest.fixture
async def apps(relay_factory: RelayFactory, host: FileHost) -> TestClient:
    return await relay_factory(_apps_fetch(host))


def file_object(link: str, name: str, mime: str) -> dict[str, str]:
    """A file as ChatGPT apps send it (openai/fileParams)."""
    return {"download_url": link, "file_id": "file-chatgpt-1", "mime_type": mime, "file_name": name}


async def test_the_sdk_connects_with_a_relay_key_and_lists_the_actions_tools(
    apps: TestClient,
) -> None:
    async with asyncio.timeout(20), connected(apps) as client:
        assert client.protocol_version == "2025-11-25"
        listed = await client.list_tools()
    names = [tool.name for tool in listed.tools]
    assert sorted(names) == sorted(DEFAULT_ACTIONS)
    by_name = {tool.name: tool for tool in listed.tools}
    assert by_name["getRelayInfo"].annotations.read_only_hint is True
    assert by_name["createActionResponse"].annotations.read_only_hint is False
    assert by_name["proxyRequest"].annotations.destructive_hint is True


async def test_the_sdks_auto_mode_probes_discover_and_falls_back_to_initialize(
    relay: TestClient,
) -> None:
    # What ChatGPT does too: server/discover first (2026-07-28), -32601, then initialize.
    async with asyncio.timeout(20), connected(relay, mode="auto") as client:
        assert client.protocol_version == "2025-11-25"
        assert (await client.call_tool("getRelayInfo", {})).is_error is False


@pytest.mark.parametrize("answers", ["json", "sse"])
async def test_every_tool_answers_against_the_fake_upstream(
    relay_factory: RelayFactory, fake: FakeOpenAI, host: FileHost, answers: str
) -> None:
    apps = await relay_factory(_apps_fetch(host), mcp={"call_answers": answers})
    fake.image_bytes = PNG
    fake.video_status = "completed"
    photo = host.put("photo.png", PNG)
    notes = host.put("notes.txt", b"meeting notes\n")
    called: set[str] = set()
    async with asyncio.timeout(40), connected(apps) as client:

        async def call(name: str, arguments: dict[str, Any]) -> Any:
            called.add(name)
            return await client.call_tool(name, arguments)

        info = structured(await call("getRelayInfo", {}))
        assert info["relay"]["name"] == "relayd"

        answer = await call("createActionResponse", {"input": "hello"})
        assert texts(answer) == ["answer to: hello"]  # the answer once, as the text
        assert "output_text" not in structured(answer)
        polled = structured(
            await call("getActionResponse", {"response_id": answer.structured_content["id"]})
        )
        assert polled["status"] == "completed"

        uploaded = structured(
            await call(
                "uploadFileAction",
                {
                    "purpose": "assistants",
                    "openaiFileIdRefs": [file_object(notes, "notes.txt", "text/plain")],
                },
            )
        )
        assert fake.files[uploaded["id"]].data == b"meeting notes\n"
        assert fake.files[uploaded["id"]].filename == "notes.txt"

        content = await call("getFileContentAction", {"file_id": uploaded["id"]})
        (link,) = links(content)
        assert link.name == "notes.txt"
        assert await download(apps, str(link.uri)) == (200, b"meeting notes\n", "text/plain")
        assert structured(content)["files"][0]["url"] == str(link.uri)

        made = await call("generateImageAction", {"prompt": "a red dot"})
        (image,) = [block for block in made.content if block.type == "image"]
        assert base64.b64decode(image.data) == PNG and image.mime_type == "image/png"
        (image_link,) = links(made)
        assert (await download(apps, str(image_link.uri)))[1] == PNG

        edited = await call(
            "editImageAction",
            {"prompt": "bluer", "openaiFileIdRefs": [file_object(photo, "photo.png", "image/png")]},
        )
        assert links(edited) and not edited.is_error
        varied = await call(
            "createImageVariationAction",
            {"openaiFileIdRefs": [file_object(photo, "photo.png", "image/png")]},
        )
        assert links(varied) and not varied.is_error
        assert host.hits.count("/files/photo.png") == 2

        video = structured(await call("generateVideoAction", {"prompt": "waves", "seconds": 4}))
        remix = structured(
            await call("remixVideoAction", {"video_id": "video_1", "prompt": "at night"})
        )
        assert video["object"] and remix
        got = await call("getVideoContentAction", {"video_id": "video_1"})
        (video_link,) = links(got)
        status, data, kind = await download(apps, str(video_link.uri))
        assert (status, len(data), kind) == (200, 256 * 1024, "video/mp4")

        models = structured(await call("proxyRequest", {"method": "GET", "path": "/v1/models"}))
        assert [m["id"] for m in models["data"]][:1] == ["gpt-5"]
    assert called == set(DEFAULT_ACTIONS)


async def test_a_null_argument_counts_as_left_out(apps: TestClient, fake: FakeOpenAI) -> None:
    async with asyncio.timeout(20), connected(apps) as client:
        result = await client.call_tool(
            "createActionResponse", {"input": "hi", "model": None, "instructions": None}
        )
    assert texts(result) == ["answer to: hi"]
    (sent,) = [s for s in fake.seen if (s.method, s.path) == ("POST", "/v1/responses")]
    assert json.loads(sent.body)["model"] == "gpt-5"  # the relay's default


async def test_a_bad_argument_is_a_tool_error_the_model_can_read(
    apps: TestClient, fake: FakeOpenAI
) -> None:
    async with asyncio.timeout(20), connected(apps) as client:
        result = await client.call_tool("generateImageAction", {"n": 99})
    assert result.is_error
    assert "Invalid 'n'" in texts(result)[0]
    assert fake.seen == []


async def test_a_key_scoped_away_from_a_tools_group_gets_a_tool_error(
    relay_factory: RelayFactory, fake: FakeOpenAI
) -> None:
    keys = parse_keys_env(f"team:{RELAY_KEY},other:{OTHER_KEY}")
    scoped = tuple(
        replace(k, scopes=frozenset({"mcp", "meta"})) if k.name == "other" else k for k in keys
    )
    relay = await relay_factory(auth={"keys": scoped})
    async with asyncio.timeout(20), connected(relay, OTHER_KEY) as client:
        refused = await client.call_tool("createActionResponse", {"input": "hi"})
        allowed = await client.call_tool("getRelayInfo", {})
    assert refused.is_error and "may not use the 'actions' routes" in texts(refused)[0]
    assert not allowed.is_error
    assert fake.seen == []


async def test_files_outside_the_apps_hosts_are_refused_and_actions_keep_their_own_list(
    apps: TestClient, fake: FakeOpenAI, host: FileHost
) -> None:
    photo = host.put("photo.png", PNG)
    refs = [{"download_link": photo, "name": "photo.png"}]
    # GPT Actions do not get [mcp] fetch_hosts: the same host is refused there.
    response = await apps.post(
        "/v1/actions/images/variations",
        json={"openaiFileIdRefs": refs},
        headers={"Authorization": f"Bearer {RELAY_KEY}"},
    )
    assert response.status == 403
    assert host.hits == [] and fake.seen == []


@pytest.mark.parametrize("answers", ["json", "sse"])
async def test_tool_calls_answer_as_json_or_as_events(
    relay_factory: RelayFactory, fake: FakeOpenAI, answers: str
) -> None:
    relay = await relay_factory(mcp={"call_answers": answers, "sse_keepalive_s": 0.05})
    async with asyncio.timeout(20), connected(relay) as client:
        result = await client.call_tool(
            "createActionResponse", {"input": "hi", "model": "wait-0.3"}
        )
    assert texts(result) == ["answer to: hi"]
    # What the wire carried: the same call, raw.
    body = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "getRelayInfo"}}
    headers = {
        "Authorization": f"Bearer {RELAY_KEY}",
        "Accept": "application/json, text/event-stream",
    }
    response = await relay.post("/mcp", json=body, headers=headers)
    raw = await response.text()
    assert "Mcp-Session-Id" not in response.headers
    if answers == "json":
        assert response.content_type == "application/json"
        assert json.loads(raw)["id"] == 7
    else:
        assert response.content_type == "text/event-stream"
        assert response.headers["X-Accel-Buffering"] == "no"
        event = next(line for line in raw.splitlines() if line.startswith("data:"))
        assert json.loads(event.removeprefix("data:"))["result"]["isError"] is False
    # A client that takes JSON only gets JSON, whatever the setting.
    only_json = {**headers, "Accept": "application/json"}
    response = await relay.post("/mcp", json=body, headers=only_json)
    assert response.content_type == "application/json"
    assert (await response.json())["result"]["isError"] is False


async def test_a_slow_sse_call_carries_keepalive_comments(
    relay_factory: RelayFactory, fake: FakeOpenAI
) -> None:
    relay = await relay_factory(
        mcp={"call_answers": "sse", "sse_keepalive_s": 0.1},
        actions={"poll_interval_s": 0.05},
    )
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {
            "name": "createActionResponse",
            "arguments": {"input": "x", "model": "wait-0.5"},
        },
    }
    headers = {
        "Authorization": f"Bearer {RELAY_KEY}",
        "Accept": "application/json, text/event-stream",
    }
    async with asyncio.timeout(10):
        response = await relay.post("/mcp", json=body, headers=headers)
        raw = await response.text()
    assert raw.count(": ping") >= 2, raw
    assert '"answer to: x"' in raw


def test_settings_refuse_an_unknown_tool_name() -> None:
    from relayd.app import create_app
    from relayd.config import ConfigError

    with pytest.raises(ConfigError, match="not an Actions operation"):
        create_app(make_settings(mcp={"tools": ("createActionResponse", "getHealth")}))


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"call_answers": "xml"}, "call_answers"),
        ({"answer_budget_s": 0}, "answer_budget"),
        ({"repeat_window_s": -1}, "repeat_window"),
        ({"origins": ("chatgpt.com",)}, "not an origin"),
        ({"origins": ("https://ide.example/app",)}, "not an origin"),
    ],
)
def test_settings_refuse_what_cannot_work(section: dict[str, Any], message: str) -> None:
    from relayd.config import ConfigError
    from relayd.config.checks import validate

    with pytest.raises(ConfigError, match=message):
        validate(make_settings(mcp=section))


def test_an_origin_with_a_trailing_slash_is_an_origin() -> None:
    from relayd.config.checks import validate

    validate(make_settings(mcp={"origins": ("https://ide.example/",)}))


async def test_an_image_past_the_inline_bound_comes_back_as_a_link_only(
    relay_factory: RelayFactory, fake: FakeOpenAI
) -> None:
    relay = await relay_factory(
        server={"public_url": PUBLIC}, mcp={"max_image_bytes": len(PNG) - 1}
    )
    fake.image_bytes = PNG
    async with asyncio.timeout(20), connected(relay) as client:
        made = await client.call_tool("generateImageAction", {"prompt": "a red dot"})
    assert [block.type for block in made.content] == ["text", "resource_link"]
    assert (await download(relay, str(links(made)[0].uri)))[1] == PNG
