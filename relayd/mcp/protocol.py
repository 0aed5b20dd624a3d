"""JSON-RPC 2.0 as MCP's Streamable HTTP carries it: one message per POST.

- :func:`parse` turns a body into one :class:`Message`, or raises :class:`RpcError`
  carrying the JSON-RPC code and the HTTP status the transport answers with
  (malformed JSON -32700 and batches -32600 are HTTP 400: batching was removed in
  protocol 2025-06-18).
- :class:`Era` is one generation of the protocol: the versions it speaks and its
  method table. relayd serves the legacy era (2025-06-18 and 2025-11-25:
  ``initialize``, ``ping``, ``tools/list``, ``tools/call``). The stateless
  2026-07-28 protocol (``server/discover``, per-request ``_meta`` version, header
  checks, ``resultType``) is another :class:`Era` with a table of its own, to be
  chosen per request behind a config flag once it is served whole; until then
  ``server/discover`` is an unknown method here, which ChatGPT takes as "fall back
  to ``initialize``" (docs/chatgpt.md#chatgpt-apps).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "METHOD_NOT_FOUND",
    "PARSE_ERROR",
    "Era",
    "Message",
    "RpcError",
    "error_message",
    "parse",
    "result_message",
]

PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
METHOD_NOT_FOUND: Final = -32601
INVALID_PARAMS: Final = -32602
INTERNAL_ERROR: Final = -32603

RequestId = str | int


class RpcError(Exception):
    """A JSON-RPC error answer, and the HTTP status its POST gets (200 unless the
    message itself could not be taken)."""

    def __init__(
        self, code: int, message: str, *, http_status: int = 200, data: Any = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status
        self.data = data


@dataclass(frozen=True, slots=True)
class Message:
    """One client message: a request (``id`` set), a notification, or a response
    to something the server asked (relayd asks nothing; it is accepted and dropped)."""

    method: str | None
    id: RequestId | None
    params: Mapping[str, Any]

    @property
    def is_request(self) -> bool:
        return self.method is not None and self.id is not None


def _invalid(text: str) -> RpcError:
    return RpcError(INVALID_REQUEST, text, http_status=400)


def parse(document: Any) -> Message:
    """Check one parsed JSON body against JSON-RPC 2.0 (batches refused)."""
    if isinstance(document, list):
        raise _invalid("Batches are not supported: send one JSON-RPC message per request.")
    if not isinstance(document, dict) or document.get("jsonrpc") != "2.0":
        raise _invalid('Not a JSON-RPC 2.0 message (it needs "jsonrpc": "2.0").')
    message_id = document.get("id")
    if "id" in document and (isinstance(message_id, bool) or not isinstance(message_id, str | int)):
        raise _invalid("A request id must be a string or an integer.")
    method = document.get("method")
    if method is None:
        if "result" in document or "error" in document:
            return Message(None, message_id, {})  # a response from the client
        raise _invalid('A JSON-RPC message needs a "method".')
    if not isinstance(method, str):
        raise _invalid('"method" must be a string.')
    params = document.get("params", {})
    if not isinstance(params, dict):
        raise RpcError(INVALID_PARAMS, '"params" must be an object.', http_status=400)
    return Message(method, message_id, params)


def result_message(message_id: RequestId | None, result: Mapping[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": message_id, "result": result}


def error_message(message_id: RequestId | None, error: RpcError) -> dict[str, Any]:
    body: dict[str, Any] = {"code": error.code, "message": error.message}
    if error.data is not None:
        body["data"] = error.data
    return {"jsonrpc": "2.0", "id": message_id, "error": body}


Method = Callable[[Any, Mapping[str, Any]], Awaitable[Mapping[str, Any]]]


@dataclass(frozen=True, slots=True)
class Era:
    """One generation of the protocol: its versions (newest first) and its methods.

    A method takes the call's context (the transport's) and the params; it returns
    the result object or raises :class:`RpcError`.
    """

    versions: tuple[str, ...]
    methods: Mapping[str, Method]

    @property
    def newest(self) -> str:
        return self.versions[0]

    def negotiate(self, asked: Any) -> str:
        """The version ``initialize`` answers: the client's if spoken, else the newest."""
        return asked if asked in self.versions else self.newest

    def method(self, name: str) -> Method:
        found = self.methods.get(name)
        if found is None:
            raise RpcError(METHOD_NOT_FOUND, f"Method not found: {name}")
        return found
