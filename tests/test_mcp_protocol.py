"""The MCP transport's rules, each refusal on its own, and the tool descriptors.

Raw requests to a relayd on loopback (no SDK: these are the requests an SDK would
never send), then what ``tools/list`` says about every tool, checked against the
route table it is derived from.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from relayd.config import Settings, updated
from relayd.mcp.tools import FILE_OBJECT, ToolSet
from relayd.openapi import DEFAULT_ACTIONS
from relayd.routes import TABLE
from tests.conftest import RELAY_KEY, RelayFactory
from tests.fakes.openai import FakeOpenAI

ACCEPT = "application/json, text/event-stream"
HEADERS = {"Authorization": f"Bearer {RELAY_KEY}", "Accept": ACCEPT}
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "test", "version": "1"},
    },
}
# What ChatGPT counts ("all tools, including name, description and input schema,
# must be less than 5000 tokens"), and the whole tools/list answer, in bytes of
# compact JSON. JSON runs at about 3 to 4 bytes a token: 9,000 bytes is under 3,000
# tokens; the whole answer (annotations, output schemas, _meta) stays under 14,500.
COUNTED_BUDGET = 9_000
LIST_BUDGET = 14_500


async def rpc(
    relay: TestClient, body: Any, headers: dict[str, str] | None = None, raw: bytes | None = None
) -> tuple[int, Any, Any]:
    sent = {**HEADERS, "Content-Type": "application/json", **(headers or {})}
    data = raw if raw is not None else json.dumps(body).encode()
    response = await relay.post("/mcp", data=data, headers=sent)
    text = await response.text()
    assert "Mcp-Session-Id" not in response.headers  # stateless, always
    return response.status, (json.loads(text) if text else None), response.headers


def compact(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


# ------------------------------------------------------------------ the handshake


async def test_initialize_echoes_a_version_it_speaks_and_says_it_has_tools(
    relay: TestClient,
) -> None:
    status, body, _ = await rpc(relay, INITIALIZE)
    assert status == 200
    result = body["result"]
    assert result["protocolVersion"] == "2025-06-18"
    assert result["capabilities"] == {"tools": {"listChanged": False}}
    assert result["serverInfo"]["name"] == "relayd"
    assert len(result["instructions"]) <= 512  # ChatGPT reads the first 512 characters
    assert "getActionResponse" in result["instructions"]


async def test_the_instructions_name_only_tools_on_offer(relay_factory: RelayFactory) -> None:
    relay = await relay_factory(mcp={"tools": ("getRelayInfo",)})
    _, body, _ = await rpc(relay, INITIALIZE)
    assert "createActionResponse" not in body["result"]["instructions"]


async def test_initialize_with_an_unknown_version_answers_the_newest(relay: TestClient) -> None:
    asked = {**INITIALIZE, "params": {**INITIALIZE["params"], "protocolVersion": "2024-11-05"}}
    _, body, _ = await rpc(relay, asked)
    assert body["result"]["protocolVersion"] == "2025-11-25"


async def test_notifications_and_client_responses_are_taken_with_202(relay: TestClient) -> None:
    for message in (
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 3}},
        {"jsonrpc": "2.0", "id": 9, "result": {}},
    ):
        status, body, _ = await rpc(relay, message)
        assert (status, body) == (202, None), message


async def test_ping_answers_an_empty_result(relay: TestClient) -> None:
    status, body, _ = await rpc(relay, {"jsonrpc": "2.0", "id": "p1", "method": "ping"})
    assert (status, body) == (200, {"jsonrpc": "2.0", "id": "p1", "result": {}})


@pytest.mark.parametrize("method", ["server/discover", "resources/list", "prompts/list", "nope"])
async def test_unknown_methods_and_the_discover_probe_are_200_with_32601_and_the_id(
    relay: TestClient, method: str
) -> None:
    # ChatGPT probes server/discover first; HTTP 200 + -32601 makes it fall back to
    # initialize (an HTTP error has been seen to break the connector).
    status, body, _ = await rpc(
        relay, {"jsonrpc": "2.0", "id": "openai-mcp-discover", "method": method}
    )
    assert status == 200
    assert body["id"] == "openai-mcp-discover"
    assert body["error"]["code"] == -32601


async def test_a_client_session_id_is_ignored(relay: TestClient) -> None:
    status, body, _ = await rpc(
        relay,
        {"jsonrpc": "2.0", "id": 1, "method": "ping"},
        {"Mcp-Session-Id": "stale-after-restart"},
    )
    assert (status, body["result"]) == (200, {})


# ------------------------------------------------------------------ refusals


async def test_get_and_delete_are_405_naming_post(relay: TestClient) -> None:
    for method in ("GET", "DELETE"):
        response = await relay.request(method, "/mcp", headers=HEADERS)
        assert response.status == 405
        assert response.headers["Allow"] == "POST"
        assert (await response.json())["error"]["code"] == "method_not_allowed"


async def test_mcp_needs_a_relay_key(relay: TestClient) -> None:
    response = await relay.post("/mcp", json=INITIALIZE, headers={"Accept": ACCEPT})
    assert response.status == 401


@pytest.mark.parametrize(
    "origin",
    ["https://evil.example", "http://chatgpt.com", "https://chatgpt.com.evil.example", "null"],
)
async def test_a_foreign_origin_is_403(relay: TestClient, fake: FakeOpenAI, origin: str) -> None:
    status, body, _ = await rpc(relay, INITIALIZE, {"Origin": origin})
    assert status == 403
    assert body["error"]["code"] == -32600 and body["id"] is None


@pytest.mark.parametrize(
    "origin",
    [
        "https://chatgpt.com",
        "https://chat.openai.com",
        "https://relay.example.com",
        "https://ide.example",
    ],
)
async def test_chatgpt_the_public_origin_and_configured_origins_are_allowed(
    relay_factory: RelayFactory, origin: str
) -> None:
    relay = await relay_factory(
        server={"public_url": "https://relay.example.com"},
        mcp={"origins": ("https://ide.example",)},
    )
    status, _, _ = await rpc(relay, INITIALIZE, {"Origin": origin})
    assert status == 200


async def test_accept_without_json_is_406(relay: TestClient) -> None:
    status, body, _ = await rpc(relay, INITIALIZE, {"Accept": "text/event-stream"})
    assert status == 406 and body["error"]["code"] == -32600


async def test_a_body_that_is_not_json_is_415(relay: TestClient) -> None:
    response = await relay.post(
        "/mcp", data=b"x", headers={**HEADERS, "Content-Type": "text/plain"}
    )
    assert response.status == 415


@pytest.mark.parametrize("version", ["2025-03-26", "2026-07-28", "bogus"])
async def test_an_unsupported_protocol_version_header_is_400(
    relay: TestClient, version: str
) -> None:
    status, body, _ = await rpc(
        relay, {"jsonrpc": "2.0", "id": 1, "method": "ping"}, {"MCP-Protocol-Version": version}
    )
    assert status == 400
    assert body["error"]["data"] == {"supported": ["2025-11-25", "2025-06-18"]}


async def test_a_supported_protocol_version_header_passes(relay: TestClient) -> None:
    status, _, _ = await rpc(
        relay, {"jsonrpc": "2.0", "id": 1, "method": "ping"}, {"MCP-Protocol-Version": "2025-06-18"}
    )
    assert status == 200


async def test_a_batch_is_400_invalid_request(relay: TestClient) -> None:
    status, body, _ = await rpc(relay, [{"jsonrpc": "2.0", "id": 1, "method": "ping"}])
    assert status == 400 and body["error"]["code"] == -32600


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b'{"jsonrpc": "2.0", "id": 1, "method": "pi',
        b"\xff\xfe",
        b"[" * 200 + b"]" * 200,
    ],
)
async def test_malformed_json_is_400_parse_error(relay: TestClient, raw: bytes) -> None:
    status, body, _ = await rpc(relay, None, raw=raw)
    assert status == 400 and body["error"]["code"] == -32700 and body["id"] is None


@pytest.mark.parametrize(
    "message",
    [
        {"id": 1, "method": "ping"},
        {"jsonrpc": "1.0", "id": 1, "method": "ping"},
        {"jsonrpc": "2.0", "id": None, "method": "ping", "params": []},
        {"jsonrpc": "2.0", "id": True, "method": "ping"},
        {"jsonrpc": "2.0", "id": 1, "method": 5},
        {"jsonrpc": "2.0", "id": 1},
        "ping",
    ],
)
async def test_messages_that_are_not_json_rpc_are_400(relay: TestClient, message: Any) -> None:
    status, body, _ = await rpc(relay, message)
    assert status == 400 and body["error"]["code"] in (-32600, -32602)


async def test_a_body_past_the_cap_is_413(relay_factory: RelayFactory) -> None:
    relay = await relay_factory(mcp={"max_body_bytes": 1024})
    padded = {**INITIALIZE, "params": {**INITIALIZE["params"], "pad": "x" * 2048}}
    status, body, _ = await rpc(relay, padded)
    assert status == 413 and body["error"]["code"] == "request_too_large"


async def test_an_unknown_tool_is_invalid_params_and_bad_arguments_a_tool_error(
    relay: TestClient, fake: FakeOpenAI
) -> None:
    call = {"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"name": "getHealth"}}
    status, body, _ = await rpc(relay, call)
    assert status == 200 and body["error"]["code"] == -32602
    call["params"] = {"name": "createActionResponse", "arguments": {"model": "gpt-5"}}
    status, body, _ = await rpc(relay, call)
    assert status == 200
    assert body["result"]["isError"] is True
    assert "input" in body["result"]["content"][0]["text"]
    call["params"] = {
        "name": "getActionResponse",
        "arguments": {"response_id": "../../v1/organization"},
    }
    _, body, _ = await rpc(relay, call)
    assert body["result"]["isError"] is True
    assert fake.seen == []  # nothing reached upstream


# ------------------------------------------------------------------ the descriptors


@pytest.fixture(scope="module")
def tools() -> list[dict[str, Any]]:
    return [dict(tool) for tool in ToolSet.build(TABLE, Settings()).listing()]


def test_the_default_tools_are_the_actions_operations_in_table_order(
    tools: list[dict[str, Any]],
) -> None:
    order = [r.operation_id for r in TABLE if r.operation_id in DEFAULT_ACTIONS]
    assert [t["name"] for t in tools] == order


def test_every_tool_has_a_title_a_use_it_when_and_the_three_hints(
    tools: list[dict[str, Any]],
) -> None:
    for tool in tools:
        route = TABLE.by_operation_id(tool["name"])
        assert tool["title"] == route.summary
        assert tool["description"].startswith("Use this to ")
        assert "openaiFile" not in tool["description"]  # GPT Actions words
        assert not re.search(r"\.[A-Z]|  ", tool["description"]), tool["description"]
        hints = tool["annotations"]
        assert hints["readOnlyHint"] is (route.method == "GET"), tool["name"]
        assert isinstance(hints["destructiveHint"], bool) and isinstance(
            hints["openWorldHint"], bool
        )
        assert tool["securitySchemes"] == [{"type": "oauth2", "scopes": [route.group]}]
        assert len(tool["_meta"]["openai/toolInvocation/invoking"]) <= 64


def test_annotations_say_what_each_operation_really_does(tools: list[dict[str, Any]]) -> None:
    hints = {t["name"]: t["annotations"] for t in tools}
    assert hints["getRelayInfo"] == {
        "readOnlyHint": True,
        "destructiveHint": False,
        "idempotentHint": True,
        "openWorldHint": False,
    }
    assert hints["proxyRequest"]["destructiveHint"] and hints["proxyRequest"]["openWorldHint"]
    assert hints["editImageAction"]["openWorldHint"]  # it fetches the user's links
    assert not hints["createActionResponse"]["destructiveHint"]


def test_file_inputs_are_chatgpt_apps_file_params_of_the_exact_shape(
    tools: list[dict[str, Any]],
) -> None:
    with_files = {t["name"]: t for t in tools if "openai/fileParams" in t["_meta"]}
    assert set(with_files) == {
        "uploadFileAction",
        "editImageAction",
        "createImageVariationAction",
        "generateVideoAction",
    }
    for tool in with_files.values():
        (param,) = tool["_meta"]["openai/fileParams"]
        declared = tool["inputSchema"]["properties"][param]
        assert declared["type"] == "array"
        assert declared["items"] == {
            "type": "object",
            "properties": {
                "download_url": {"type": "string"},
                "file_id": {"type": "string"},
                "mime_type": {"type": "string"},
                "file_name": {"type": "string"},
            },
            "required": ["download_url", "file_id"],
            "additionalProperties": False,
        }
        assert declared["items"] == FILE_OBJECT


def test_schemas_come_from_the_route_schemas(tools: list[dict[str, Any]]) -> None:
    by_name = {t["name"]: t for t in tools}
    ask = by_name["createActionResponse"]
    assert ask["inputSchema"]["required"] == ["input"]
    assert set(ask["inputSchema"]["properties"]) >= {"input", "model", "previous_response_id"}
    assert "$ref" not in json.dumps(tools)  # self-contained: no components to resolve
    poll = by_name["getActionResponse"]
    assert poll["inputSchema"]["required"] == ["response_id"]
    assert "status" in poll["outputSchema"]["properties"]
    assert "files" in by_name["generateImageAction"]["outputSchema"]["properties"]
    assert "outputSchema" not in by_name["proxyRequest"]  # any JSON: no promise made


def test_the_tool_list_stays_well_under_chatgpts_budget(tools: list[dict[str, Any]]) -> None:
    counted = sum(
        compact({k: t[k] for k in ("name", "title", "description", "inputSchema")}) for t in tools
    )
    assert counted <= COUNTED_BUDGET, counted
    assert compact({"tools": tools}) <= LIST_BUDGET


def test_mcp_tools_may_name_their_own_operations() -> None:
    settings = updated(Settings(), mcp={"tools": ("cancelUploadAction", "getRelayInfo")})
    assert [t.name for t in ToolSet.build(TABLE, settings)] == [
        "getRelayInfo",
        "cancelUploadAction",
    ]


def test_the_mcp_face_reaches_operations_through_the_table_not_the_other_faces() -> None:
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "relayd"
    for path in [*(root / "mcp").glob("*.py"), root / "operations.py"]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            for name in names:
                assert not name.startswith(("relayd.actions", "relayd.handlers")), (path, name)
