"""The error-shape middleware: every refusal leaves relayd as OpenAI-shaped JSON.

The error classes and their rendering live in errors.py; this module catches them
(and aiohttp's own HTTP exceptions) around the handler, before anything was sent.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from aiohttp import web

from relayd.errors import (
    CLIENT_CLOSED,
    AuthenticationError,
    BadRequestError,
    ClientRequestError,
    MethodNotAllowedError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    RelaydError,
    RequestHeaderTooLargeError,
    UnsupportedMediaTypeError,
    UpstreamError,
    error_response,
)
from relayd.routing import Handler
from relayd.state import ERROR_CODE, TABLE, UPSTREAM_FAILURE

__all__ = ["error_middleware"]

log = logging.getLogger("relayd.errors")


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
    if (
        table is None
        or request.path.startswith("/v1/")
        or not table.methods_for("/v1" + request.path)
    ):
        return ""
    return (
        f" This relay serves the OpenAI API under /v1 (/v1{request.path}): add /v1 to "
        'the SDK\'s base_url, e.g. base_url="http://127.0.0.1:8080/v1".'
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
