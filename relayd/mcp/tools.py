"""MCP tools derived from the route table: each one an Actions operation seen a third way.

The tools are the operations ``[mcp] tools`` names, or the ``[actions] operations``
choice (docs/chatgpt.md#chatgpt-apps). Each descriptor comes from its route:

- ``name`` is the operationId, ``title`` the summary; the description says when to
  use it (the route's own description, less what only GPT Actions see);
- ``inputSchema`` is the route's path parameters and its request schema,
  ``outputSchema`` its response schema, both converted by the one converter the
  OpenAPI documents use (relayd/openapi.py); ``openaiFileIdRefs`` becomes ChatGPT
  apps' file parameter (``_meta["openai/fileParams"]`` with the exact object shape
  ChatGPT's Scan Tools checks), and the Actions file answer becomes ``files``;
- annotations are honest: read-only for GET, destructive where the route can delete
  (a DELETE, or the proxy that reaches any allowlisted method), open-world where it
  fetches links from outside or reaches endpoints not its own. ChatGPT asks the user
  before every call that is not read-only.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from relayd.config import ConfigError, Settings
from relayd.openapi import actions_routes, json_schemas
from relayd.operations import path_parameters
from relayd.routing import Exposure, Route, RouteTable

__all__ = ["FILE_PARAM", "FILE_OBJECT", "Tool", "ToolSet"]

# Where GPT Actions receive files; the MCP tools take ChatGPT apps' file objects there.
FILE_PARAM: Final = "openaiFileIdRefs"
# ChatGPT apps' file object: all four properties declared, exactly these two required.
FILE_OBJECT: Final[Mapping[str, Any]] = {
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
# A file relayd hands back, as a tool's structured answer names it.
_FILE_OUT: Final[Mapping[str, Any]] = {
    "type": "array",
    "description": "Files: signed links to relayd that expire within minutes.",
    "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "mime_type": {"type": "string"},
            "url": {"type": "string"},
        },
    },
}
# Fields through which a wrapper fetches a link the caller gives (actions/fetch.py).
_LINK_FIELDS: Final = frozenset({FILE_PARAM, "image_url", "mask_url"})
# A sentence that speaks of GPT Actions' file fields (the tools take files otherwise).
_GPT_ONLY: Final = re.compile(r"\s*[^.]*openaiFile\w*[^.]*\.")
_STATUS_CHARS: Final = 64  # openai/toolInvocation texts


@dataclass(frozen=True, slots=True)
class Tool:
    route: Route
    descriptor: Mapping[str, Any]
    file_params: tuple[str, ...] = ()
    path_params: tuple[str, ...] = field(default=())

    @property
    def name(self) -> str:
        return self.route.operation_id

    @property
    def read_only(self) -> bool:
        return self.route.method == "GET"

    def reads(self, arguments: Mapping[str, Any]) -> bool:
        """Whether this call only reads: a GET route, or the proxy envelope asking for
        a GET. Reads are never joined to an earlier call (polling must see news)."""
        if self.read_only:
            return True
        method = arguments.get("method")
        return self.route.group == "proxy" and isinstance(method, str) and method.upper() == "GET"

    def arguments(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """The call's arguments as the route's schema reads them: ChatGPT apps' file
        objects become the ``openaiFileIdRefs`` items the Actions wrappers take, and a
        top-level null (a model's way of leaving a field out) is left out."""
        arguments = {name: value for name, value in given.items() if value is not None}
        for name in self.file_params:
            files = arguments.get(name)
            if isinstance(files, list):
                arguments[name] = [_as_file_ref(item) for item in files]
        return arguments


def _as_file_ref(item: Any) -> Any:
    if not isinstance(item, dict) or "download_url" not in item:
        return item  # the schema says what is wrong with it
    ref = {"download_link": item["download_url"], "id": item.get("file_id")}
    if item.get("mime_type") is not None:
        ref["mime_type"] = item["mime_type"]
    if item.get("file_name") is not None:
        ref["name"] = item["file_name"]
    return ref


def _description(route: Route) -> str:
    summary = route.summary[0].lower() + route.summary[1:]
    text = f"Use this to {summary}."
    if route.description:
        rest = _GPT_ONLY.sub("", route.description).strip()
        if rest:
            text += " " + rest
    return text


def _input_schema(
    route: Route, body: Mapping[str, Any] | None
) -> tuple[dict[str, Any], tuple[str, ...]]:
    schema: dict[str, Any] = copy.deepcopy(dict(body)) if body else {"type": "object"}
    schema.setdefault("type", "object")
    schema.pop("additionalProperties", None)  # true is JSON Schema's default: say nothing
    properties = schema.setdefault("properties", {})
    required: list[str] = list(schema.get("required", []))
    for name in reversed(path_parameters(route)):
        properties = {
            name: {"type": "string", "description": f"The {name.replace('_', ' ')}."},
            **properties,
        }
        required.insert(0, name)
    schema["properties"] = properties
    if required:
        schema["required"] = required
    files: tuple[str, ...] = ()
    if FILE_PARAM in properties:
        declared = properties[FILE_PARAM]
        properties[FILE_PARAM] = {
            "type": "array",
            "description": "Files the user attached in the chat.",
            "items": dict(FILE_OBJECT),
            **({"maxItems": declared["maxItems"]} if "maxItems" in declared else {}),
        }
        files = (FILE_PARAM,)
    return schema, files


def _output_schema(answer: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not answer:
        return None
    schema: dict[str, Any] = _undescribed(copy.deepcopy(dict(answer)))
    schema["additionalProperties"] = True  # upstream's own fields come along
    schema.pop("required", None)
    properties = schema.setdefault("properties", {})
    if properties.pop("openaiFileResponse", None) is not None:
        properties["files"] = dict(_FILE_OUT)
    properties.pop("output_text", None)  # the answer's text is the result's text
    return schema


def _undescribed(node: Any) -> Any:
    """A schema without its descriptions: the answer's fields explain themselves, and
    every byte of the tool list counts against ChatGPT's budget."""
    if isinstance(node, dict):
        return {k: _undescribed(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_undescribed(v) for v in node]
    return node


def _annotations(route: Route) -> dict[str, Any]:
    body = route.request_schema
    declared = set(body().fields) if body is not None else set()
    reaches_out = route.group == "proxy" or bool(declared & _LINK_FIELDS)
    read_only = route.method == "GET"
    return {
        "readOnlyHint": read_only,
        "destructiveHint": route.method == "DELETE" or route.group == "proxy",
        "idempotentHint": read_only,
        "openWorldHint": reaches_out,
    }


def _short(text: str) -> str:
    return text if len(text) <= _STATUS_CHARS else text[: _STATUS_CHARS - 1] + "…"


def _descriptor(route: Route, schemas: Any) -> Tool:
    title = route.summary
    input_schema, files = _input_schema(route, schemas.request)
    security = [{"type": "oauth2", "scopes": [route.group]}]
    meta: dict[str, Any] = {
        "openai/toolInvocation/invoking": _short(f"{title}…"),
        "openai/toolInvocation/invoked": "Done",
    }
    if files:
        meta["openai/fileParams"] = list(files)
    descriptor: dict[str, Any] = {
        "name": route.operation_id,
        "title": title,
        "description": _description(route),
        "inputSchema": input_schema,
        "annotations": _annotations(route),
        "securitySchemes": security,
        "_meta": meta,
    }
    output = _output_schema(schemas.response)
    if output is not None:
        descriptor["outputSchema"] = output
    return Tool(route, descriptor, files, tuple(path_parameters(route)))


class ToolSet:
    """The tools of this relay, in route-table order, built once at start."""

    def __init__(self, tools: list[Tool]) -> None:
        self._tools = {tool.name: tool for tool in tools}

    @classmethod
    def build(cls, table: RouteTable, settings: Settings) -> ToolSet:
        """The configured tools; a name that is not an Actions operation is a
        configuration error (at start, not at the first call)."""
        chosen = settings.mcp.tools
        if chosen is None:
            routes = actions_routes(table, settings)
        else:
            candidates = {r.operation_id: r for r in table if r.exposure is Exposure.ACTIONS}
            for name in chosen:
                if name not in candidates:
                    raise ConfigError(
                        f"[mcp] tools: {name!r} is not an Actions operation; candidates: "
                        f"{', '.join(sorted(candidates))}"
                    )
            routes = [r for r in table if r.operation_id in set(chosen)]
        schemas = json_schemas(routes)
        return cls([_descriptor(route, schemas[route.operation_id]) for route in routes])

    def __iter__(self) -> Iterator[Tool]:
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def listing(self) -> list[Mapping[str, Any]]:
        return [tool.descriptor for tool in self._tools.values()]
