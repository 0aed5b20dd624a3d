"""A fake OpenAI API on aiohttp.web, for tests and benchmarks (loopback only).

It checks the upstream key like OpenAI does (a wrong one gets OpenAI's 401, which
echoes the key masked), records every request it sees, notices when a request is
cancelled, and behaves according to the ``model`` a request names:

=================  ============================================================
model              behaviour
=================  ============================================================
(anything)         a normal answer (JSON, or SSE with ``stream: true``)
``slow``           SSE events paced ``pace`` seconds apart (default 0.2 s)
``silent``         never answers (tests hang-up and first-byte timeouts)
``stall``          SSE head and two events, then silence (idle timeout)
``break``          SSE that stops mid-event and drops the connection
``error-<code>``   that status in OpenAI's error shape, with retry headers
=================  ============================================================

A test may script one path's answer (``fake.script("GET", "/v1/files/x", handler)``):
the handler answers instead of the table above, after the key check; ``error_answer``
builds OpenAI's error shape for it.

A WebSocket handshake to ``/v1/realtime`` goes to the fake realtime API
(``tests/fakes/realtime.py``; its own table says how it behaves).

``python -m tests.fakes.openai --port N`` runs it standalone (benchmarks).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import itertools
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fakes.realtime import FakeRealtime

Scripted = Callable[[web.Request], Awaitable[web.StreamResponse]]

UPSTREAM_KEY = "sk-canary-upstream-5f0c1d2e3b4a69788796a5b4c3d2e1f0"
_ids = itertools.count(1)


def new_id(prefix: str) -> str:
    return f"{prefix}_{next(_ids):06d}"


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes = b""
    body_size: int = 0
    parts: list[dict[str, Any]] = field(default_factory=list)
    cancelled: bool = False
    finished: bool = False


@dataclass
class StoredFile:
    id: str
    filename: str
    purpose: str
    data: bytes
    sha256: str

    def object(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.data),
            "created_at": int(time.time()),
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
        }


KEEP_BODY = 8 * 1024 * 1024  # non-multipart bodies up to this size are kept for assertions


class FakeOpenAI:
    def __init__(
        self,
        *,
        key: str = UPSTREAM_KEY,
        pace: float = 0.2,
        events: int = 5,
        record: bool = True,
        keep_bytes: int = 128 * 1024 * 1024,
    ) -> None:
        self.key = key
        self.record = record
        self.keep_bytes = keep_bytes
        self.pace = pace
        self.events = events
        self.seen: list[Seen] = []
        self.files: dict[str, StoredFile] = {}
        self.objects: dict[str, dict[str, Any]] = {}
        self._changed = asyncio.Event()
        self.realtime = FakeRealtime(key, self._notify)
        # Actions surface (tests/test_actions.py); off unless a test sets them.
        self.image_bytes: bytes | None = None  # images answer these, base64, n times
        self.video_status: str | None = None  # GET /v1/videos/{id} answers this status
        self.background: dict[str, dict[str, Any]] = {}
        self.scripted: dict[tuple[str, str], Scripted] = {}
        self.app = web.Application(client_max_size=1024**3)
        self.app.router.add_route("*", "/{tail:.*}", self._dispatch)

    # ------------------------------------------------------------------ observation

    def last(self, path_prefix: str = "") -> Seen:
        for seen in reversed(self.seen):
            if seen.path.startswith(path_prefix):
                return seen
        raise AssertionError(f"upstream saw no request under {path_prefix!r}")

    async def wait_for(self, predicate: Any, timeout: float = 2.0) -> None:
        """Wait (bounded) until ``predicate()`` is true."""
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    async def wait_cancelled(self, path_prefix: str = "", timeout: float = 1.0) -> Seen:
        await self.wait_for(
            lambda: any(s.cancelled and s.path.startswith(path_prefix) for s in self.seen),
            timeout,
        )
        return next(s for s in self.seen if s.cancelled and s.path.startswith(path_prefix))

    def _notify(self) -> None:
        self._changed.set()

    def script(self, method: str, path: str, handler: Scripted) -> None:
        """``handler`` answers ``method path`` from now on (after the key check)."""
        self.scripted[(method, path)] = handler

    # ------------------------------------------------------------------ dispatch

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        upgrade = request.headers.get("Upgrade", "").lower()
        if request.path == "/v1/realtime" and upgrade == "websocket":
            return await self.realtime.handle(request)  # records its own handshakes
        seen = Seen(request.method, request.path, dict(request.query), dict(request.headers))
        if self.record:
            self.seen.append(seen)
            self._notify()
        try:
            if request.headers.get("Authorization") != f"Bearer {self.key}":
                return _openai_401(request.headers.get("Authorization", ""))
            response = await self._route(request, seen)
            seen.finished = True
            return response
        except asyncio.CancelledError:
            seen.cancelled = True
            raise
        finally:
            self._notify()

    async def _route(self, request: web.Request, seen: Seen) -> web.StreamResponse:
        path, method = request.path, request.method
        if (scripted := self.scripted.get((method, path))) is not None:
            return await scripted(request)
        if request.content_type.startswith("multipart/"):
            body: Any = await self._read_multipart(request, seen)
        else:
            raw = await self._read_body(request, seen)
            body = _json_or_none(raw)
        model = body.get("model") if isinstance(body, dict) else None
        if isinstance(model, str) and model.startswith("error-"):
            return _error(int(model.removeprefix("error-")))
        if model == "silent":
            await asyncio.sleep(3600)
        if (answer := self._actions_surface(path, method, body)) is not None:
            return answer

        if path == "/v1/responses" and method == "POST":
            if body.get("stream"):
                return await self._sse(request, model, seen)
            return web.json_response(_response_object(body))
        if path.startswith("/v1/responses/") and method == "GET" and path.count("/") == 3:
            return web.json_response(_response_object({"id": path.rsplit("/", 1)[-1]}))
        if path == "/v1/chat/completions" and method == "POST":
            if body.get("stream"):
                usage = (body.get("stream_options") or {}).get("include_usage") is True
                return await self._chat_sse(request, usage=usage)
            return web.json_response(_chat_object(body))
        if path == "/v1/embeddings":
            inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
            return web.json_response(
                {
                    "object": "list",
                    "data": [
                        {"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]}
                        for i, _ in enumerate(inputs)
                    ],
                    "model": body["model"],
                    "usage": {"prompt_tokens": 3, "total_tokens": 3},
                }
            )
        if path == "/v1/models" and method == "GET":
            return web.json_response(
                {
                    "object": "list",
                    "data": [
                        {"id": m, "object": "model", "created": 1, "owned_by": "openai"}
                        for m in ("gpt-5", "gpt-5-mini", "text-embedding-3-small")
                    ],
                },
                headers=_openai_headers(),
            )
        if path == "/v1/files" and method == "POST":
            return self._store_file(seen)
        if path.startswith("/v1/files/"):
            return await self._file(request, path, method)
        if path.startswith("/v1/uploads"):
            return self._upload(path, body, seen)
        if path.startswith("/v1/videos/") and path.endswith("/content"):
            return await _binary(request, 256 * 1024, "video/mp4")
        if path.startswith("/v1/images/"):
            return web.json_response(
                {
                    "created": int(time.time()),
                    "data": [{"b64_json": "aGVsbG8="}],
                    "received_parts": [p["name"] for p in seen.parts],
                }
            )
        if path.startswith("/v1/vector_stores/") and path.endswith("/search"):
            return web.json_response(
                {
                    "object": "vector_store.search_results.page",
                    "search_query": [body.get("query")],
                    "data": [  # one hit that echoes the query, so tests see it arrived
                        {
                            "file_id": "file-hit",
                            "filename": "hit.txt",
                            "score": 0.9,
                            "attributes": {},
                            "content": [{"type": "text", "text": str(body.get("query"))}],
                        }
                    ],
                    "has_more": False,
                    "next_page": None,
                }
            )
        return web.json_response(self._generic(path, method, body))

    # ------------------------------------------------------------------ Actions surface
    #
    # Background responses (``background: true``) are queued at once and complete
    # after the delay the model names (``wait-<seconds>``, else at once); model
    # ``huge`` answers 300,000 characters. Images answer ``image_bytes`` and
    # ``GET /v1/videos/{id}`` answers ``video_status`` when a test sets them.

    def _actions_surface(self, path: str, method: str, body: Any) -> web.Response | None:
        if path == "/v1/responses" and method == "POST" and isinstance(body, dict):
            if body.get("background") is not True:
                return None
            response = _response_object(body)
            model = str(body.get("model", ""))
            delay = float(model.removeprefix("wait-")) if model.startswith("wait-") else 0.0
            text = "x" * 300_000 if model == "huge" else f"answer to: {body.get('input')}"
            response["output"][0]["content"][0]["text"] = text
            self.background[response["id"]] = {
                "response": response,
                "done_at": time.monotonic() + delay,
            }
            return web.json_response({**response, "status": "queued", "output": [], "usage": None})
        if path.startswith("/v1/responses/") and method == "GET" and path.count("/") == 3:
            job = self.background.get(path.rsplit("/", 1)[-1])
            if job is None:
                return None
            if time.monotonic() < job["done_at"]:
                return web.json_response(
                    {**job["response"], "status": "in_progress", "output": [], "usage": None}
                )
            return web.json_response(job["response"])
        if path.startswith("/v1/images/") and self.image_bytes is not None:
            count = int(body.get("n", 1)) if isinstance(body, dict) else 1
            encoded = base64.b64encode(self.image_bytes).decode()
            return web.json_response(
                {
                    "created": int(time.time()),
                    "data": [{"b64_json": encoded, "revised_prompt": "p"} for _ in range(count)],
                    "usage": {"input_tokens": 5, "output_tokens": 7, "total_tokens": 12},
                }
            )
        if (
            path.startswith("/v1/videos/")
            and method == "GET"
            and path.count("/") == 3
            and self.video_status is not None
        ):
            video_id = path.rsplit("/", 1)[-1]
            return web.json_response(
                {"id": video_id, "object": "video", "status": self.video_status, "progress": 100}
            )
        return None

    # ------------------------------------------------------------------ bodies

    async def _read_body(self, request: web.Request, seen: Seen) -> bytes:
        chunks = []
        async for chunk in request.content.iter_any():
            seen.body_size += len(chunk)
            if seen.body_size <= KEEP_BODY:
                chunks.append(chunk)
        seen.body = b"".join(chunks) if seen.body_size <= KEEP_BODY else b""
        return seen.body

    async def _read_multipart(self, request: web.Request, seen: Seen) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        reader = await request.multipart()
        async for part in reader:
            digest = hashlib.sha256()
            size = 0
            kept = []
            while chunk := await part.read_chunk(256 * 1024):  # type: ignore[union-attr]
                digest.update(chunk)
                size += len(chunk)
                seen.body_size += len(chunk)
                if size <= self.keep_bytes:
                    kept.append(chunk)
            data = b"".join(kept) if size <= self.keep_bytes else b""
            info = {
                "name": part.name,
                "filename": part.filename,  # type: ignore[union-attr]
                "content_type": part.headers.get("Content-Type"),
                "size": size,
                "sha256": digest.hexdigest(),
                "data": data,
            }
            seen.parts.append(info)
            if part.filename is None:  # type: ignore[union-attr]
                fields[part.name or ""] = data.decode()
        return fields

    # ------------------------------------------------------------------ streams

    async def _sse(self, request: web.Request, model: str | None, seen: Seen) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", **_openai_headers()}
        )
        await response.prepare(request)
        rid = new_id("resp")
        events = list(_response_events(rid, self.events))
        for index, event in enumerate(events):
            if model == "break" and index == len(events) // 2:
                await response.write(event[: len(event) // 2])
                assert request.transport is not None
                request.transport.abort()
                return response
            if model == "stall" and index == 2:
                await asyncio.sleep(3600)
            await response.write(event)
            if model == "slow":
                await asyncio.sleep(self.pace)
        await response.write_eof()
        return response

    async def _chat_sse(self, request: web.Request, *, usage: bool = False) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for word in ("Hello", " there", "!"):
            chunk = {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "gpt-5",
                "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}],
            }
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        if usage:  # stream_options.include_usage: one last chunk, no choices
            last = {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "gpt-5",
                "choices": [],
                "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
            }
            await response.write(f"data: {json.dumps(last)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    # ------------------------------------------------------------------ files

    def _store_file(self, seen: Seen) -> web.Response:
        file_part = next(p for p in seen.parts if p["name"] == "file")
        purpose = next(p["data"].decode() for p in seen.parts if p["name"] == "purpose")
        stored = StoredFile(
            new_id("file"), file_part["filename"], purpose, file_part["data"], file_part["sha256"]
        )
        self.files[stored.id] = stored
        return web.json_response(stored.object())

    def add_file(self, data: bytes, *, purpose: str = "assistants", filename: str = "f.bin") -> str:
        stored = StoredFile(
            new_id("file"), filename, purpose, data, hashlib.sha256(data).hexdigest()
        )
        self.files[stored.id] = stored
        return stored.id

    async def _file(self, request: web.Request, path: str, method: str) -> web.StreamResponse:
        parts = path.split("/")  # ['', 'v1', 'files', id, ('content')]
        file_id = parts[3]
        if file_id.startswith("gen-"):  # synthetic content of any size, for benchmarks
            size = int(file_id.removeprefix("gen-"))
            if len(parts) == 5 and parts[4] == "content":
                return await _binary(request, size, "application/octet-stream")
            return web.json_response(
                {
                    "id": file_id,
                    "object": "file",
                    "bytes": size,
                    "filename": f"{file_id}.bin",
                    "purpose": "assistants",
                    "created_at": 1,
                    "status": "processed",
                }
            )
        stored = self.files.get(file_id)
        if stored is None:
            return _error(404, f"No such File object: {file_id}", "invalid_request_error")
        if len(parts) == 5 and parts[4] == "content":
            return web.Response(
                body=stored.data,
                content_type="application/octet-stream",
                headers={"Content-Disposition": f'attachment; filename="{stored.filename}"'},
            )
        if method == "DELETE":
            del self.files[file_id]
            return web.json_response({"id": file_id, "object": "file", "deleted": True})
        return web.json_response(stored.object())

    def _upload(self, path: str, body: Any, seen: Seen) -> web.Response:
        parts = path.split("/")
        if len(parts) == 3:  # POST /v1/uploads
            upload = {
                "id": new_id("upload"),
                "object": "upload",
                "bytes": body["bytes"],
                "filename": body["filename"],
                "purpose": body["purpose"],
                "status": "pending",
                "created_at": int(time.time()),
                "expires_at": int(time.time()) + 3600,
                "_parts": {},
            }
            self.objects[upload["id"]] = upload
            return web.json_response(_public(upload))
        upload = self.objects[parts[3]]
        action = parts[4]
        if action == "parts":
            data_part = next(p for p in seen.parts if p["name"] == "data")
            part_id = new_id("part")
            upload["_parts"][part_id] = data_part["data"]
            return web.json_response(
                {"id": part_id, "object": "upload.part", "created_at": 1, "upload_id": upload["id"]}
            )
        if action == "complete":
            data = b"".join(upload["_parts"][pid] for pid in body["part_ids"])
            file_id = self.add_file(data, purpose=upload["purpose"], filename=upload["filename"])
            upload["status"] = "completed"
            upload["file"] = self.files[file_id].object()
            return web.json_response(_public(upload))
        upload["status"] = "cancelled"
        return web.json_response(_public(upload))

    def _generic(self, path: str, method: str, body: Any) -> dict[str, Any]:
        """CRUD-ish answers for the many list/get/create routes tests only pass through."""
        segments = [s for s in path.split("/") if s][1:]  # drop 'v1'
        kind = segments[0].rstrip("s") if segments else "object"
        if method == "GET" and len(segments) % 2 == 1:
            return {"object": "list", "data": [], "has_more": False, "path": path}
        if method == "DELETE":
            return {"id": segments[-1], "object": f"{kind}.deleted", "deleted": True}
        obj = {"id": new_id(kind), "object": kind, "created_at": int(time.time())}
        if len(segments) >= 2 and method == "GET":
            obj["id"] = segments[-1]
        if isinstance(body, dict):
            obj.update({k: v for k, v in body.items() if k not in ("id", "object")})
        obj["path"] = path
        obj["method"] = method
        return obj


# ---------------------------------------------------------------------- helpers


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else {}
    except ValueError:
        return {}


def _public(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if not k.startswith("_")}


def _openai_headers() -> dict[str, str]:
    return {
        "x-request-id": f"req_{new_id('up')}",
        "openai-processing-ms": "12",
        "openai-version": "2020-10-01",
        "openai-organization": "org-secret-canary",
        "x-ratelimit-limit-requests": "10000",
        "x-ratelimit-remaining-requests": "9999",
        "set-cookie": "__cf_bm=canary; path=/",
    }


def error_answer(status: int, message: str | None = None) -> web.Response:
    """OpenAI's error shape with ``status`` (and its retry headers), for scripts."""
    return _error(status, message)


