"""Request ids and the access log: one line per request, never a body or a secret.

The line carries the relay request id, client address, key name, method, route
template (not the concrete path: ids in paths are the client's business), status,
body bytes in and out, duration, relay overhead and upstream ``x-request-id``. When
the upstream leg failed (no connection, a timeout, a 5xx, a stream that broke) the
line is a warning and says why in ``upstream_error``: one line per failure.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import time
from typing import Final

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from relayd.errors import CLIENT_CLOSED
from relayd.routing import Handler
from relayd.state import (
    BROKEN,
    CLIENT_ADDRESS,
    ERROR_CODE,
    KEY,
    METRICS,
    OPERATION,
    PROXIES,
    REQUEST_ID,
    ROUTE,
    STREAMED,
    UPSTREAM_FAILURE,
    UPSTREAM_REQUEST_ID,
    UPSTREAM_STATUS,
    UPSTREAM_WAIT,
    USAGE_TAP,
)

__all__ = [
    "REQUEST_ID_HEADER",
    "access_middleware",
    "add_request_id",
    "scrub_aiohttp_logs",
    "setup_logging",
]

REQUEST_ID_HEADER: Final = "X-Relay-Request-Id"
_SANE_ID: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")

access_log = logging.getLogger("relayd.access")


def client_address(request: web.Request) -> str:
    """The client's address, decided once per request: the peer's own, or what a
    trusted front proxy reports (relayd/clientaddr.py)."""
    proxies = request.app[PROXIES]
    if not proxies.trusts(request.remote):  # headers from anyone else are not even parsed
        return request.remote or "unix"
    return proxies.client(
        request.remote, request.forwarded, request.headers.getall("X-Forwarded-For", ())
    )


def _request_id(request: web.Request) -> str:
    """The client's ``X-Request-Id`` when it is a sane token, else a fresh one."""
    offered = request.headers.get("X-Request-Id", "")
    if _SANE_ID.fullmatch(offered):
        return offered
    return os.urandom(16).hex()  # as random as uuid4().hex, at a quarter of the cost


@web.middleware
async def access_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request[REQUEST_ID] = _request_id(request)
    request[CLIENT_ADDRESS] = client_address(request)
    started = time.perf_counter()
    status = 500
    response: web.StreamResponse | None = None
    try:
        response = await handler(request)
        status = response.status
        return response
    except asyncio.CancelledError:
        status = CLIENT_CLOSED  # handler_cancellation: the client hung up
        raise
    finally:
        # Never an await here: a second cancellation could interrupt it and lose the
        # line (docs/design.md#accounting-in-finally-is-synchronous). A finished request is
        # accounted on the loop's next turn, after aiohttp has handed the answer to
        # the socket, so the log line does not add to the client's latency.
        duration = time.perf_counter() - started
        if status == CLIENT_CLOSED:
            _account(request, response, status, duration)
        else:
            asyncio.get_running_loop().call_soon(_account, request, response, status, duration)


def _account(
    request: web.Request, response: web.StreamResponse | None, status: int, duration: float
) -> None:
    """Metrics, token usage and the access line for one request (synchronous; see
    the caller). Reading a usage tap decodes JSON: it belongs here, off the answer's path."""
    route = request.get(ROUTE)
    group = route.group if route else "unmatched"
    overhead = _overhead(request, duration)
    metrics = request.app[METRICS]
    metrics.observe_request(group, status, duration, overhead)
    if (tap := request.get(USAGE_TAP)) is not None and (usage := tap.usage()) is not None:
        key = request.get(KEY)
        name = key.name if key is not None else "-"
        metrics.count_tokens(name, usage.model, usage.input_tokens, usage.output_tokens)
    error_kind = _upstream_error_kind(request)
    if error_kind is not None:
        metrics.upstream_errors.labels(error_kind).inc()
    # A failure of the upstream leg makes the access line itself a warning: one line
    # per failure, with the request id and key name beside the cause, for
    # `journalctl -p warning`.
    failure = _upstream_failure(request)
    level = logging.WARNING if failure is not None else logging.INFO
    if not access_log.isEnabledFor(level):
        return
    key = request.get(KEY)
    fields = {
        "request_id": request.get(REQUEST_ID),
        "client": request.get(CLIENT_ADDRESS),
        "key": key.name if key else None,
        "method": request.method,
        "route": route.path if route else None,
        "group": group,
        "status": status,
        "bytes_in": request.content_length,
        "bytes_out": _bytes_out(request, response),
        "duration_ms": round(duration * 1000, 2),
        "overhead_ms": round(overhead * 1000, 3) if overhead is not None else None,
        "upstream_request_id": request.get(UPSTREAM_REQUEST_ID),
    }
    if failure is not None:
        fields["upstream_error"] = failure
    if (operation := request.get(OPERATION)) is not None:
        fields["operation"] = operation  # what an MCP tool call ran (relayd/operations.py)
    access_log.log(level, "access", extra={"fields": fields})


