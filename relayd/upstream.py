"""The upstream leg: the only owner of the aiohttp client session.

``Upstream.open()`` sends one request and yields the response once its headers
have arrived. It builds the URL, swaps the client's credentials for the upstream
key, applies header hygiene and timeouts, bounds the number of requests in flight
(a full pool answers 503 at once rather than queueing; a relay key holding its
share of the pool, 429 at once), and translates aiohttp's
exceptions into relayd's errors in exactly one place (:func:`translated`, applied
by :func:`mapped_errors`, the httpx ``map_httpcore_exceptions`` idiom, or by a
plain ``except UPSTREAM_FAILURES`` on the hottest paths).

Timeouts (docs/streaming.md#timeouts): ``connect`` bounds the TCP/TLS connect;
``first_byte`` bounds the wait for the response head once the request body is sent;
``idle`` bounds each gap between body chunks afterwards, and how long upstream may
leave a chunk of a streamed request body unread (:class:`_SendWatch`). There is no
total cap, so a stream may run as long as upstream keeps talking.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
import os
import ssl
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any, Final

import aiohttp
from aiohttp import ClientResponse, ClientSession, StreamReader
from aiohttp.http_exceptions import ContentLengthError, TransferEncodingError
from multidict import CIMultiDict
from yarl import URL

from relayd.config import Settings
from relayd.connectors import (
    NoDelayConnector,
    PublicOnlyConnector,
    PublicOnlyResolver,
    refuse_non_public,
)
from relayd.errors import (
    AuthenticationError,
    BadRequestError,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    RelaydError,
    RelayRateLimitError,
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from relayd.headers import request_headers
from relayd.streams import LimitExceededError

__all__ = [
    "UPSTREAM_FAILURES",
    "Sent",
    "Upstream",
    "cause_chain",
    "failure_cause",
    "mapped_errors",
    "translated",
]

# aiohttp would otherwise invent these; a transparent relay sends the client's own.
_SKIP_AUTO_HEADERS: Final = ("Accept-Encoding", "User-Agent", "Content-Type")


def cause_chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


# What a failure of the upstream leg raises: aiohttp's errors, timeouts, sockets.
UPSTREAM_FAILURES: Final = (aiohttp.ClientError, TimeoutError, OSError)


def translated(exc: BaseException) -> RelaydError:
    """The relayd error (502/504/413) for a failure of the upstream leg."""
    for cause in cause_chain(exc):
        if isinstance(cause, LimitExceededError):
            return PayloadTooLargeError(str(cause))
    error: RelaydError
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        error = UpstreamTimeoutError("Timed out connecting to the upstream API.")
    elif isinstance(exc, TimeoutError):  # includes aiohttp's SocketTimeoutError
        error = UpstreamTimeoutError("The upstream API did not answer in time.")
    elif isinstance(exc, aiohttp.ClientConnectorError):
        error = UpstreamUnavailableError("Cannot connect to the upstream API.")
    elif isinstance(exc, aiohttp.WSServerHandshakeError):
        return _refused_handshake(exc)
    elif isinstance(exc, aiohttp.ClientResponseError):
        error = UpstreamUnavailableError("The upstream API sent a malformed response.")
    else:
        error = UpstreamUnavailableError("The connection to the upstream API failed.")
    if isinstance(error, UpstreamError):
        error.cause = failure_cause(exc)  # the client gets the message, the log the cause
    return error


def failure_cause(exc: BaseException) -> str:
    """What failed on the upstream leg, in an operator's words, for the one log line.

    Built from exception types, OS error names and the configured host only, never
    from what upstream or the client sent, so no body, header or key can reach the log.
    """
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "timed out connecting"
    if isinstance(exc, aiohttp.SocketTimeoutError):
        return "timed out waiting for data (first-byte or idle timeout)"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return f"DNS lookup failed for {exc.host}: {_os_reason(exc.os_error)}"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"TLS certificate of {exc.host}:{exc.port} not accepted ({exc.certificate_error})"
    if isinstance(exc, aiohttp.ClientConnectorSSLError):
        return f"TLS handshake with {exc.host}:{exc.port} failed ({_os_reason(exc.os_error)})"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to {exc.host}:{exc.port}: {_os_reason(exc.os_error)}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "upstream closed the connection before answering"
    if isinstance(exc, aiohttp.ClientPayloadError):
        inner = exc.__cause__ or exc.__context__
        if isinstance(inner, TransferEncodingError):
            return "upstream closed the connection before the chunked body ended"
        if isinstance(inner, ContentLengthError):
            return "upstream closed the connection before Content-Length bytes arrived"
        if inner is not None and not isinstance(inner, aiohttp.ClientPayloadError):
            return f"the body ended early: {failure_cause(inner)}"
        return "the body ended early or was malformed"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"malformed response ({type(exc).__name__})"
    if isinstance(exc, ConnectionResetError) or getattr(exc, "errno", None) == errno.ECONNRESET:
        return "connection reset by upstream"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error ({exc.reason or type(exc).__name__})"
    if isinstance(exc, OSError) and exc.errno:
        return _os_reason(exc)
    return type(exc).__name__


def _os_reason(exc: OSError) -> str:
    """``connection refused`` for ECONNREFUSED; asyncio's own messages quote addresses."""
    if exc.errno is not None and exc.errno > 0:
        return os.strerror(exc.errno).lower()
    return str(exc.strerror or type(exc).__name__)


