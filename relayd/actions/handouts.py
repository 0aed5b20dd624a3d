"""Files handed back to ChatGPT as ``openaiFileResponse``, and the links behind them.

ChatGPT shows a file from an action only through ``openaiFileResponse`` (at most ten
files of at most 10 MB): inline ``{name, mime_type, content}`` objects, or https URLs it
fetches within 10 s, which must answer with ``Content-Type`` and ``Content-Disposition``
(docs/chatgpt.md#files-out-openaifileresponse). relayd inlines files when every one is
small (``[actions] inline_max_bytes``) and together they leave the answer well under the
character limit; otherwise every file becomes a signed link (handout_store.py), one form
per answer, never a mix.
"""

from __future__ import annotations

import base64
import binascii
import mimetypes
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote

from aiohttp import web

from relayd.actions.handout_store import Claims
from relayd.actions.mime import EXTENSIONS, sniff
from relayd.actions.payload import json_answer, upstream_call, upstream_json
from relayd.errors import (
    BadRequestError,
    NotFoundError,
    PayloadTooLargeError,
    PublicUrlNotSetError,
)
from relayd.relay import (
    checked_path,
    downloadable_file,
    exchange,
    read_capped,
    send_back,
    stream_back,
)
from relayd.state import FILES_AS_LINKS, HANDOUTS, KEY, SETTINGS, TABLE, UPSTREAM

__all__ = [
    "Handout",
    "download",
    "file_content_for_chatgpt",
    "hand_out",
    "images_for_chatgpt",
    "origin",
    "video_content_for_chatgpt",
]

# The route that serves the links (declared in routes.py; found, not repeated).
DOWNLOAD_OPERATION: Final = "downloadHandout"
CHATGPT_MAX_FILES: Final = 10
CHATGPT_MAX_FILE_BYTES: Final = 10 * 1024 * 1024  # "Each file may be up to 10 MB"
_VARIANTS: Final = {
    "video": ("video/mp4", ".mp4"),
    "thumbnail": ("image/webp", ".webp"),
    "spritesheet": ("image/jpeg", ".jpg"),
}


@dataclass(frozen=True, slots=True)
class Handout:
    """One file for ChatGPT: bytes relayd holds, or an upstream object to link to."""

    name: str
    media_type: str
    data: bytes | None = None
    claims: Claims | None = None


def origin(request: web.Request) -> str:
    """Where ChatGPT reaches relayd: ``RELAYD_PUBLIC_URL``, and nothing else.

    Never the request's ``Host``: a client would choose where the link points
    (issue 11, item 7). Without a public url no link can be made; that is the
    operator's to fix, so a 500 whose message says how.
    """
    public = request.app[SETTINGS].server.public_url
    if not public:
        raise PublicUrlNotSetError(
            "This relay cannot hand out download links: its public url is not set. "
            "The operator must set RELAYD_PUBLIC_URL to relayd's https origin.",
        )
    return public.rstrip("/")