def _overhead(request: web.Request, duration: float) -> float | None:
    """The relay's own share of ``duration``: neither waiting on upstream (the head,
    the gaps in a stream, a stall that ended in a break) nor on a client that reads
    slowly. None for requests that never went upstream."""
    waited = request.get(UPSTREAM_WAIT)
    streamed = request.get(STREAMED)
    if streamed is not None:
        waited = (waited or 0.0) + streamed.waited + streamed.blocked
    return max(0.0, duration - waited) if waited is not None else None


def _upstream_failure(request: web.Request) -> str | None:
    if broken := request.get(BROKEN):
        return f"stream broke {broken}"
    if (failure := request.get(UPSTREAM_FAILURE)) is not None:
        return str(failure)
    upstream_status = request.get(UPSTREAM_STATUS)
    if upstream_status is not None and upstream_status >= 500:
        return f"upstream answered HTTP {upstream_status}"
    return None


def _upstream_error_kind(request: web.Request) -> str | None:
    if request.get(BROKEN):
        return "broken_stream"
    code = request.get(ERROR_CODE)
    if code is not None and code.startswith("upstream_"):
        return str(code).removeprefix("upstream_")
    upstream_status = request.get(UPSTREAM_STATUS)
    if upstream_status is not None and upstream_status >= 500:
        return "status_5xx"
    return None


def _bytes_out(request: web.Request, response: web.StreamResponse | None) -> int:
    """Body bytes that left relayd for the client.

    A streamed answer counts what its pump wrote, less what was still queued when a
    broken stream's connection was cut; that holds however the stream ended, a
    cancelled one (the client hung up: ``response`` is None) included.
    """
    if (streamed := request.get(STREAMED)) is not None:
        return int(streamed.sent)
    if response is None:
        return 0
    if isinstance(response, web.Response) or not response.prepared:
        # A plain Response is written after the middlewares return; its size is known.
        return response.content_length or 0
    return response.body_length


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: every answer, streamed or not, carries the relay id."""
    request_id = request.get(REQUEST_ID)
    if request_id is not None:
        response.headers[REQUEST_ID_HEADER] = request_id


# --------------------------------------------------------------------------- formatting

_JOURNAL_PRIORITY: Final = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


def _printable(text: str) -> str:
    """``text`` with every character that is not printable escaped as in a Python
    literal (``\\n``, ``\\x1b``, ``\\u2028``): control characters, line and
    paragraph separators, bidi overrides. What a client sent (a decoded path, a
    query value, an exception's text) then cannot start a forged log line or
    drive the operator's terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _field(name: str, value: object) -> str:
    """``name=value``, the value quoted (logfmt) when it holds a space, ``=`` or ``"``,
    so that a client's text cannot pose as another field of the line."""
    if type(value) is int or type(value) is float:  # most of an access line: no checks
        return f"{_printable(name)}={value}"
    text = _printable(str(value))
    if not text or any(c in text for c in ' ="'):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{_printable(name)}={text}"


class _Formatter(logging.Formatter):
    def __init__(self, *, json_lines: bool, journald: bool) -> None:
        super().__init__()
        self._json = json_lines
        self._journald = journald

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, object] = getattr(record, "fields", {})
        # The pid tells workers apart; the journal would name only the supervisor,
        # which opened the stream they all write to.
        pid = os.getpid()
        if self._json:
            entry: dict[str, object] = {
                "ts": round(record.created, 3),
                "level": record.levelname.lower(),
                "pid": pid,
                "logger": record.name,
                "msg": record.getMessage(),
                **fields,
            }
            if record.exc_info:
                entry["exc"] = self.formatException(record.exc_info)
            line = json.dumps(entry, default=str)
        else:
            extra = " ".join(_field(k, v) for k, v in fields.items() if v is not None)
            message = _printable(record.getMessage())
            line = f"{record.levelname.lower():<7} [{pid}] {record.name}: {message}"
            if not self._journald:  # the journal stamps every line itself
                line = f"{_utc_stamp(record.created)} {line}"
            if extra:
                line += " " + extra
            if record.exc_info:
                # A traceback keeps its lines, each indented: only a record's first
                # line starts at the margin, whatever an exception's text holds.
                trace = self.formatException(record.exc_info).split("\n")
                line += "".join("\n    " + _printable(part) for part in trace)
        if self._journald:
            # SyslogLevelPrefix=yes (the default) turns <N> into the journal PRIORITY.
            line = f"<{_JOURNAL_PRIORITY.get(record.levelno, 6)}>{line}"
        return line


