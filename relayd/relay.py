"""What every relaying handler does: send upstream, then stream the answer back.

Both faces (the OpenAI face in ``handlers/``, the GPT Actions face in ``actions/``)
relay through here, so it sits one floor below them. Handlers decide *what* goes
upstream; these helpers do the rest the same way for all of them: body streaming
under the cap, header hygiene, honest stream endings, and redaction of upstream
error bodies.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import zlib
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any, Final
from urllib.parse import quote

from aiohttp import ClientResponse, StreamReader, hdrs, web
from multidict import CIMultiDict

from relayd.errors import (
    BadRequestError,
    PayloadTooLargeError,
    PermissionDeniedError,
    UnsupportedMediaTypeError,
    UpstreamUnavailableError,
)
from relayd.headers import (
    BodyDecoder,
    DecodedTooLargeError,
    decompress,
    redact_secrets,
    response_headers,
)
from relayd.memory import buffer_lease, share_key
from relayd.metering import Meter, open_meter, peek_model, wants_model_peek, wants_whole_body
from relayd.paths import upstream_path
from relayd.state import (
    BROKEN,
    CLIENT_LEFT,
    METRICS,
    SETTINGS,
    SPEND_WATCH,
    STREAMED,
    UPSTREAM,
    UPSTREAM_REQUEST_ID,
    UPSTREAM_STATUS,
    UPSTREAM_WAIT,
    USAGE_TAP,
    booked,
)
from relayd.streams import (
    BrokenStreamError,
    Pumped,
    SSEPump,
    abort,
    is_event_stream,
    pump,
    pump_request_body,
)
from relayd.streams.multipart import SlicedBytesPayload
from relayd.upstream import UPSTREAM_FAILURES, Sent, failure_cause, translated
from relayd.usage import UsageTap

__all__ = [
    "MAX_JSON_DEPTH",
    "checked_path",
    "downloadable_file",
    "exchange",
    "json_body",
    "parse_json",
    "read_capped",
    "read_json_object",
    "read_whole",
    "relay",
    "send_back",
    "stream_back",
    "waited_on_upstream",
]

log = logging.getLogger("relayd.relay")

# Error bodies are read whole to redact them; OpenAI's are a few hundred bytes.
ERROR_BODY_CAP: Final = 1024 * 1024
# Bodies up to this size with a declared length move in one piece: one write
# each way instead of a stream, and the answer's head and body leave together.
SMALL_BODY: Final = 64 * 1024

_CLIENT_BODY: Final = object()

# A file object is a few hundred bytes.
FILE_METADATA_CAP: Final = 64 * 1024

# How deeply a client's JSON may nest. Python's parser and encoders recurse (the
# interpreter's limit is about 1,000 frames, shared with the handler's own stack),
# so a body nested a few hundred deep fails with RecursionError in json.loads, in
# validation or when re-encoded for upstream. OpenAI's own bodies nest a few tens
# deep at most (structured-output schemas allow 10 levels).
MAX_JSON_DEPTH: Final = 128


def json_body(value: Any) -> SlicedBytesPayload:
    """``value`` as a JSON request body for upstream (any size, no warning)."""
    return SlicedBytesPayload(json.dumps(value).encode(), content_type="application/json")


def checked_path(request: web.Request) -> str:
    """The raw path and query, refused (400) if it hides a path trick (the path
    middleware refused it already; handlers ask again so that none relies on it)."""
    upstream_path(request.raw_path)
    return request.raw_path


async def _client_body(request: web.Request, limit: int) -> tuple[Any, bool]:
    """The client's body for upstream, and whether its declared length still holds.

    Small bodies of known length (most API calls) are read in one go and sent in
    one write, which costs a fraction of a streamed payload; everything else
    streams as it arrives.
    """
    if not request.body_exists:
        return None, True
    # An encoded body goes upstream as it came, Content-Encoding and all: relayd's
    # server never decodes request bodies itself (app.py).
    length = request.content_length
    if length is not None:
        if length <= SMALL_BODY:
            try:
                return await request.content.readexactly(length), True
            except asyncio.IncompleteReadError as exc:
                raise BadRequestError("The request body ended before its Content-Length.") from exc
        return request.content, True  # the HTTP parser holds the client to its length
    return pump_request_body(request.content, limit), True


async def _chained(prefix: bytes, rest: StreamReader, limit: int) -> AsyncIterator[bytes]:
    """A body read ahead in part: ``prefix``, then the rest as it arrives."""
    if prefix:
        yield prefix
    async for chunk in pump_request_body(rest, limit - len(prefix)):
        yield chunk


async def relay(
    request: web.Request,
    method: str,
    path_qs: str,
    *,
    data: Any = _CLIENT_BODY,
    headers: CIMultiDict[str] | None = None,
) -> web.StreamResponse:
    """Send one request upstream and stream its answer back to the client.

    ``data`` defaults to the client's own body, streamed; handlers that re-encode
    pass bytes (and matching ``headers``). Client hang-up cancels the handler, which
    closes the upstream connection; an upstream break after the head aborts the
    client connection.
    """
    upstream = request.app[UPSTREAM]
    settings = request.app[SETTINGS]
    if data is _CLIENT_BODY and wants_whole_body(request):
        # A key with limits: its model and output cap are read from the JSON body,
        # held whole under the memory budget and the JSON cap (docs/spend.md).
        data = bytes(await read_whole(request, settings.limits.max_json_bytes))
        headers = upstream.headers(request.headers, keep_length=False)
    elif data is _CLIENT_BODY and wants_model_peek(request):
        # A multipart form: its model field is read ahead, the rest streams (the
        # bytes and their length are unchanged).
        prefix = await peek_model(request)
        data = _chained(prefix, request.content, settings.limits.max_body_bytes)
        headers = upstream.headers(request.headers, keep_length=True)
    elif data is _CLIENT_BODY:
        data, keep_length = await _client_body(request, settings.limits.max_body_bytes)
        headers = upstream.headers(request.headers, keep_length=keep_length)
    elif headers is None:
        headers = upstream.headers(request.headers, keep_length=False)
    async with exchange(request, method, path_qs, headers=headers, data=data) as answer:
        return await send_back(request, answer)


def exchange(
    request: web.Request,
    method: str,
    path_qs: str,
    *,
    headers: CIMultiDict[str],
    data: Any = None,
) -> Exchange:
    """``Upstream.open()`` with the request's accounting: the wait for the head (added
    to any earlier upstream call's), the upstream status and ``x-request-id``. Every
    handler that talks to upstream goes through here (``async with exchange(...) as
    answer``), so logs and metrics agree."""
    return Exchange(request, method, path_qs, headers, data)


class Exchange:
    """One upstream call of a request; see :func:`exchange`. A class rather than a
    generator-based context manager: every request enters one, and a
    generator-based one costs a few µs more each time."""

    __slots__ = ("_data", "_headers", "_meter", "_method", "_path_qs", "_request", "_sent")

    def __init__(
        self,
        request: web.Request,
        method: str,
        path_qs: str,
        headers: CIMultiDict[str],
        data: Any,
    ) -> None:
        self._request = request
        self._method = method
        self._path_qs = path_qs
        self._headers = headers
        self._data = data
        self._meter: Meter | None = None
        self._sent: Sent | None = None

    async def __aenter__(self) -> ClientResponse:
        request = self._request
        # Spend control: admitted (or refused) before anything leaves, settled when the
        # exchange ends, however it ends (relayd/metering.py).
        self._meter = meter = await open_meter(request, self._method, self._path_qs, self._data)
        started = time.perf_counter()
        sent = request.app[UPSTREAM].open(
            self._method,
            self._path_qs,
            headers=self._headers,
            data=self._data,
            key=share_key(request),
        )
        try:
            answer = await sent.__aenter__()
        except BaseException as exc:
            if meter is not None:
                meter.close(exc)
            raise
        self._sent = sent
        waited_on_upstream(request, started)
        request[UPSTREAM_STATUS] = answer.status
        if (upstream_id := answer.headers.get("x-request-id")) is not None:
            request[UPSTREAM_REQUEST_ID] = upstream_id
        return answer

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        sent, meter = self._sent, self._meter
        try:
            if sent is not None:
                await sent.__aexit__(kind, exc, tb)
        except BaseException as failure:
            if meter is not None:
                meter.close(exc or failure)
            raise
        if meter is not None:
            meter.close(exc)


async def downloadable_file(
    request: web.Request, file_id: str
) -> dict[str, Any] | web.StreamResponse:
    """The metadata of a stored file whose content may leave through the relay, or
    the answer to give instead.

    Every route that hands out a file's content asks this first: files whose
    purpose is ``user_data`` (a user's private upload) never leave. The check fails
    closed: only a 200 whose JSON object names a purpose is a verdict. A client
    error upstream (404 unknown file, 401, 429 with its retry hints) is the
    client's answer and comes back, redacted; anything else (5xx, 1xx/3xx, another
    2xx, no purpose) is a 502, since relayd cannot tell what the file is (issue 11).
    """
    headers = request.app[UPSTREAM].headers({"Accept": "application/json"})
    path = f"/v1/files/{quote(file_id, safe='')}"
    async with exchange(request, "GET", path, headers=headers) as answer:
        if 400 <= answer.status < 500:
            return await send_back(request, answer)
        if answer.status != 200:
            raise UpstreamUnavailableError(
                f"The upstream API answered {answer.status} to the file metadata lookup; "
                "the file cannot be checked, so its content is not handed out."
            )
        raw = await read_capped(answer.content, FILE_METADATA_CAP)
    try:
        meta = json.loads(raw)
    except ValueError:
        meta = None  # malformed JSON names no purpose either
    if not isinstance(meta, dict) or not isinstance(meta.get("purpose"), str):
        raise UpstreamUnavailableError(
            "The upstream API sent file metadata without a purpose; "
            "the file cannot be checked, so its content is not handed out."
        )
    if meta["purpose"] == "user_data":
        raise PermissionDeniedError(
            "Files with purpose 'user_data' cannot be downloaded through this relay.",
            code="user_data_download_forbidden",
            param="file_id",
        )
    return meta


def waited_on_upstream(request: web.Request, since: float) -> None:
    """Book the time since ``since`` (a ``time.perf_counter()``) as waiting on upstream:
    it is no part of the relay's overhead."""
    request[UPSTREAM_WAIT] = booked(request).get(UPSTREAM_WAIT, 0.0) + time.perf_counter() - since


