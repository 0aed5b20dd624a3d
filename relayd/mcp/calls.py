"""Tool calls against the clock: the answer budget, and repeats that join the first call.

ChatGPT abandons a tool call after about 60 s, without closing the connection
behind some proxies, and may call again (docs/chatgpt.md#chatgpt-apps). So:

- every call answers within ``[mcp] answer_budget``. A read-only tool runs in the
  request itself (a hang-up or the budget cancels it, and its upstream request);
  an operation that creates something runs as a task of its own, so neither a
  hang-up nor the budget throws away paid work: past the budget the answer is a
  handle and the call that collects the result;
- an identical call (same relay key, tool and arguments) within ``[mcp]
  repeat_window`` joins the first one: its result, or the same handle while it
  runs. The fake upstream sees one job, not two.

The book lives in the process. With several workers a repeat that lands on another
worker starts its own job; sharing it is relayd/store/'s to offer.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from relayd.config import Mcp
from relayd.mcp.results import error_result, running_result, tool_result
from relayd.mcp.tools import Tool
from relayd.operations import Invocation, Outcome, run_operation
from relayd.state import KEY, METRICS
from relayd.tasks import spawn

__all__ = ["CallBook"]

log = logging.getLogger("relayd.mcp")

# Answered calls kept for repeats, at most (a few MiB each at worst: images inline).
MAX_ANSWERED = 256


@dataclass(slots=True)
class _Entry:
    task: asyncio.Task[Outcome]
    started: float  # time.monotonic()
    handle: str = field(default_factory=lambda: "call_" + secrets.token_hex(8))


def _fingerprint(request: web.Request, tool: Tool, arguments: Mapping[str, Any]) -> str:
    key = request.get(KEY)
    canonical = json.dumps(arguments, sort_keys=True, separators=(",", ":"), default=str)
    text = f"{key.name if key else ''}\x00{tool.name}\x00{canonical}"
    return hashlib.sha256(text.encode()).hexdigest()


def _succeeded(task: asyncio.Task[Outcome]) -> bool:
    """A failed call is not repeated to the caller: an upstream 429 or 5xx, or a
    refusal, is worth trying again (a refusal costs nothing upstream)."""
    return not task.cancelled() and task.exception() is None and task.result().ok


def _log_failure(task: asyncio.Task[Outcome]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("MCP tool task %s failed", task.get_name(), exc_info=exc)


class CallBook:
    """Calls that create something, in flight or answered within the repeat window."""

    def __init__(self, settings: Mcp) -> None:
        self.budget_s = settings.answer_budget_s
        self.window_s = settings.repeat_window_s
        self.image_cap = settings.max_image_bytes
        self.file_hosts = settings.fetch_hosts
        self._entries: dict[str, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def _invocation(self, tool: Tool, arguments: dict[str, Any], started: float) -> Invocation:
        # The operation's own wait (a model answer) ends a little before the budget,
        # so it can still answer with its own handle (getActionResponse's id).
        margin = min(2.0, self.budget_s / 5)
        return Invocation(
            tool.route,
            arguments,
            deadline=started + self.budget_s - margin,
            file_hosts=self.file_hosts,
            image_bytes_inline=self.image_cap,
        )

    async def call(
        self, request: web.Request, tool: Tool, arguments: dict[str, Any]
    ) -> dict[str, Any]:
        """The ``CallToolResult`` of one call, within the budget (counted in metrics)."""
        result = await self._call(request, tool, arguments)
        if result.get("isError"):
            outcome = "error"
        elif result.get("structuredContent", {}).get("status") in ("in_progress", "queued"):
            outcome = "in_progress"
        else:
            outcome = "ok"
        request.app[METRICS].tool_calls.labels(tool.name, outcome).inc()
        return result

    async def _call(
        self, request: web.Request, tool: Tool, arguments: dict[str, Any]
    ) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        invocation = self._invocation(tool, arguments, loop.time())
        if tool.reads(arguments):
            try:
                async with asyncio.timeout(self.budget_s):
                    outcome = await run_operation(request, invocation)
            except TimeoutError:
                return error_result(
                    f"{tool.name} did not answer within {self.budget_s:g} s; try again."
                )
            return tool_result(tool, outcome)
        entry = self._joined(request, tool, arguments, invocation)
        done, _ = await asyncio.wait({entry.task}, timeout=self.budget_s)
        if not done:
            return running_result(tool, entry.handle, self.budget_s, self.window_s)
        if entry.task.cancelled() or entry.task.exception() is not None:
            return error_result(f"{tool.name} failed inside the relay; see its log.")
        return tool_result(tool, entry.task.result())

    def _joined(
        self, request: web.Request, tool: Tool, arguments: dict[str, Any], invocation: Invocation
    ) -> _Entry:
        """The entry of an identical earlier call still in the window, or a new one."""
        now = time.monotonic()
        self._forget(now)
        fingerprint = _fingerprint(request, tool, arguments)
        entry = self._entries.get(fingerprint)
        if entry is not None and (not entry.task.done() or _succeeded(entry.task)):
            return entry  # in flight, or answered well within the window: join it
        task = spawn(run_operation(request, invocation), name=f"mcp tool {tool.name}")
        task.add_done_callback(_log_failure)
        entry = _Entry(task, now)
        if self.window_s > 0:
            self._entries[fingerprint] = entry
        return entry

    def close(self) -> None:
        """Cancel the calls still running (the server is stopping; its requests drained)."""
        for entry in self._entries.values():
            entry.task.cancel()
        self._entries.clear()

    def _forget(self, now: float) -> None:
        """Drop answered calls older than the window (their results with them), and
        past :data:`MAX_ANSWERED` answered calls the oldest: the book holds answers in
        memory, so it stays bounded however busy the relay is."""
        answered = []
        for fingerprint, entry in list(self._entries.items()):
            if not entry.task.done():
                continue
            if now - entry.started > self.window_s:
                del self._entries[fingerprint]
            else:
                answered.append((entry.started, fingerprint))
        for _, fingerprint in sorted(answered)[: max(0, len(answered) - MAX_ANSWERED)]:
            del self._entries[fingerprint]