async def hand_out(request: web.Request, items: list[Handout]) -> list[Any]:
    """``openaiFileResponse`` for ``items``: all inline, or all signed links."""
    settings = request.app[SETTINGS]
    store = request.app[HANDOUTS]
    download_route = request.app[TABLE].by_operation_id(DOWNLOAD_OPERATION)
    image_cap = request.get(FILES_AS_LINKS)
    if image_cap is not None:
        return await _linked(request, items, image_cap)
    inline_budget = settings.actions.max_answer_chars // 2
    sizes = [len(i.data) if i.data is not None else None for i in items]
    if all(s is not None and s <= settings.actions.inline_max_bytes for s in sizes) and (
        sum((s or 0) * 4 // 3 + 4 for s in sizes) <= inline_budget
    ):
        return [
            {
                "name": i.name,
                "mime_type": i.media_type,
                "content": base64.b64encode(i.data or b"").decode("ascii"),
            }
            for i in items
        ]
    base = origin(request)  # before anything is stored for links that cannot be made
    links = []
    for item in items:
        claims = item.claims
        if claims is None:
            blob = await store.keep(item.data or b"")
            claims = Claims("blob", blob, item.name, item.media_type)
        token = store.token(claims, request.get(KEY))
        links.append(base + download_route.path.replace("{token}", token))
    return links


async def _linked(request: web.Request, items: list[Handout], image_cap: int) -> list[Any]:
    """Files for a face that shows links and images (MCP): every file as a signed
    link, each image up to ``image_cap`` bytes with its bytes too. Without a public
    url an image still comes back inline; anything else needs the link."""
    store = request.app[HANDOUTS]
    download_route = request.app[TABLE].by_operation_id(DOWNLOAD_OPERATION)
    public = request.app[SETTINGS].server.public_url
    files: list[Any] = []
    for item in items:
        entry: dict[str, Any] = {"name": item.name, "mime_type": item.media_type}
        small_image = (
            item.data is not None
            and item.media_type.startswith("image/")
            and len(item.data) <= image_cap
        )
        if small_image:
            entry["content"] = base64.b64encode(item.data or b"").decode("ascii")
        if public or not small_image:
            claims = item.claims
            if claims is None:
                blob = await store.keep(item.data or b"")
                claims = Claims("blob", blob, item.name, item.media_type)
            token = store.token(claims, request.get(KEY))
            entry["url"] = origin(request) + download_route.path.replace("{token}", token)
        files.append(entry)
    return files


# ------------------------------------------------------------------ images


async def images_for_chatgpt(request: web.Request, answer: dict[str, Any]) -> dict[str, Any]:
    """An Images API answer with each ``b64_json`` moved into ``openaiFileResponse``.

    Everything else upstream said (``created``, ``usage``, ``revised_prompt``…) stays;
    each image entry names its file instead of carrying megabytes of base64.
    """
    data = answer.get("data")
    if not isinstance(data, list):
        return answer
    requested = answer.get("output_format")
    fallback = f"image/{requested}" if isinstance(requested, str) else "image/png"
    items: list[Handout] = []
    for index, entry in enumerate(data):
        if not isinstance(entry, dict) or not isinstance(entry.get("b64_json"), str):
            continue
        try:
            raw = base64.b64decode(entry.pop("b64_json"))
        except (binascii.Error, ValueError):
            entry["relay_note"] = "upstream sent an image that is not valid base64"
            continue
        media_type = sniff(raw)
        if not media_type.startswith("image/"):
            media_type = fallback
        name = f"image-{index + 1}{EXTENSIONS.get(media_type, '.png')}"
        entry["file"] = name
        items.append(Handout(name, media_type, data=raw))
    if items:
        answer["openaiFileResponse"] = await hand_out(request, items[:CHATGPT_MAX_FILES])
    return answer


# ------------------------------------------------------------------ upstream files


def _guess_type(filename: str) -> str:
    guessed, _ = mimetypes.guess_type(filename, strict=False)
    return guessed or "application/octet-stream"


async def file_content_for_chatgpt(request: web.Request) -> web.StreamResponse:
    """``GET /v1/actions/files/{file_id}/content``: a stored file, for ChatGPT.

    The metadata comes first, through the same check as the pass-through
    (``user_data`` files are refused, and only a clear answer is a verdict), and
    files over ChatGPT's 10 MB are refused with a clear 413.
    """
    checked_path(request)
    file_id = request.match_info["file_id"]
    settings = request.app[SETTINGS]
    meta = await downloadable_file(request, file_id)
    if isinstance(meta, web.StreamResponse):
        return meta
    size = meta.get("bytes") if isinstance(meta.get("bytes"), int) else None
    if size is not None and size > CHATGPT_MAX_FILE_BYTES:
        raise PayloadTooLargeError(
            f"The file is {size} bytes; ChatGPT accepts files up to 10 MB.",
            code="file_too_large_for_chatgpt",
            param="file_id",
        )
    name = _safe_name(str(meta.get("filename") or file_id))
    item = Handout(name, _guess_type(name), claims=Claims("file", file_id, name, _guess_type(name)))
    if size is not None and size <= settings.actions.inline_max_bytes:
        path = f"/v1/files/{quote(file_id, safe='')}/content"
        async with upstream_call(request, "GET", path) as content:
            if content.status >= 400:
                return await send_back(request, content)
            raw = await read_capped(content.content, settings.actions.inline_max_bytes)
        sniffed = sniff(raw)
        kind = item.media_type if sniffed == "application/octet-stream" else sniffed
        item = Handout(name, kind, data=raw, claims=item.claims)
    files = await hand_out(request, [item])
    return json_answer(
        {
            "object": "relay.file_content",
            "file": {k: meta.get(k) for k in ("id", "filename", "bytes", "purpose")},
            "openaiFileResponse": files,
        }
    )


async def video_content_for_chatgpt(request: web.Request) -> web.StreamResponse:
    """``GET /v1/actions/videos/{video_id}/content``: a link to a finished video."""
    checked_path(request)
    video_id = request.match_info["video_id"]
    variant = request.query.get("variant", "video")
    if variant not in _VARIANTS:
        raise BadRequestError(
            f"variant must be one of: {', '.join(_VARIANTS)}.",
            code="invalid_value",
            param="variant",
        )
    got = await upstream_json(request, "GET", f"/v1/videos/{quote(video_id, safe='')}")
    if isinstance(got, web.StreamResponse):
        return got
    meta = got.document
    status = meta.get("status") if isinstance(meta, dict) else None
    summary = {"id": video_id, "status": status, "progress": meta.get("progress")}
    if status != "completed":
        return json_answer(
            {**summary, "relay_note": "The video is not ready; ask again in a minute."}
        )
    media_type, extension = _VARIANTS[variant]
    name = f"{video_id}-{variant}{extension}" if variant != "video" else f"{video_id}{extension}"
    claims = Claims("video", video_id, name, media_type, variant)
    files = await hand_out(request, [Handout(name, media_type, claims=claims)])
    return json_answer({**summary, "openaiFileResponse": files})


# ------------------------------------------------------------------ the links


def _safe_name(name: str) -> str:
    name = unicodedata.normalize("NFC", name).replace("/", "_").replace("\\", "_")
    return re.sub(r"[\x00-\x1f\x7f\"]", "", name).strip() or "file"


def content_disposition(filename: str) -> str:
    """``attachment`` with an ASCII fallback and the exact name (RFC 6266 §4.3)."""
    ascii_name = filename.encode("ascii", "replace").decode().replace("?", "_")
    ascii_name = re.sub(r'[\\"\x00-\x1f\x7f]', "_", ascii_name)
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(filename, safe='')}"


