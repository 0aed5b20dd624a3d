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
import random
import re
import sys
import time
from collections.abc import Mapping
from typing import Any, Final, NamedTuple

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
    booked,
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
    # 128 bits of the process's own generator (seeded from os.urandom at start, and
    # anew in a forked child): unique like uuid4().hex without a getrandom system
    # call per request. Not a secret: a client may choose its own id.
    return f"{random.getrandbits(128):032x}"


@web.middleware
async def access_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = request[REQUEST_ID] = _request_id(request)
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
            _account(request, request_id, response, status, duration)
        else:
            asyncio.get_running_loop().call_soon(
                _account, request, request_id, response, status, duration
            )


def _account(
    request: web.Request,
    request_id: str,
    response: web.StreamResponse | None,
    status: int,
    duration: float,
) -> None:
    """Metrics, token usage and the access line for one request (synchronous; see
    the caller). Reading a usage tap decodes JSON: it belongs here, off the answer's path.
    ``request_id``: the one access_middleware gave the request (a sane token)."""
    state = booked(request)
    route = state.get(ROUTE)
    group = route.group if route else "unmatched"
    overhead = _overhead(state, duration)
    metrics = request.app[METRICS]
    metrics.observe_request(group, status, duration, overhead)
    key = state.get(KEY)
    if (tap := state.get(USAGE_TAP)) is not None and (usage := tap.usage()) is not None:
        name = key.name if key is not None else "-"
        metrics.count_tokens(name, usage.model, usage.input_tokens, usage.output_tokens)
    broken = state.get(BROKEN)
    upstream_status = state.get(UPSTREAM_STATUS)
    error_kind = _upstream_error_kind(broken, state.get(ERROR_CODE), upstream_status)
    if error_kind is not None:
        metrics.upstream_errors.labels(error_kind).inc()
    # A failure of the upstream leg makes the access line itself a warning: one line
    # per failure, with the request id and key name beside the cause, for
    # `journalctl -p warning`.
    failure = _upstream_failure(broken, state.get(UPSTREAM_FAILURE), upstream_status)
    level = logging.WARNING if failure is not None else logging.INFO
    if not access_log.isEnabledFor(level):
        return
    _log_access(
        level,
        Access(
            request_id,
            state.get(CLIENT_ADDRESS),
            key.name if key else None,
            request.method,
            route.path if route else None,
            group,
            status,
            request.content_length,
            _bytes_out(state, response),
            round(duration * 1000, 2),
            round(overhead * 1000, 3) if overhead is not None else None,
            state.get(UPSTREAM_REQUEST_ID),
            failure,
            state.get(OPERATION),  # what an MCP tool call ran (relayd/operations.py)
        ),
    )


def _overhead(state: Mapping[Any, Any], duration: float) -> float | None:
    """The relay's own share of ``duration``: neither waiting on upstream (the head,
    the gaps in a stream, a stall that ended in a break) nor on a client that reads
    slowly. None for requests that never went upstream."""
    waited = state.get(UPSTREAM_WAIT)
    streamed = state.get(STREAMED)
    if streamed is not None:
        waited = (waited or 0.0) + streamed.waited + streamed.blocked
    return max(0.0, duration - waited) if waited is not None else None


def _upstream_failure(
    broken: str | None, failure: str | None, upstream_status: int | None
) -> str | None:
    if broken:
        return f"stream broke {broken}"
    if failure is not None:
        return str(failure)
    if upstream_status is not None and upstream_status >= 500:
        return f"upstream answered HTTP {upstream_status}"
    return None


def _upstream_error_kind(
    broken: str | None, code: str | None, upstream_status: int | None
) -> str | None:
    if broken:
        return "broken_stream"
    if code is not None and code.startswith("upstream_"):
        return str(code).removeprefix("upstream_")
    if upstream_status is not None and upstream_status >= 500:
        return "status_5xx"
    return None


def _bytes_out(state: Mapping[Any, Any], response: web.StreamResponse | None) -> int:
    """Body bytes that left relayd for the client.

    A streamed answer counts what its pump wrote, less what was still queued when a
    broken stream's connection was cut; that holds however the stream ended, a
    cancelled one (the client hung up: ``response`` is None) included.
    """
    if (streamed := state.get(STREAMED)) is not None:
        return int(streamed.sent)
    if response is None:
        return 0
    if isinstance(response, web.Response) or not response.prepared:
        # A plain Response is written after the middlewares return; its size is known.
        return response.content_length or 0
    return response.body_length


