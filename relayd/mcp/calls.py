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
from relayd.state import KEY
from relayd.tasks import spawn

__all__ = ["CallBook"]

log = logging.getLogger("relayd.mcp")


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
        """The ``CallToolResult`` of one call, within the budget."""
        loop = asyncio.get_running_loop()
        invocation = self._invocation(tool, arguments, loop.time())
        if tool.read_only:
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
        if entry is not None and (now - entry.started <= self.window_s or not entry.task.done()):
            return entry
        task = spawn(run_operation(request, invocation), name=f"mcp tool {tool.name}")
        task.add_done_callback(_log_failure)
        entry = _Entry(task, now)
        if self.window_s > 0:
            self._entries[fingerprint] = entry
        return entry

    def _forget(self, now: float) -> None:
        """Drop answered calls older than the window (their results with them)."""
        for fingerprint, entry in list(self._entries.items()):
            if entry.task.done() and now - entry.started > self.window_s:
                del self._entries[fingerprint]