@contextlib.contextmanager
def mapped_errors() -> Iterator[None]:
    """Translate failures of the upstream leg into relayd errors (see :func:`translated`)."""
    try:
        yield
    except UPSTREAM_FAILURES as exc:
        raise translated(exc) from exc


# aiohttp drops the body of a refused WebSocket handshake, so only the status can
# cross. A 4xx relayd has a class for keeps its status (an expired ek_ secret is the
# caller's 401, a model upstream does not know its 404, a rate limit its 429 with
# Retry-After: api7/aisix#721); anything else is a 502.
_HANDSHAKE_REFUSALS: Final[dict[int, type[RelaydError]]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    429: RateLimitError,
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


class _SendWatch:
    """Bounds how long upstream may leave each chunk of a streamed request body unread.

    aiohttp arms ``sock_read`` only once the whole body is written
    (``ClientRequest.write_bytes``), so an upstream that stops reading mid-upload
    would hold the request, its slot and the client forever. The deadline runs
    while aiohttp writes a chunk (the body generator waits at ``yield``), never
    while relayd waits for the client's next bytes: a slow client is not upstream's
    fault. It ends when the head arrives (from then on ``sock_read`` rules).
    """

    __slots__ = ("_active", "_limit", "_scope")

    def __init__(self, scope: asyncio.Timeout, limit: float) -> None:
        self._scope = scope
        self._limit = limit
        self._active = True

    @classmethod
    @contextlib.asynccontextmanager
    async def bounding(cls, limit: float) -> AsyncIterator[_SendWatch]:
        async with asyncio.timeout(None) as scope:
            watch = cls(scope, limit)
            try:
                yield watch
            finally:
                watch._active = False  # the body may still be sent after the head

    @staticmethod
    def needed(data: Any) -> bool:
        """Whether ``data`` streams (from the client, or built as it goes); bytes and
        payloads relayd built have no client to wait for."""
        return isinstance(data, StreamReader) or inspect.isasyncgen(data)

    def wrap(self, data: StreamReader | AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        return self._watched(data.iter_any() if isinstance(data, StreamReader) else data)

    async def _watched(self, body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        async for chunk in body:
            if self._active:
                self._scope.reschedule(loop.time() + self._limit)
            yield chunk  # resumed once aiohttp has written (and drained) the chunk
            if self._active:
                self._scope.reschedule(None)


class Upstream:
    """One client session per process, created by the app's ``cleanup_ctx``.

    A second session, for user file links only, lives beside it
    (relayd/connectors.py).
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        base = URL(settings.upstream.url.rstrip("/"))
        # Accept both https://api.openai.com and https://api.openai.com/v1: relayd
        # routes carry the /v1 prefix themselves.
        if base.path.endswith("/v1"):
            base = base.with_path(base.path.removesuffix("/v1"))
        self._base = str(base).rstrip("/")
        self._limit = settings.upstream.max_connections
        self._per_key = settings.upstream.connections_per_key
        self._in_flight = 0
        self._by_key: dict[str, int] = {}
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=settings.upstream.connect_timeout_s,
            sock_read=settings.upstream.first_byte_timeout_s,
        )
        self._session: ClientSession | None = None
        self._links: ClientSession | None = None
        self._link_resolver: aiohttp.abc.AbstractResolver | None = None

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def base_url(self) -> str:
        return self._base

    async def start(self) -> None:
        connector = NoDelayConnector(
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
            skip_auto_headers=_SKIP_AUTO_HEADERS,
        )
        self._links = self._link_session()

    def _link_session(self) -> ClientSession:
        s = self._settings
        context = ssl.create_default_context(cafile=s.actions.fetch_ca_file)
        guarded = not s.actions.fetch_allow_private
        connector_type = PublicOnlyConnector if guarded else NoDelayConnector
        # A connector does not close a resolver it was given; close() does.
        self._link_resolver = PublicOnlyResolver() if guarded else None
        connector = connector_type(
            limit=64,
            ssl=context,
            resolver=self._link_resolver,
            socket_factory=refuse_non_public if guarded else None,
            use_dns_cache=False,  # every fetch is checked against a fresh answer
            force_close=True,  # links point at many hosts; keep no idle sockets
        )
        return ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(
                total=s.actions.fetch_timeout_s,
                sock_connect=min(s.upstream.connect_timeout_s, s.actions.fetch_timeout_s),
            ),
            trust_env=False,
            headers={"User-Agent": "relayd", "Accept": "*/*"},
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._links is not None:
            await self._links.close()
            self._links = None
        if self._link_resolver is not None:
            await self._link_resolver.close()
            self._link_resolver = None

    @contextlib.asynccontextmanager
    async def open_link(self, url: URL) -> AsyncIterator[ClientResponse]:
        """GET a user's file link: no credentials, no redirects, public peers only.

        Failures are not translated here: wrap the whole fetch (open and read) in
        ``link_errors`` (relayd/actions/fetch.py), which names the link in the caller's terms.
        """
        if self._links is None:
            raise RuntimeError("Upstream.start() was not called")
        async with self._links.get(url, allow_redirects=False) as response:
            yield response

    def url(self, path_qs: str) -> URL:
        return URL(self._base + path_qs, encoded=True)

    def headers(self, incoming: Mapping[str, str], *, keep_length: bool = True) -> CIMultiDict[str]:
        s = self._settings
        return request_headers(
            incoming,
            upstream_key=s.upstream.api_key,
            organization=s.upstream.organization,
            project=s.upstream.project,
            drop=(s.auth.header,),
            keep_length=keep_length,
        )

    def open(
        self,
        method: str,
        path_qs: str,
        *,
        headers: CIMultiDict[str],
        data: Any = None,
        key: str | None = None,
    ) -> Sent:
        """Send a request; ``async with`` it for the response once its head has arrived.

        ``key`` names the relay key it is sent for: one key holds at most its share
        of the upstream slots (see :meth:`_take_slot`).

        Leaving the block releases the connection; leaving it early (the client hung
        up, the handler was cancelled) closes the connection, which cancels the
        request upstream. Errors before the head arrives are relayd errors; errors
        while the caller reads the body are aiohttp's own (streams/ wraps them).
        """
        return Sent(self, method, path_qs, headers, data, key)

    async def _send(
        self, session: ClientSession, method: str, url: URL, headers: CIMultiDict[str], data: Any
    ) -> ClientResponse:
        try:
            if not _SendWatch.needed(data):  # bytes relayd holds: nothing to watch
                return await session.request(
                    method, url, headers=headers, data=data, allow_redirects=False
                )
            async with _SendWatch.bounding(self._settings.upstream.idle_timeout_s) as watch:
                return await session.request(
                    method, url, headers=headers, data=watch.wrap(data), allow_redirects=False
                )
        except UPSTREAM_FAILURES as exc:
            raise translated(exc) from exc

    @contextlib.contextmanager
    def _slot(self, key: str | None = None) -> Iterator[ClientSession]:
        """One of the ``max_connections`` upstream slots, held for the block."""
        session = self._take_slot(key)
        try:
            yield session
        finally:
            self._give_slot(key)

    def _take_slot(self, key: str | None) -> ClientSession:
        """Take one of the ``max_connections`` upstream slots, or a 503 at once when all
        are taken; every take is paired with a :meth:`_give_slot`.

        One relay key holds at most ``max_connections_per_key`` of them (issue 11: a
        key with long streams or idle WebSockets must not starve the others); past
        that its next request is a 429 at once, like the full pool's 503, rather
        than a wait that would hold the client's connection and body meanwhile.
        A full pool is the 503 whoever asks. Requests sent for no key (keyless
        mode, a single configured key: ``memory.share_key``) have the whole pool.
        A WebSocket holds its slot for its whole life, like a stream.
        """
        if self._session is None:
            raise RuntimeError("Upstream.start() was not called")
        if self._in_flight >= self._limit:
            raise OverloadedError(
                "The relay has too many upstream requests in flight; retry shortly.",
                headers={"Retry-After": "1"},
            )
        held = self._by_key.get(key, 0) if key is not None else 0
        if key is not None and held >= self._per_key:
            raise RelayRateLimitError(
                f"This relay key has {held} upstream requests in flight, its share of the "
                "relay's connections; retry when one has finished.",
                headers={"Retry-After": "1"},
            )
        self._in_flight += 1
        if key is not None:
            self._by_key[key] = held + 1
        return self._session

    def _give_slot(self, key: str | None) -> None:
        self._in_flight -= 1
        if key is not None:
            if (left := self._by_key[key] - 1) > 0:
                self._by_key[key] = left
            else:
                del self._by_key[key]

    def _switch_to_idle_timeout(self, response: ClientResponse) -> None:
        # The head has arrived: from now on sock_read bounds the gap between body
        # chunks (idle) instead of the wait for the first byte.
        connection = response.connection
        protocol = connection.protocol if connection is not None else None
        if protocol is not None:
            protocol.read_timeout = self._settings.upstream.idle_timeout_s
            protocol.start_timeout()

    @contextlib.asynccontextmanager
    async def ws_connect(
        self, path_qs: str, *, headers: CIMultiDict[str], key: str | None = None, **kwargs: Any
    ) -> AsyncIterator[aiohttp.ClientWebSocketResponse[bool]]:
        """Dial an upstream WebSocket (realtime); handshake failures are relayd errors.

        An open WebSocket holds a pooled connection for its whole life, so it counts
        against the in-flight limit like a request (a full pool answers 503 rather
        than waiting for a slot with no timeout). A refused handshake raises before
        anything was sent to the client, so the caller can still answer with HTTP.
        """
        with self._slot(key) as session:
            url = URL(self._base.replace("http", "ws", 1) + path_qs, encoded=True)
            with mapped_errors():
                ws = await session.ws_connect(url, headers=headers, **kwargs)
            try:
                yield ws
            finally:
                await ws.close()


class Sent:
    """One request upstream, as ``async with upstream.open(...) as response``.

    A class rather than a generator-based context manager: every request enters
    one, and a generator-based one costs a few µs more each time."""

    __slots__ = ("_data", "_headers", "_key", "_method", "_path_qs", "_response", "_upstream")

    def __init__(
        self,
        upstream: Upstream,
        method: str,
        path_qs: str,
        headers: CIMultiDict[str],
        data: Any,
        key: str | None,
    ) -> None:
        self._upstream = upstream
        self._method = method
        self._path_qs = path_qs
        self._headers = headers
        self._data = data
        self._key = key
        self._response: ClientResponse | None = None

    async def __aenter__(self) -> ClientResponse:
        upstream = self._upstream
        session = upstream._take_slot(self._key)
        try:
            response = await upstream._send(
                session, self._method, upstream.url(self._path_qs), self._headers, self._data
            )
            if response.status == 101:
                # relayd never asks for an upgrade here (Upgrade is hop-by-hop and
                # dropped; WebSockets go through ws_connect), so the connection is no
                # longer HTTP and holds no answer for the client: drop it.
                response.close()
                raise UpstreamUnavailableError(
                    "The upstream API switched protocols (101) on a request that asked "
                    "for no upgrade."
                )
            upstream._switch_to_idle_timeout(response)
        except BaseException:
            upstream._give_slot(self._key)
            raise
        self._response = response
        return response

    async def __aexit__(self, *exc_info: object) -> None:
        response, self._response = self._response, None
        try:
            if response is not None:
                if response.content.at_eof():
                    response.release()  # whole body read: the connection is reusable
                else:
                    response.close()  # anything else: drop it, cancelling upstream work
        finally:
            self._upstream._give_slot(self._key)