async def send_back(request: web.Request, answer: ClientResponse) -> web.StreamResponse:
    """Stream an upstream response to the client, unchanged but for headers."""
    if answer.status >= 400:
        return await _error_back(request, answer)
    settings = request.app[SETTINGS]
    sse = is_event_stream(answer.headers.get("Content-Type"))
    encoded = answer.headers.get("Content-Encoding", "identity").lower() != "identity"
    # Keepalive comments change the byte count and cannot go inside a compressed stream.
    keepalive = settings.upstream.sse_keepalive_s if sse and not encoded else None
    headers = response_headers(answer.headers, keep_length=keepalive is None)
    if sse:
        headers["Cache-Control"] = "no-cache"
        headers["X-Accel-Buffering"] = "no"
    tap = _usage_tap(request, answer, sse)
    metrics = request.app[METRICS]
    length = answer.content_length
    if not sse and length is not None and length <= SMALL_BODY:
        return await _small_back(request, answer, headers, tap)
    response = web.StreamResponse(status=answer.status, reason=answer.reason, headers=headers)
    await response.prepare(request)
    if sse:
        metrics.open_streams.inc()
    try:
        ended = await stream_back(request, answer, response, keepalive_s=keepalive, tap=tap)
    finally:
        if sse:
            metrics.open_streams.dec()
    if not ended:
        return response  # aiohttp's write_eof then fails quietly on the closed transport
    if tap is not None:
        request[USAGE_TAP] = tap  # read when the request is accounted, after the answer
    await response.write_eof()
    return response