def _error(status: int, message: str | None = None, type_: str = "api_error") -> web.Response:
    headers = {"retry-after": "7", "x-should-retry": "false", **_openai_headers()}
    code = {429: "rate_limit_exceeded"}.get(status)
    body = {
        "error": {
            "message": message or f"Simulated upstream error {status}",
            "type": "requests" if status == 429 else type_,
            "param": None,
            "code": code,
        }
    }
    return web.json_response(body, status=status, headers=headers)


def _openai_401(presented: str) -> web.Response:
    key = presented.removeprefix("Bearer ")
    masked = key[:8] + "*" * max(0, len(key) - 12) + key[-4:]
    return web.json_response(
        {
            "error": {
                "message": f"Incorrect API key provided: {masked}. You can find your API key "
                "at https://platform.openai.com/account/api-keys.",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
        },
        status=401,
        headers=_openai_headers(),
    )


def _response_object(body: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": body.get("id") or new_id("resp"),
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed",
        "model": body.get("model", "gpt-5"),
        "output": [
            {
                "id": new_id("msg"),
                "type": "message",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Hello there!", "annotations": []}],
            }
        ],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": 11,
            "output_tokens": 3,
            "total_tokens": 14,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        },
    }


def _chat_object(body: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": body.get("model", "gpt-5"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello there!"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    }