class Access(NamedTuple):
    """The fields of one access line, in the line's order."""

    request_id: str
    client: str | None
    key: str | None
    method: str
    route: str | None
    group: str
    status: int
    bytes_in: int | None
    bytes_out: int
    duration_ms: float
    overhead_ms: float | None
    upstream_request_id: str | None
    failure: str | None
    operation: str | None

    def fields(self) -> dict[str, object]:
        """As a record's ``fields``: the failure named ``upstream_error``, it and the
        operation only when there is one."""
        fields: dict[str, object] = {
            "request_id": self.request_id,
            "client": self.client,
            "key": self.key,
            "method": self.method,
            "route": self.route,
            "group": self.group,
            "status": self.status,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "duration_ms": self.duration_ms,
            "overhead_ms": self.overhead_ms,
            "upstream_request_id": self.upstream_request_id,
        }
        if self.failure is not None:
            fields["upstream_error"] = self.failure
        if self.operation is not None:
            fields["operation"] = self.operation
        return fields


def _log_access(level: int, access: Access) -> None:
    """One access line: straight to relayd's own writer when nothing else would see
    the record (see _direct_writer), else through ``logging`` as a record whose
    ``fields`` are the line's (tests capture those with caplog)."""
    writer = _direct_writer(level)
    if writer is not None and not writer.form.json_lines:
        line = writer.form.access_line(time.time(), level, access)
        writer.add(line, urgent=level >= logging.WARNING)
        return
    fields = access.fields()
    if writer is not None:
        line = writer.form.compose(
            time.time(), level, logging.getLevelName(level), access_log.name, "access", fields
        )
        writer.add(line, urgent=level >= logging.WARNING)
    else:
        access_log.log(level, "access", extra={"fields": fields})


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


def _value(value: object) -> str:
    """A field's value, quoted (logfmt) when it holds a space, ``=`` or ``"``, so that
    a client's text cannot pose as another field of the line."""
    if type(value) is int or type(value) is float:  # most of an access line: no checks
        return str(value)
    text = _printable(str(value))
    if not text or " " in text or "=" in text or '"' in text:
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def _field(name: str, value: object) -> str:
    return f"{_printable(name)}={_value(value)}"


_pid = os.getpid()  # the process's, kept: a system call per line otherwise
# The start of an access line by level and form (no time stamp), and the route's
# fields by method, template and group: the parts of the line that repeat.
_access_heads: dict[tuple[int, bool], str] = {}
_route_fields: dict[tuple[str, str | None, str], str] = {}
_ROUTE_FIELDS_KEPT: Final = 1024


def _forked() -> None:
    global _pid
    _pid = os.getpid()
    _access_heads.clear()


os.register_at_fork(after_in_child=_forked)