async def download(request: web.Request) -> web.StreamResponse:
    """``GET /v1/actions/downloads/{token}``: what a signed link names, with its labels.

    No relay key: the token is the credential (HMAC-signed, expiring). Upstream
    objects stream through chunk by chunk; stored blobs come from the blob store
    (a file on this machine, or bytes from the shared store).
    """
    claims = request.app[HANDOUTS].claims(request.match_info["token"])
    labels = {
        "Content-Type": claims.media_type,
        "Content-Disposition": content_disposition(claims.filename),
        "Cache-Control": "private, no-store",
        "X-Content-Type-Options": "nosniff",
    }
    if claims.kind == "blob":
        blob = await request.app[HANDOUTS].blob(claims.ref)
        if isinstance(blob, bytes):  # from the shared store: at most 10 MB, held whole
            return web.Response(body=blob, headers=labels)
        return web.FileResponse(blob, headers=labels)
    if claims.kind == "file":
        path_qs = f"/v1/files/{quote(claims.ref, safe='')}/content"
    elif claims.kind == "video":
        path_qs = f"/v1/videos/{quote(claims.ref, safe='')}/content?variant={claims.variant}"
    else:
        raise NotFoundError("This download link is not valid.", code="link_invalid")
    upstream = request.app[UPSTREAM]
    headers = upstream.headers({"Accept": "*/*"})
    async with exchange(request, "GET", path_qs, headers=headers) as answer:
        if answer.status >= 400:
            return await send_back(request, answer)
        response = web.StreamResponse(headers=labels)
        if answer.content_length is not None and "Content-Encoding" not in answer.headers:
            response.content_length = answer.content_length
        await response.prepare(request)
        if not await stream_back(request, answer, response):
            return response
        await response.write_eof()
        return response
