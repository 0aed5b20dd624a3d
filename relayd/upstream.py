"""The upstream leg: the only owner of the aiohttp client session.

``Upstream.open()`` sends one request and yields the response once its headers
have arrived. It builds the URL, swaps the client's credentials for the upstream
key, applies header hygiene and timeouts, bounds the number of requests in flight
(a full pool answers 503 at once rather than queueing), and translates aiohttp's
exceptions into relayd's errors in exactly one place (:func:`mapped_errors`, the
httpx ``map_httpcore_exceptions`` idiom).

Timeouts (SPEC §4): ``connect`` bounds the TCP/TLS connect; ``first_byte`` bounds
the wait for the response head once the request body is sent; ``idle`` bounds each
gap between body chunks afterwards. There is no total cap, so a stream may run as
long as upstream keeps talking.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any, Final

import aiohttp
from aiohttp import ClientResponse, ClientSession
from multidict import CIMultiDict
from yarl import URL

from relayd.config import Settings
from relayd.errors import (
    AuthenticationError,
    BadRequestError,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RelaydError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from relayd.headers import request_headers
from relayd.streams import LimitExceededError

__all__ = ["Upstream", "mapped_errors"]

# aiohttp would otherwise invent these; a transparent relay sends the client's own.
_SKIP_AUTO_HEADERS: Final = ("Accept-Encoding", "User-Agent", "Content-Type")


def _cause_chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


@contextlib.contextmanager
def mapped_errors() -> Iterator[None]:
    """Translate failures of the upstream leg into relayd errors (502/504/413)."""
    try:
        yield
    except RelaydError:
        raise
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        for cause in _cause_chain(exc):
            if isinstance(cause, LimitExceededError):
                raise PayloadTooLargeError(str(cause)) from exc
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            raise UpstreamTimeoutError("Timed out connecting to the upstream API.") from exc
        if isinstance(exc, TimeoutError):  # includes aiohttp's SocketTimeoutError
            raise UpstreamTimeoutError("The upstream API did not answer in time.") from exc
        if isinstance(exc, aiohttp.ClientConnectorError):
            raise UpstreamUnavailableError("Cannot connect to the upstream API.") from exc
        if isinstance(exc, aiohttp.WSServerHandshakeError):
            raise _refused_handshake(exc) from exc
        if isinstance(exc, aiohttp.ClientResponseError):
            raise UpstreamUnavailableError(
                "The upstream API sent a malformed response."
            ) from exc
        raise UpstreamUnavailableError("The connection to the upstream API failed.") from exc


# aiohttp drops the body of a refused WebSocket handshake, so only the status can
# cross. A 4xx relayd has a class for keeps its status (an expired ek_ secret is the
# caller's 401, a model upstream does not know its 404); anything else is a 502.
_HANDSHAKE_REFUSALS: Final[dict[int, type[RelaydError]]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
}


def _refused_handshake(exc: aiohttp.WSServerHandshakeError) -> RelaydError:
    if exc.status < 400:
        return UpstreamUnavailableError(
            f"The upstream API did not accept the WebSocket upgrade (HTTP {exc.status})."
        )
    kind = _HANDSHAKE_REFUSALS.get(exc.status, UpstreamUnavailableError)
    retry_after = exc.headers.get("Retry-After") if exc.headers is not None else None
    return kind(
        f"The upstream API refused the WebSocket handshake with HTTP {exc.status}.",
        headers={"Retry-After": retry_after} if retry_after else None,
    )


class _NoDelayConnector(aiohttp.TCPConnector):
    """TCP_NODELAY on every upstream socket (aiohttp sets it too, but say it)."""

    async def _wrap_create_connection(self, *args: Any, **kwargs: Any) -> Any:
        transport, protocol = await super()._wrap_create_connection(*args, **kwargs)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return transport, protocol


class Upstream:
    """One client session per process, created by the app's ``cleanup_ctx``."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        base = URL(settings.upstream_url.rstrip("/"))
        # Accept both https://api.openai.com and https://api.openai.com/v1: relayd
        # routes carry the /v1 prefix themselves.
        if base.path.endswith("/v1"):
            base = base.with_path(base.path.removesuffix("/v1"))
        self._base = str(base).rstrip("/")
        self._limit = settings.max_upstream_connections
        self._in_flight = 0
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=settings.connect_timeout_s,
            sock_read=settings.first_byte_timeout_s,
        )
        self._session: ClientSession | None = None

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def base_url(self) -> str:
        return self._base

    async def start(self) -> None:
        connector = _NoDelayConnector(
            limit=self._limit,
            limit_per_host=0,
            ttl_dns_cache=300,
            keepalive_timeout=30,
            enable_cleanup_closed=True,
        )
        self._session = ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,  # bytes pass through as upstream encoded them
            timeout=self._timeout,
            trust_env=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def url(self, path_qs: str) -> URL:
        return URL(self._base + path_qs, encoded=True)

    def headers(
        self, incoming: Mapping[str, str], *, keep_length: bool = True
    ) -> CIMultiDict[str]:
        s = self._settings
        return request_headers(
            incoming,
            upstream_key=s.upstream_key,
            organization=s.organization,
            project=s.project,
            drop=(s.key_header,),
            keep_length=keep_length,
        )

    @contextlib.asynccontextmanager
    async def open(
        self,
        method: str,
        path_qs: str,
        *,
        headers: CIMultiDict[str],
        data: Any = None,
    ) -> AsyncIterator[ClientResponse]:
        """Send a request and yield the response once its head has arrived.

        Leaving the block releases the connection; leaving it early (the client hung
        up, the handler was cancelled) closes the connection, which cancels the
        request upstream. Errors before the head arrives are relayd errors; errors
        while the caller reads the body are aiohttp's own (streams/ wraps them).
        """
        if self._session is None:
            raise RuntimeError("Upstream.start() was not called")
        if self._in_flight >= self._limit:
            raise OverloadedError(
                "The relay has too many upstream requests in flight; retry shortly.",
                headers={"Retry-After": "1"},
            )
        self._in_flight += 1
        try:
            with mapped_errors():
                response = await self._session.request(
                    method,
                    self.url(path_qs),
                    headers=headers,
                    data=data,
                    allow_redirects=False,
                    skip_auto_headers=_SKIP_AUTO_HEADERS,
                )
            try:
                self._switch_to_idle_timeout(response)
                yield response
            finally:
                if response.content.at_eof():
                    response.release()  # whole body read: the connection is reusable
                else:
                    response.close()  # anything else: drop it, cancelling upstream work
        finally:
            self._in_flight -= 1

    def _switch_to_idle_timeout(self, response: ClientResponse) -> None:
        # The head has arrived: from now on sock_read bounds the gap between body
        # chunks (idle) instead of the wait for the first byte.
        connection = response.connection
        protocol = connection.protocol if connection is not None else None
        if protocol is not None:
            protocol.read_timeout = self._settings.idle_timeout_s
            protocol.start_timeout()

    @contextlib.asynccontextmanager
    async def ws_connect(
        self, path_qs: str, *, headers: CIMultiDict[str], **kwargs: Any
    ) -> AsyncIterator[aiohttp.ClientWebSocketResponse[bool]]:
        """Dial an upstream WebSocket (realtime); handshake failures are relayd errors.

        An open WebSocket holds a pooled connection for its whole life, so it counts
        against the in-flight limit like a request (a full pool answers 503 rather
        than waiting for a slot with no timeout). A refused handshake raises before
        anything was sent to the client, so the caller can still answer with HTTP.
        """
        if self._session is None:
            raise RuntimeError("Upstream.start() was not called")
        if self._in_flight >= self._limit:
            raise OverloadedError(
                "The relay has too many upstream connections open; retry shortly.",
                headers={"Retry-After": "1"},
            )
        self._in_flight += 1
        try:
            url = URL(self._base.replace("http", "ws", 1) + path_qs, encoded=True)
            with mapped_errors():
                ws = await self._session.ws_connect(url, headers=headers, **kwargs)
            try:
                yield ws
            finally:
                await ws.close()
        finally:
            self._in_flight -= 1