class _Formatter(logging.Formatter):
    def __init__(self, *, json_lines: bool, journald: bool) -> None:
        super().__init__()
        self.json_lines = json_lines
        self._journald = journald

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, object] = getattr(record, "fields", {})
        trace = self.formatException(record.exc_info) if record.exc_info else None
        return self.compose(
            record.created,
            record.levelno,
            record.levelname,
            record.name,
            record.getMessage(),
            fields,
            trace,
        )

    def compose(
        self,
        created: float,
        levelno: int,
        levelname: str,
        name: str,
        message: str,
        fields: dict[str, object],
        trace: str | None = None,
    ) -> str:
        """The line of a record with these attributes (``trace``: its formatted exception)."""
        # The pid tells workers apart; the journal would name only the supervisor,
        # which opened the stream they all write to.
        pid = _pid
        if self.json_lines:
            entry: dict[str, object] = {
                "ts": round(created, 3),
                "level": levelname.lower(),
                "pid": pid,
                "logger": name,
                "msg": message,
                **fields,
            }
            if trace is not None:
                entry["exc"] = trace
            line = json.dumps(entry, default=str)
        else:
            extra = " ".join(_field(k, v) for k, v in fields.items() if v is not None)
            line = f"{levelname.lower():<7} [{pid}] {name}: {_printable(message)}"
            if not self._journald:  # the journal stamps every line itself
                line = f"{_utc_stamp(created)} {line}"
            if extra:
                line += " " + extra
            if trace is not None:
                # A traceback keeps its lines, each indented: only a record's first
                # line starts at the margin, whatever an exception's text holds.
                line += "".join("\n    " + _printable(part) for part in trace.split("\n"))
        if self._journald:
            # SyslogLevelPrefix=yes (the default) turns <N> into the journal PRIORITY.
            line = f"<{_JOURNAL_PRIORITY.get(levelno, 6)}>{line}"
        return line

    def access_line(self, created: float, levelno: int, access: Access) -> str:
        """The console line ``compose`` writes for relayd.access's fields (the order of
        Access.fields()), without building the dict: only what varies is checked.
        ``request_id`` is a sane token (_request_id's): it needs neither escape nor quote."""
        (
            request_id,
            client,
            key,
            method,
            route,
            group,
            status,
            bytes_in,
            bytes_out,
            duration_ms,
            overhead_ms,
            upstream_request_id,
            failure,
            operation,
        ) = access
        head = _access_heads.get((levelno, self._journald))
        if head is None:
            head = f"{logging.getLevelName(levelno).lower():<7} [{_pid}] relayd.access: access"
            if self._journald:
                head = f"<{_JOURNAL_PRIORITY.get(levelno, 6)}>{head}"
            _access_heads[(levelno, self._journald)] = head
        if self._journald:
            line = f"{head} request_id={request_id}"
        else:
            line = f"{_utc_stamp(created)} {head} request_id={request_id}"
        if client is not None:
            line += f" client={_value(client)}"
        if key is not None:
            line += f" key={_value(key)}"
        # The route's part of the line: method, template and group. The catch-all
        # route takes any method a client names: only short ones are kept.
        where = _route_fields.get((method, route, group))
        if where is None:
            where = f" method={_value(method)}"
            if route is not None:
                where += f" route={_value(route)}"
            where += f" group={_value(group)}"
            if len(method) <= 16 and len(_route_fields) < _ROUTE_FIELDS_KEPT:
                _route_fields[(method, route, group)] = where
        line += f"{where} status={status}"
        if bytes_in is not None:
            line += f" bytes_in={bytes_in}"
        line += f" bytes_out={bytes_out} duration_ms={duration_ms}"
        if overhead_ms is not None:
            line += f" overhead_ms={overhead_ms}"
        if upstream_request_id is not None:
            line += f" upstream_request_id={_value(upstream_request_id)}"
        if failure is not None:
            line += f" upstream_error={_value(failure)}"
        if operation is not None:
            line += f" operation={_value(operation)}"
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

    def __init__(self, form: _Formatter) -> None:
        super().__init__(sys.stderr)
        self.form = form  # the formatter setup_logging gave it (see _direct_writer)
        self.setFormatter(form)
        self._pending: list[str] = []
        self._scheduled = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.add(line, urgent=record.levelno >= logging.WARNING)

    def add(self, line: str, *, urgent: bool) -> None:
        """Queue a formatted line for the turn's write (``urgent``: write now)."""
        self.acquire()
        try:
            self._pending.append(line + "\n")
            if urgent or not self._deferred():
                self.flush()
        finally:
            self.release()

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


_writer: _TurnWriter | None = None  # the one setup_logging installed


def _direct_writer(level: int) -> _TurnWriter | None:
    """relayd's own writer, when an access record of ``level`` would reach it and
    nothing else: no other handler on the way (tests capture records with caplog;
    an application embedding relayd may log elsewhere), no filter, its formatter
    the one it was given. The line can then be written without a record, at a
    fraction of the cost of ``logging``'s path (a LogRecord, the handler chain)."""
    writer = _writer
    if writer is None or writer.formatter is not writer.form or writer.filters:
        return None
    if level < writer.level or access_log.disabled or access_log.filters:
        return None
    logger = access_log  # the walk Logger.callHandlers makes, up to the first handler
    while not logger.handlers and logger.propagate and logger.parent is not None:
        logger = logger.parent
    handlers = logger.handlers
    if len(handlers) != 1 or handlers[0] is not writer:
        return None
    return writer


def setup_logging(fmt: str, level: str) -> None:
    """Log to stderr; ``<N>`` priority prefixes when stderr is the journal."""
    global _writer
    # No record needs the caller's source line, thread or process names (the
    # logging HOWTO's "Optimization" switches): each costs time on every access line.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    _writer = _TurnWriter(
        _Formatter(json_lines=fmt == "json", journald=bool(os.environ.get("JOURNAL_STREAM")))
    )
    root = logging.getLogger()
    root.handlers[:] = [_writer]
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
