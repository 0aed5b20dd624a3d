"""What a tool call answers: structured content, one short text, images and links.

The operation's JSON answer becomes ``structuredContent`` (what the model reads and
chains), beside one short text that does not repeat it: the model's answer for
``createActionResponse``, what to call next for work still running, else a line
naming the result. Files come back as ``resource_link`` blocks to relayd's signed
downloads (and listed under ``files``), images also as ``image`` content when small
enough (``[mcp] max_image_bytes``). An operation's refusal or upstream error is a
tool result with ``isError``, its message as the text: the model can read it and
correct the call (MCP: input errors are tool errors, not protocol errors).
"""

from __future__ import annotations

import json
from typing import Any, Final

from relayd.mcp.tools import Tool
from relayd.operations import Outcome

__all__ = ["error_result", "running_result", "tool_result"]

_FACTS: Final = ("id", "object", "status")
_MAX_FACT_CHARS: Final = 80


def _text(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def error_result(text: str) -> dict[str, Any]:
    return {"content": [_text(text)], "isError": True}


def running_result(tool: Tool, handle: str, budget_s: float, window_s: float) -> dict[str, Any]:
    """Work still going after the budget: a handle, and the call that collects it
    (the same tool with the same arguments: the repeat joins this call's job)."""
    return {
        "content": [
            _text(
                f"{tool.name} is still running after {budget_s:g} s and goes on. Call "
                f"{tool.name} again with the same arguments within {window_s:g} s to get "
                "its result; that starts no second job."
            )
        ],
        "structuredContent": {"status": "in_progress", "handle": handle},
        "isError": False,
    }


def _error_text(tool: Tool, outcome: Outcome) -> str:
    message = f"HTTP {outcome.status}"
    try:
        error = json.loads(outcome.body)["error"]
        message = str(error.get("message") or message)
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    return f"{tool.name} failed ({outcome.status}): {message}"


def _files(entries: list[Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The handed-out files as content blocks, and as the structured ``files`` list."""
    blocks: list[dict[str, Any]] = []
    listed: list[dict[str, Any]] = []
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        name, kind = str(entry.get("name") or "file"), str(entry.get("mime_type") or "")
        if isinstance(entry.get("content"), str) and kind.startswith("image/"):
            blocks.append({"type": "image", "data": entry["content"], "mimeType": kind})
        if isinstance(entry.get("url"), str):
            link = {"type": "resource_link", "uri": entry["url"], "name": name}
            if kind:
                link["mimeType"] = kind
            blocks.append(link)
            listed.append({"name": name, "mime_type": kind, "url": entry["url"]})
        else:
            listed.append({"name": name, "mime_type": kind})
    return blocks, listed


def _summary(tool: Tool, document: dict[str, Any], files: list[dict[str, Any]]) -> str:
    note = document.get("relay_note")
    if document.get("status") == "in_progress" or document.get("status") == "queued":
        if isinstance(note, str):
            return f"{note} (id {document.get('id')!s})"
    facts = [
        f"{name} {value}"
        for name in _FACTS
        if isinstance(value := document.get(name), str | int) and len(str(value)) < _MAX_FACT_CHARS
    ]
    text = f"{tool.route.summary}: done" + (f" ({', '.join(facts)})" if facts else "") + "."
    if files:
        text += f" {len(files)} file(s): " + ", ".join(f["name"] for f in files) + "."
    if isinstance(note, str):
        text += " " + note
    return text


def tool_result(tool: Tool, outcome: Outcome) -> dict[str, Any]:
    """The ``CallToolResult`` for what the operation answered."""
    if not outcome.ok:
        return error_result(_error_text(tool, outcome))
    try:
        document = json.loads(outcome.body) if outcome.body else None
    except ValueError:
        document = None
    if not isinstance(document, dict):
        kind = outcome.content_type or "no media type"
        shown = json.dumps(document) if document is not None else f"{len(outcome.body)} bytes"
        return {
            "content": [_text(f"{tool.route.summary}: {kind}, {shown[:2000]}")],
            "isError": False,
        }
    blocks: list[dict[str, Any]] = []
    files: list[dict[str, Any]] = []
    handed = document.pop("openaiFileResponse", None)
    if isinstance(handed, list):
        blocks, files = _files(handed)
        document["files"] = files
    answer = document.pop("output_text", None)
    if isinstance(answer, str) and document.get("status") not in ("in_progress", "queued"):
        text = answer or "(The model answered with no text.)"
    else:
        text = _summary(tool, document, files)
    return {"content": [_text(text), *blocks], "structuredContent": document, "isError": False}