def _sse_event(kind: str, data: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()


def _response_events(rid: str, deltas: int) -> list[bytes]:
    base = _response_object({"id": rid})
    created = {**base, "status": "in_progress", "output": [], "usage": None}
    events = [
        _sse_event(
            "response.created",
            {"type": "response.created", "sequence_number": 0, "response": created},
        )
    ]
    for n in range(deltas):
        events.append(
            _sse_event(
                "response.output_text.delta",
                {
                    "type": "response.output_text.delta",
                    "sequence_number": n + 1,
                    "item_id": "msg_1",
                    "output_index": 0,
                    "content_index": 0,
                    "delta": f"tok{n} ",
                    "logprobs": [],
                },
            )
        )
    events.append(
        _sse_event(
            "response.completed",
            {"type": "response.completed", "sequence_number": deltas + 1, "response": base},
        )
    )
    return events


async def _binary(request: web.Request, size: int, content_type: str) -> web.StreamResponse:
    """``size`` deterministic bytes, streamed in 256 KiB chunks with a Content-Length."""
    response = web.StreamResponse(
        headers={"Content-Type": content_type, "Content-Length": str(size)}
    )
    await response.prepare(request)
    block = pattern_block()
    remaining = size
    while remaining:
        chunk = block[: min(remaining, len(block))]
        await response.write(chunk)
        remaining -= len(chunk)
    await response.write_eof()
    return response


def pattern_block() -> bytes:
    return bytes(range(256)) * 1024  # 256 KiB


def main() -> None:
    parser = argparse.ArgumentParser(description="fake OpenAI API on loopback")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9999)
    parser.add_argument("--key", default=UPSTREAM_KEY)
    # Opt-in knobs for bench/; the defaults are FakeOpenAI's and run_app's own.
    parser.add_argument("--events", type=int, default=5, help="SSE delta events per stream")
    parser.add_argument("--pace", type=float, default=0.2, help="seconds between 'slow' events")
    parser.add_argument("--backlog", type=int, default=128, help="listen backlog")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    parser.add_argument(
        "--no-realtime-record", action="store_true", help="keep no realtime sessions/frames"
    )
    args = parser.parse_args()
    fake = FakeOpenAI(
        key=args.key, record=False, keep_bytes=1024 * 1024, events=args.events, pace=args.pace
    )
    fake.realtime.record = not args.no_realtime_record
    loop = None
    if args.uvloop:
        import uvloop

        loop = uvloop.new_event_loop()
    web.run_app(
        fake.app,
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        backlog=args.backlog,
        loop=loop,
    )


if __name__ == "__main__":
    main()
