"""Request limits checked before any handler runs and before any body is read.

- total size of the request head (aiohttp bounds each header line, not their sum);
- ``Content-Type`` against what the route accepts (415);
- a multipart body whose ``Content-Type`` names no boundary (400);
- a declared ``Content-Length`` against the body cap (413); bodies without a length
  are counted as they stream (streams.pump_request_body) and cut at the same cap;
- ``Expect: 100-continue`` (RFC 9110 §10.1.1) is answered here, once auth and
  every limit above have passed: a client that waits for the ``100`` never sends
  a body relayd would refuse (aiohttp's own answer, before any middleware, is
  turned off in ``RouteTable.register``);
- whatever the handler held whole under the memory budget (relayd.memory) is
  released when it returns.
"""

from __future__ import annotations

from email.message import Message

from aiohttp import HttpVersion11, hdrs, web

from relayd.errors import (
    BadRequestError,
    ExpectationFailedError,
    PayloadTooLargeError,
    RequestHeaderTooLargeError,
    UnsupportedMediaTypeError,
)
from relayd.memory import release_buffers
from relayd.routing import Handler
from relayd.state import ROUTE, SETTINGS

__all__ = ["limits_middleware"]

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


@web.middleware
async def limits_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await _limited(request, handler)
    finally:
        release_buffers(request)  # what the handler held whole (relayd.memory)


async def _limited(request: web.Request, handler: Handler) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    head = sum(len(name) + len(value) + 4 for name, value in request.raw_headers)
    if head > settings.limits.max_header_bytes:
        raise RequestHeaderTooLargeError(
            f"Request headers total {head} bytes; the limit is {settings.limits.max_header_bytes}."
        )
    route = request.get(ROUTE)
    if route is None or not request.body_exists:
        return await handler(request)
    length = request.content_length
    if length is not None and length > settings.limits.max_body_bytes:
        raise PayloadTooLargeError(
            f"Request body of {length} bytes exceeds the relay's limit of "
            f"{settings.limits.max_body_bytes} bytes."
        )
    accepted = route.body.media_types
    if accepted and request.content_type not in accepted:
        raise UnsupportedMediaTypeError(
            f"{route.method} {route.path} expects {' or '.join(accepted)}, "
            f"not {request.content_type or 'a body without Content-Type'}.",
        )
    if request.content_type.startswith("multipart/") and not _boundary(request):
        # Nobody can split such a body into parts, upstream included (RFC 2046 §5.1.1).
        raise BadRequestError(
            "A multipart body needs a boundary parameter in its Content-Type.",
            code="invalid_multipart",
        )
    # Body.NONE and Body.ANY accept whatever comes (SDKs send "{}" on cancels).
    await _invite_body(request)
    return await handler(request)


async def _invite_body(request: web.Request) -> None:
    """Send ``100 Continue`` if the client waits for it (HTTP/1.1 only: a 1.0
    client's Expect is ignored, RFC 9110 §10.1.1)."""
    expect = request.headers.get(hdrs.EXPECT)
    if expect is None or request.version != HttpVersion11:
        return
    if expect.strip().lower() != "100-continue":
        raise ExpectationFailedError(f"Unsupported expectation: {expect!r}.")
    await request.writer.write(_CONTINUE)
    # What the answer writes is counted from here: the 100 is not the response.
    request.writer.output_size = 0


def _boundary(request: web.Request) -> str | None:
    message = Message()
    message["Content-Type"] = request.headers.get("Content-Type", "")
    boundary = message.get_param("boundary")
    return boundary if isinstance(boundary, str) and boundary else None