async def stream_back(
    request: web.Request,
    answer: ClientResponse,
    response: web.StreamResponse,
    *,
    keepalive_s: float | None = None,
    tap: UsageTap | None = None,
) -> bool:
    """Pump upstream's body into the prepared ``response``; False unless it ended cleanly.

    The counters live in the request (``STREAMED``), so the access line has the bytes
    sent and the waits however the stream ends, a cancelled one included. When
    upstream breaks, the client connection is cut (a truncated body must not look
    complete) and the access line becomes the one warning about it; when the client
    left, leaving the caller's block closes the upstream request. Either way the
    caller must not ``write_eof()``.
    """
    moved = request[STREAMED] = Pumped()
    try:
        if keepalive_s is not None:
            await SSEPump(
                answer.content, response, keepalive_s=keepalive_s, tap=tap, moved=moved
            ).run()
        else:
            await pump(answer.content, response, tap=tap, moved=moved)
    except BrokenStreamError as exc:
        request[BROKEN] = f"after {exc.sent} bytes: {failure_cause(exc.__cause__ or exc)}"
        # What was still queued never reaches the client (framing counted too: clamp).
        moved.sent = max(0, moved.sent - abort(request))
        return False
    except ConnectionResetError:
        request[CLIENT_LEFT] = True
        return False
    return True