_stamped: tuple[int, str] = (-1, "")  # the last second formatted, and its text


def _utc_stamp(created: float) -> str:
    """RFC 3339 in UTC with milliseconds, e.g. ``2026-01-31T17:04:05.123Z``."""
    global _stamped
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    if _stamped[0] != seconds:  # many lines share a second: format it once
        _stamped = (seconds, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)))
    return f"{_stamped[1]}.{millis:03d}Z"


class _TurnWriter(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes the lines of one turn of the event loop in one write, at its end.

    An access line is formatted when its request is accounted (synchronously: see
    access_middleware); only the write waits, so under load one system call
    carries many lines. Outside a running loop (start, shutdown, another thread
    with nothing pending) and for warnings and worse, lines go out at once, the
    ones waiting first, so the order holds."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self._pending: list[str] = []
        self._scheduled = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._pending.append(self.format(record) + "\n")
        except Exception:
            self.handleError(record)
            return
        if record.levelno >= logging.WARNING or not self._deferred():
            self.flush()

    def _deferred(self) -> bool:
        if self._scheduled:
            return True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        loop.call_soon(self.flush)
        self._scheduled = True
        return True

    def flush(self) -> None:
        self.acquire()
        try:
            self._scheduled = False
            if self._pending:
                text = "".join(self._pending)
                self._pending.clear()
                try:
                    self.stream.write(text)
                except Exception:
                    return  # stderr gone: nothing to tell it to
            self.stream.flush()
        finally:
            self.release()


def setup_logging(fmt: str, level: str) -> None:
    """Log to stderr; ``<N>`` priority prefixes when stderr is the journal."""
    # No record needs the caller's source line, thread or process names (the
    # logging HOWTO's "Optimization" switches): each costs time on every access line.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = _TurnWriter()
    handler.setFormatter(
        _Formatter(json_lines=fmt == "json", journald=bool(os.environ.get("JOURNAL_STREAM")))
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's own access log is replaced by relayd.access.
    logging.getLogger("aiohttp.access").disabled = True


# --------------------------------------------------------------------------- aiohttp's own lines
#
# Two of aiohttp's server-side log lines quote what a client sent, relay keys included
# (docs/security.md#aiohttp-log-lines; LiteLLM #11264 and #7603 are the same leak elsewhere):
# - aiohttp.server logs a malformed request head at ERROR with a traceback whose
#   message quotes the offending line, which may be the Authorization header;
# - aiohttp.websocket warns when it selects none of the offered subprotocols and
#   lists them all, a browser's ``openai-insecure-api-key.<key>`` among them.

_KEY_PROTOCOL: Final = re.compile(r"openai-insecure-api-key\.[^'\",\s\]]*")
_BEARER: Final = re.compile(r"(?i)(bearer\s+)[^'\",\s\]]+")
_SCRUBBED_LOGGERS: Final = ("aiohttp.server", "aiohttp.websocket")


class _AiohttpLogScrubber(logging.Filter):
    """Rewrites aiohttp's records so that nothing a client sent reaches the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            # A malformed head from the network: one line, no quote of the bytes.
            remote = record.args[0] if isinstance(record.args, tuple) and record.args else "-"
            record.msg = "rejected a malformed request from %s: %s (HTTP %s)"
            record.args = (remote, type(exc).__name__, exc.code)
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            return True
        message = record.getMessage()
        scrubbed = _BEARER.sub(r"\1[redacted]", _KEY_PROTOCOL.sub("[redacted]", message))
        if scrubbed != message:
            record.msg, record.args = scrubbed, None
        return True


def scrub_aiohttp_logs() -> None:
    """Install the scrubber on aiohttp's server-side loggers (idempotent)."""
    for name in _SCRUBBED_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _AiohttpLogScrubber) for f in logger.filters):
            logger.addFilter(_AiohttpLogScrubber())
