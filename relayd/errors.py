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
    │   ├── ExpectationFailedError       417
    │   ├── UpgradeRequiredError         426 (a WebSocket route asked without upgrade)
    │   ├── RateLimitError               429 (upstream's, where its body cannot cross)
    │   ├── RelayRateLimitError          429 (relayd's own: a key's share is used up)
    │   ├── SpendLimitError              429 (a key's rpm, tpm or parallel limit)
    │   ├── QuotaExceededError           429 (a key's dollar budget is spent)
    │   └── RequestHeaderTooLargeError   431
    ├── PublicUrlNotSetError             500: a link is needed, RELAYD_PUBLIC_URL is unset
    ├── OverloadedError                  503: relayd's own capacity is used up
    ├── SpendUnavailableError            503: the spend ledger cannot be reached
    ├── (store.redis) StoreUnavailableError  503: the shared store did not answer
    └── UpstreamError                    the upstream leg failed
        ├── UpstreamUnavailableError     502 (also a ConnectionError)
        └── UpstreamTimeoutError         504 (also a TimeoutError)

    ForbiddenAddressError (an OSError)   a user file link led to a non-public address;
                                         never rendered itself (the fetcher's 400 is)

Errors that never reach a client as an answer live beside the code that raises them:
``ConfigError`` (relayd.config, a floor that imports nothing of relayd) and
``StartupError`` (relayd.preflight) end the process with one line and exit 2;
``BrokenStreamError`` (relayd.streams) becomes an aborted connection.

Every error leaves relayd in OpenAI's shape:
``{"error": {"message", "type", "param", "code"}}`` (the middleware that renders them
is relayd/error_shape.py). This module imports nothing of relayd, so any floor may
raise these.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from aiohttp import web

__all__ = [
    "AuthenticationError",
    "BadRequestError",
    "CLIENT_CLOSED",
    "ClientRequestError",
    "ExpectationFailedError",
    "ForbiddenAddressError",
    "MethodNotAllowedError",
    "NotFoundError",
    "OverloadedError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "ModelNotAllowedError",
    "ModelNotPricedError",
    "PublicUrlNotSetError",
    "QuotaExceededError",
    "RateLimitError",
    "RelayRateLimitError",
    "RelaydError",
    "RequestHeaderTooLargeError",
    "SpendLimitError",
    "SpendUnavailableError",
    "UnsupportedMediaTypeError",
    "UpgradeRequiredError",
    "UpstreamError",
    "UpstreamTimeoutError",
    "UpstreamUnavailableError",
    "error_body",
    "error_response",
]

CLIENT_CLOSED = 499


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


class ExpectationFailedError(ClientRequestError):
    """An ``Expect`` other than ``100-continue`` (RFC 9110 §15.5.18)."""

    status = 417
    default_code = "expectation_failed"


class UpgradeRequiredError(ClientRequestError):
    """A plain HTTP request reached a WebSocket-only route (RFC 9110 §15.5.22)."""

    status = 426
    default_code = "websocket_upgrade_required"


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


class SpendLimitError(ClientRequestError):
    """A relay key's own rpm, tpm or parallel limit ([spend], docs/spend.md). Its
    headers are ``x-relay-ratelimit-*``, never upstream's ``x-ratelimit-*``, so an
    upstream 429 (passed through unchanged) stays distinguishable."""

    status = 429
    type = "requests"
    default_code = "rate_limit_exceeded"


class QuotaExceededError(ClientRequestError):
    """A relay key's dollar budget is spent until its window resets. OpenAI's type
    and code for a spent quota, and ``x-should-retry: false``: the official SDKs
    then raise at once instead of retrying."""

    status = 429
    type = "insufficient_quota"
    default_code = "insufficient_quota"


class ModelNotAllowedError(PermissionDeniedError):
    default_code = "model_not_allowed"


class ModelNotPricedError(PermissionDeniedError):
    """A key with a dollar budget asked for a model relayd has no price for."""

    default_code = "model_not_priced"


class RequestHeaderTooLargeError(ClientRequestError):
    status = 431
    default_code = "request_header_too_large"


class PublicUrlNotSetError(RelaydError):
    """A link is needed and ``RELAYD_PUBLIC_URL`` is not set: the operator's mistake."""

    status = 500
    default_code = "public_url_not_set"


class OverloadedError(RelaydError):
    status = 503
    type = "server_error"
    default_code = "relay_overloaded"


class SpendUnavailableError(RelaydError):
    """The spend ledger cannot be read or written and ``on_backend_error`` is closed."""

    status = 503
    type = "server_error"
    default_code = "store_unavailable"


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


class ForbiddenAddressError(OSError):
    """A user file link led to an address relayd never fetches from.

    An ``OSError``, not a :class:`RelaydError`: it is raised inside the fetcher's
    connector, where aiohttp wraps it as a connection failure; the fetcher then
    answers 400 naming the link (relayd/actions/fetch.py).
    """


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
