"""Run one operation of the route table in-process, for a face that is not HTTP.

The MCP face (``relayd/mcp/``) offers the Actions operations as tools. A tool call
must run exactly what the REST route runs (the same validation, upstream call and
handouts), so it runs the route's own handler rather than a second implementation,
on a sub-request made from the caller's request:

- the route's path, with the path parameters filled in (each percent-encoded, then
  checked like any client path), resolved by the application's own router, so the
  handler's ``match_info`` is what a REST call would give it;
- no body: the arguments, already parsed, travel in ``ARGUMENTS`` and
  ``relayd/actions/payload.py load()`` validates them with the route's schema;
- the caller's relay key, whose scopes apply to the route exactly as over HTTP;
- an answer written into memory (:class:`CapturedAnswer`, capped), never onto the
  caller's connection.

Everything the handler books for the access line (upstream wait, status and request
id, token usage) is copied back onto the caller's request when it ends.

aiohttp has no public way to give a request another body, writer or match info;
three private attributes are set here, and only here (aiohttp is pinned < 3.15).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import quote

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.streams import EMPTY_PAYLOAD
from multidict import CIMultiDict

from relayd.errors import BadRequestError, PermissionDeniedError, RelaydError, error_body
from relayd.memory import release_buffers
from relayd.paths import upstream_path
from relayd.routing import Route
from relayd.state import (
    ARGUMENTS,
    CLIENT_ADDRESS,
    DEADLINE,
    FILE_HOSTS,
    FILES_AS_LINKS,
    KEY,
    OPERATION,
    REQUEST_ID,
    ROUTE,
    UPSTREAM_REQUEST_ID,
    UPSTREAM_STATUS,
    UPSTREAM_WAIT,
    USAGE_TAP,
)

__all__ = ["CapturedAnswer", "Invocation", "Outcome", "path_parameters", "run_operation"]

# What one operation may answer in memory; the Actions answers are cut well below it.
MAX_ANSWER_BYTES: Final = 16 * 1024 * 1024
_KEPT: Final = (KEY, REQUEST_ID, CLIENT_ADDRESS)


def path_parameters(route: Route) -> list[str]:
    """The names of a route's path parameters, in order."""
    names = []
    for segment in route.path.split("/"):
        if segment.startswith("{") and segment.endswith("}"):
            names.append(segment[1:-1].split(":", 1)[0])
    return names


@dataclass(frozen=True, slots=True)
class Invocation:
    """One call: the operation, its arguments (path parameters included, by name),
    when it should answer by (loop time), and what the calling face asks of files."""

    route: Route
    arguments: dict[str, Any]
    deadline: float | None = None
    file_hosts: tuple[str, ...] = ()
    image_bytes_inline: int | None = None  # set: files come back as links


@dataclass(slots=True)
class Outcome:
    """What the operation answered: status, media type and body."""

    status: int
    content_type: str
    body: bytes
    headers: CIMultiDict[str] = field(default_factory=CIMultiDict)

    @property
    def ok(self) -> bool:
        return self.status < 400


class CapturedAnswer(AbstractStreamWriter):
    """A response writer that keeps the answer in memory, up to a cap.

    A handler's ``prepare()``/``write()``/``write_eof()`` land here; past
    ``limit`` bytes the write fails, as a client that stopped reading would make it.
    """

    def __init__(self, limit: int = MAX_ANSWER_BYTES) -> None:
        self.limit = limit
        self.status_line = ""
        self.headers = CIMultiDict[str]()
        self.chunks: list[bytes] = []
        self.ended = False

    async def write(self, chunk: bytes | bytearray | memoryview) -> None:
        self.output_size += len(chunk)
        if self.output_size > self.limit:
            raise ConnectionResetError("the answer is larger than an in-process call keeps")
        self.chunks.append(bytes(chunk))

    async def write_eof(self, chunk: bytes = b"") -> None:
        if chunk:
            await self.write(chunk)
        self.ended = True

    async def drain(self) -> None:
        return None

    def enable_compression(self, encoding: str = "deflate", strategy: int | None = None) -> None:
        return None  # never asked: the sub-request accepts no encoding

    def enable_chunking(self) -> None:
        return None  # framing is for sockets

    async def write_headers(self, status_line: str, headers: CIMultiDict[str]) -> None:
        self.status_line = status_line
        self.headers = CIMultiDict(headers)

    def body(self) -> bytes:
        return b"".join(self.chunks)