async def _small_back(
    request: web.Request, answer: ClientResponse, headers: CIMultiDict[str], tap: UsageTap | None
) -> web.Response:
    """A small answer of known length, read whole: head and body leave in one write."""
    started = time.perf_counter()
    body = await read_capped(answer.content, SMALL_BODY)
    waited_on_upstream(request, started)
    if tap is not None:
        tap(body)
        request[USAGE_TAP] = tap  # read when the request is accounted, after the answer
    return web.Response(status=answer.status, reason=answer.reason, body=body, headers=headers)


def _usage_tap(request: web.Request, answer: ClientResponse, sse: bool) -> UsageTap | None:
    """Model answers (POST, JSON or SSE, status 200) are watched for token usage."""
    if (request.method != "POST" and SPEND_WATCH not in booked(request)) or answer.status != 200:
        return None
    if not sse and answer.content_type != "application/json":
        return None
    return UsageTap(event_stream=sse, content_encoding=answer.headers.get("Content-Encoding", ""))


async def read_capped(content: StreamReader, cap: int) -> bytes:
    """A whole (small) upstream body; more than ``cap`` bytes is an upstream fault.

    A failure while reading is mapped here (a 502 or 504, as any upstream failure
    before the answer's head went out), so no caller wraps it again.
    """
    chunks: list[bytes] = []
    size = 0
    try:  # mapped_errors() inline: a context manager costs every answer a few µs
        while size <= cap and (chunk := await content.readany()):
            size += len(chunk)
            chunks.append(chunk)
    except UPSTREAM_FAILURES as exc:
        raise translated(exc) from exc
    if size > cap:  # raised outside: mapped_errors would take it for a broken connection
        raise UpstreamUnavailableError(f"The upstream API sent more than {cap} bytes here.")
    return b"".join(chunks)


