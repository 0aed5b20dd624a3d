"""Errors that carry the HTTP answer they imply, and the one middleware that renders them.

Hierarchy (whose fault is part of the type, as in h11's Local/RemoteProtocolError)::

    RelaydError                          status, type, code, param
    ├── ClientRequestError               4xx: the caller's mistake
    │   ├── BadRequestError              400
    │   ├── AuthenticationError          401
    │   ├── PermissionDeniedError        403
    │   ├── NotFoundError                404
    │   ├── MethodNotAllowedError        405
    │   ├── PayloadTooLargeError         413
    │   ├── UnsupportedMediaTypeError    415
    │   ├── RateLimitError               429 (upstream's, where its body cannot cross)
    │   ├── RelayRateLimitError          429 (relayd's own: a key's share is used up)
    │   └── RequestHeaderTooLargeError   431
    ├── OverloadedError                  503: relayd's own capacity is used up
    └── UpstreamError                    the upstream leg failed
        ├── UpstreamUnavailableError     502 (also a ConnectionError)
        └── UpstreamTimeoutError         504 (also a TimeoutError)

Every error leaves relayd in OpenAI's shape:
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, ClassVar

from aiohttp import web

from relayd.state import ERROR_CODE, TABLE, UPSTREAM_FAILURE

__all__ = [
    "AuthenticationError",
    "BadRequestError",
    "ClientRequestError",
    "MethodNotAllowedError",
    "NotFoundError",
    "OverloadedError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RateLimitError",
    "RelayRateLimitError",
    "RelaydError",
    "RequestHeaderTooLargeError",
    "UnsupportedMediaTypeError",
    "UpstreamError",
    "UpstreamTimeoutError",
    "UpstreamUnavailableError",
    "error_body",
    "error_middleware",
    "error_response",
]

log = logging.getLogger("relayd.errors")

CLIENT_CLOSED = 499

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class RelaydError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code if code is not None else self.default_code
        self.param = param
        self.headers = headers or {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status}, {self.code!r}, {self.message!r})"


class ClientRequestError(RelaydError):
    status = 400
    type = "invalid_request_error"


class BadRequestError(ClientRequestError):
    status = 400


class AuthenticationError(ClientRequestError):
    status = 401
    default_code = "invalid_api_key"


class PermissionDeniedError(ClientRequestError):
    status = 403
    type = "permission_error"
    default_code = "forbidden"


class NotFoundError(ClientRequestError):
    status = 404
    default_code = "unknown_url"


class MethodNotAllowedError(ClientRequestError):
    status = 405
    default_code = "method_not_allowed"


class PayloadTooLargeError(ClientRequestError):
    status = 413
    default_code = "request_too_large"


class UnsupportedMediaTypeError(ClientRequestError):
    status = 415
    default_code = "unsupported_media_type"


class RateLimitError(ClientRequestError):
    """Upstream's 429 where its body cannot cross (a refused WebSocket handshake)."""

    status = 429
    type = "requests"  # OpenAI's type for rate limits
    default_code = "rate_limit_exceeded"


class RelayRateLimitError(ClientRequestError):
    """A limit relayd itself keeps per relay key (its share of memory for buffered
    bodies, of upstream connections), apart from upstream's own 429s: the code says
    which one answered, so a client or an operator knows whom to ask."""

    status = 429
    type = "requests"
    default_code = "relay_rate_limit_exceeded"


class RequestHeaderTooLargeError(ClientRequestError):
    status = 431
    default_code = "request_header_too_large"


class OverloadedError(RelaydError):
    status = 503
    type = "server_error"
    default_code = "relay_overloaded"


class UpstreamError(RelaydError):
    status = 502
    type = "upstream_error"
    default_code = "upstream_error"
    # What failed (connection refused, TLS, timeout, ...), for the operator's log
    # line; the client gets only the message.
    cause: str | None = None


class UpstreamUnavailableError(UpstreamError, ConnectionError):
    status = 502
    default_code = "upstream_unreachable"


class UpstreamTimeoutError(UpstreamError, TimeoutError):
    status = 504
    default_code = "upstream_timeout"


def error_body(
    message: str, type_: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc: RelaydError) -> web.Response:
    body = error_body(exc.message, exc.type, exc.code, exc.param)
    return web.Response(
        status=exc.status,
        body=json.dumps(body).encode(),
        content_type="application/json",
        headers=exc.headers,
    )


# aiohttp's own HTTP exceptions (router 404/405, body too large, bad request line)
# mapped onto relayd's error types so every refusal has one shape.
_HTTP_EXCEPTIONS: dict[int, type[RelaydError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    405: MethodNotAllowedError,
    413: PayloadTooLargeError,
    415: UnsupportedMediaTypeError,
    429: RateLimitError,
    431: RequestHeaderTooLargeError,
}


def _from_http_exception(exc: web.HTTPException, request: web.Request) -> RelaydError:
    kind = _HTTP_EXCEPTIONS.get(exc.status, ClientRequestError if exc.status < 500 else RelaydError)
    if exc.status == 404:
        message = f"Unknown request URL: {request.method} {request.path}." + _under_v1(request)
    elif exc.status == 405:
        allowed = exc.headers.get("Allow", "")
        message = f"Method {request.method} is not allowed on {request.path}; allowed: {allowed}."
    elif exc.status == 413:
        message = "Request body is too large for this relay."
    else:
        message = exc.reason or HTTPStatus(exc.status).phrase
    headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
    return kind(message, headers=headers)


def _under_v1(request: web.Request) -> str:
    """The hint for an SDK whose ``base_url`` lacks ``/v1`` (``OpenAI(base_url=
    "http://host:8080")`` asks for ``POST /responses``): said only when the route
    table serves that path under ``/v1``."""
    table = request.app.get(TABLE)
    if table is None or request.path.startswith("/v1/") or not table.methods_for(
        "/v1" + request.path
    ):
        return ""
    return (
        f" This relay serves the OpenAI API under /v1 (/v1{request.path}): add /v1 to "
        "the SDK's base_url, e.g. base_url=\"http://127.0.0.1:8080/v1\"."
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every refusal as OpenAI-shaped JSON, before anything was sent.

    Errors raised after a response was prepared cannot change its status; the
    streaming code aborts the connection instead (streams/pump.py), so this
    middleware only ever sees errors from before ``prepare()``.
    """
    try:
        return await handler(request)
    except RelaydError as exc:
        if exc.code is not None:
            request[ERROR_CODE] = exc.code
        if isinstance(exc, UpstreamError):
            request[UPSTREAM_FAILURE] = exc.cause or exc.message
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # redirects and the like are not errors
        return error_response(_from_http_exception(exc, request))
    except ConnectionResetError:
        # The client left; there is nobody to answer. 499 is nginx's "client closed
        # request" and only shows in relayd's own access log.
        return web.Response(status=CLIENT_CLOSED)
    except Exception:
        if request.writer is not None and request.writer.output_size > 0:
            raise  # headers already went out; aiohttp closes the connection
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(RelaydError("The relay failed to handle the request."))