def _target(route: Route, arguments: dict[str, Any]) -> str:
    path = route.path
    for name in path_parameters(route):
        value = arguments.get(name)
        if value is None:
            raise BadRequestError(
                f"Missing required parameter: '{name}'.",
                code="missing_required_parameter",
                param=name,
            )
        if not isinstance(value, str) or not value:
            raise BadRequestError(
                f"Invalid '{name}': must be a non-empty string.", code="invalid_value", param=name
            )
        path = path.replace("{" + name + "}", quote(value, safe=""), 1)
    upstream_path(path)  # refused (400) if an id hides a path trick
    return path


async def _sub_request(
    request: web.Request, call: Invocation
) -> tuple[web.Request, CapturedAnswer]:
    route = call.route
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if host := request.headers.get("Host"):
        headers["Host"] = host
    sub = request.clone(
        method=route.method, rel_url=_target(route, call.arguments), headers=headers
    )
    for key in list(sub):
        if key not in _KEPT:
            del sub[key]
    writer = CapturedAnswer()
    # The three private attributes of the module docstring: no body, the answer
    # into memory, the route's own match info.
    sub._payload = EMPTY_PAYLOAD
    sub._payload_writer = writer
    match = await request.app.router.resolve(sub)
    match.add_app(request.app)
    match.freeze()
    sub._match_info = match
    sub[ROUTE] = route
    names = set(path_parameters(route))
    sub[ARGUMENTS] = {k: v for k, v in call.arguments.items() if k not in names}
    if call.deadline is not None:
        sub[DEADLINE] = call.deadline
    if call.file_hosts:
        sub[FILE_HOSTS] = call.file_hosts
    if call.image_bytes_inline is not None:
        sub[FILES_AS_LINKS] = call.image_bytes_inline
    return sub, writer


def _refusal(exc: RelaydError) -> Outcome:
    body = json.dumps(error_body(exc.message, exc.type, exc.code, exc.param)).encode()
    return Outcome(exc.status, "application/json", body)


async def run_operation(request: web.Request, call: Invocation) -> Outcome:
    """Run ``call`` as its route would over HTTP, on behalf of ``request``'s client.

    The relay key's scopes apply as they do to the route; the route's own errors
    come back as their status and OpenAI-shaped body, never raised. Cancelling the
    caller cancels the operation (and so its upstream request), as a hang-up does.
    """
    route = call.route
    request[OPERATION] = route.operation_id
    key = request.get(KEY)
    if key is not None and not key.allows(route.group):
        return _refusal(
            PermissionDeniedError(
                f"The relay key '{key.name}' may not use the '{route.group}' routes.",
                code="key_scope",
            )
        )
    try:
        sub, writer = await _sub_request(request, call)
    except RelaydError as exc:
        return _refusal(exc)
    try:
        try:
            response = await route.handler(sub)
        except RelaydError as exc:
            return _refusal(exc)
        except web.HTTPException as exc:  # a redirect or aiohttp's own refusal
            return Outcome(exc.status, exc.content_type, exc.body or b"")  # type: ignore[arg-type]
        if not response.prepared:
            await response.prepare(sub)
            await response.write_eof()
        return Outcome(
            response.status,
            response.content_type,
            writer.body(),
            CIMultiDict(response.headers),
        )
    finally:
        _book(request, sub)
        release_buffers(sub)


def _book(request: web.Request, sub: web.Request) -> None:
    """Copy what the operation booked for the access line onto the caller's request."""
    waited = sub.get(UPSTREAM_WAIT)
    if waited:
        request[UPSTREAM_WAIT] = request.get(UPSTREAM_WAIT, 0.0) + waited
    if UPSTREAM_REQUEST_ID in sub:
        request[UPSTREAM_REQUEST_ID] = sub[UPSTREAM_REQUEST_ID]
    if UPSTREAM_STATUS in sub:
        request[UPSTREAM_STATUS] = sub[UPSTREAM_STATUS]
    if USAGE_TAP in sub:
        request[USAGE_TAP] = sub[USAGE_TAP]