async def _error_back(request: web.Request, answer: ClientResponse) -> web.Response:
    """Pass an upstream error through, with anything that echoes a key removed.

    OpenAI's 401 says "Incorrect API key provided: sk-…"; forwarding that verbatim
    leaks the operator key's prefix and suffix (nyroway/nyro#67).
    """
    raw = await read_capped(answer.content, ERROR_BODY_CAP)
    try:
        body = decompress(raw, answer.headers.get("Content-Encoding", ""), ERROR_BODY_CAP)
    except (zlib.error, ValueError) as exc:
        raise UpstreamUnavailableError("The upstream API sent a corrupt error body.") from exc
    body = redact_secrets(body, (request.app[SETTINGS].upstream.api_key,))
    headers = response_headers(answer.headers, keep_length=False)
    return web.Response(status=answer.status, reason=answer.reason, body=body, headers=headers)


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, for the few handlers that must re-encode it.

    Read whole by :func:`read_whole` (decoded, capped, within the memory budget);
    malformed JSON, invalid UTF-8 and non-objects are the caller's mistake (400).
    """
    if request.content_type != "application/json":
        raise BadRequestError("Expected a JSON body (Content-Type: application/json).")
    payload = parse_json(await read_whole(request, request.app[SETTINGS].limits.max_json_bytes))
    if not isinstance(payload, dict):
        raise BadRequestError("Request body must be a JSON object.", code="invalid_json")
    return payload


async def read_whole(request: web.Request, cap: int) -> bytes | bytearray:
    """The client's body, whole and decoded, for a handler that must parse it.

    At most ``cap`` decoded bytes (413 past it, said up front when the length is
    declared). Every byte is reserved in the request's memory lease before it is
    read: a declared length at once, anything else (chunked, compressed) piece by
    piece as it decodes, so a refusal (429 for the key, 503 for the relay) comes
    before the memory is taken. ``Content-Encoding`` gzip and deflate are undone
    as the bytes arrive, never more than a piece at a time: a corrupt or truncated
    stream is a 400 ``invalid_encoding``, any other coding a 415.
    """
    too_large = f"Request body exceeds the relay's limit of {cap} bytes."
    length = request.content_length
    if length is not None and length > cap:
        raise PayloadTooLargeError(too_large)  # said up front: answer before reading
    try:
        decoder = BodyDecoder.for_encoding(request.headers.get(hdrs.CONTENT_ENCODING, ""), cap)
    except LookupError as exc:
        raise UnsupportedMediaTypeError(
            f"Content-Encoding {exc} is not one this relay can read here; send the "
            "body as is (identity), gzip or deflate.",
            code="unsupported_content_encoding",
        ) from None
    lease = buffer_lease(request)
    content = request.content
    if decoder is None and length is not None and length <= SMALL_BODY:
        lease.grow(length)
        try:  # most API calls: one read, no copy
            return await content.readexactly(length)
        except asyncio.IncompleteReadError:
            raise BadRequestError("The request body ended before its Content-Length.") from None
    if decoder is None and length is not None:
        lease.grow(length)
        body = bytearray(length)
        view = memoryview(body)
        filled = 0
        while filled < length and (chunk := await content.readany()):
            view[filled : filled + len(chunk)] = chunk
            filled += len(chunk)
        view.release()
        if filled < length:
            raise BadRequestError("The request body ended before its Content-Length.")
        return body
    body = bytearray()
    try:
        while chunk := await content.readany():
            for piece in decoder.feed(chunk) if decoder is not None else (chunk,):
                if len(body) + len(piece) > cap:
                    raise PayloadTooLargeError(too_large)
                lease.grow(len(piece))
                body += piece
        if decoder is not None:
            decoder.end()
    except DecodedTooLargeError:
        raise PayloadTooLargeError(too_large) from None
    except zlib.error:
        assert decoder is not None
        raise BadRequestError(
            f"The request body is not valid {decoder.encoding} data (Content-Encoding).",
            code="invalid_encoding",
        ) from None
    return body


def parse_json(raw: bytes | bytearray) -> Any:
    """A client's JSON document: the one place relayd parses one. Malformed JSON,
    invalid UTF-8 and nesting deeper than :data:`MAX_JSON_DEPTH` are the client's
    mistake (400 ``invalid_json``), never a RecursionError's 500."""
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequestError(
            f"Request body is not valid JSON: {exc}.", code="invalid_json"
        ) from exc
    except RecursionError:
        raise _too_deep() from None
    # Each level needs an opening bracket: counting them (in C) spares nearly every
    # body the walk.
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _depth(document) > MAX_JSON_DEPTH:
        raise _too_deep()
    return document


def _too_deep() -> BadRequestError:
    return BadRequestError(
        f"Request body nests deeper than {MAX_JSON_DEPTH} levels, more than this relay accepts.",
        code="invalid_json",
    )


def _depth(document: Any) -> int:
    """How deeply ``document`` nests (a scalar is 0), without recursing."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(document, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            value = value.values()
        elif not isinstance(value, list):
            continue
        depth += 1
        if depth > MAX_JSON_DEPTH:
            return depth  # deep enough to refuse: no need to walk the rest
        deepest = max(deepest, depth)
        stack.extend((item, depth) for item in value if isinstance(item, dict | list))
    return deepest
