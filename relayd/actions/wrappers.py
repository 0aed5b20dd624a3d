"""The Actions wrappers: JSON in, re-encoded to what upstream expects.

ChatGPT's GPT Actions send JSON only (no multipart, no custom headers), so these
routes take files as base64, as ``openaiFileIdRefs`` download links or as an
``image_url``, validate everything (schemas.py) before anything goes upstream, and
build the multipart body upstream expects as a stream (streams/multipart.py).
Upstream's answer comes back unchanged, except that generated images move from
``b64_json`` into ``openaiFileResponse`` (handouts.py), the one way ChatGPT shows
a file.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote

from aiohttp import web

from relayd.actions.handouts import images_for_chatgpt
from relayd.actions.mime import IMAGE_TYPES
from relayd.actions.payload import (
    InputFile,
    file_from_base64,
    file_from_link,
    form_fields,
    json_answer,
    load,
    upstream_json,
)
from relayd.actions.schemas import FileRef
from relayd.errors import BadRequestError, PayloadTooLargeError, RelaydError
from relayd.relay import checked_path, json_body, relay
from relayd.state import ROUTE, SETTINGS, UPSTREAM
from relayd.streams.multipart import FilePart, TextPart, multipart_body

__all__ = [
    "add_upload_part",
    "cancel_upload",
    "create_image_variation",
    "edit_image",
    "forward_validated",
    "generate_image",
    "generate_video",
    "upload_file",
]


def _segment(request: web.Request, name: str) -> str:
    checked_path(request)  # no encoded slashes or dot segments hide in the id
    return quote(request.match_info[name], safe="")


async def forward_validated(request: web.Request) -> web.StreamResponse:
    """The wrappers that only validate: the JSON body, checked by the route's
    ``request_schema``, goes as JSON to the route's ``forwards_to`` (its path
    parameters filled in from the request's, each one percent-encoded)."""
    template = request[ROUTE].forwards_to
    assert template is not None, "routes.py names forwards_to for this handler"
    path = template.format_map({name: _segment(request, name) for name in request.match_info})
    body = await load(request)
    return await relay(request, "POST", path, data=json_body(body))


async def _send_form(
    request: web.Request, path: str, parts: list[TextPart | FilePart]
) -> web.StreamResponse:
    form = multipart_body(parts)
    headers = request.app[UPSTREAM].headers(request.headers, keep_length=False)
    headers["Content-Type"] = form.content_type
    return await relay(request, "POST", path, data=form, headers=headers)


def _refine(file: InputFile, claimed: str | None) -> InputFile:
    """Bytes with a clear signature keep the sniffed type; plain text or unknown
    bytes keep what the sender claimed (text/csv says more than text/plain)."""
    generic = ("text/plain", "application/octet-stream", "application/json")
    if claimed and file.media_type in generic:
        return InputFile(file.data, file.filename, claimed)
    return file


async def _from_ref(request: web.Request, ref: FileRef, param: str, fallback: str) -> InputFile:
    file = await file_from_link(
        request, ref.download_link, param=param, filename=ref.name, fallback_name=fallback
    )
    return _refine(file, ref.mime_type)


# ------------------------------------------------------------------ files and uploads


async def upload_file(request: web.Request) -> web.StreamResponse:
    """``POST /v1/actions/files/upload`` → multipart ``POST /v1/files`` (``file``, ``purpose``)."""
    body = await load(request)
    refs: list[FileRef] = body.pop("openaiFileIdRefs", None) or []
    filename, claimed = body.pop("filename", None), body.pop("mime_type", None)
    if refs:
        file = await _from_ref(request, refs[0], "openaiFileIdRefs[0]", "file")
        if filename:
            file = InputFile(file.data, filename, file.media_type)
    else:
        file = file_from_base64(
            request, body.pop("data_base64"), param="data_base64", filename=filename
        )
    file = _refine(file, claimed)
    parts: list[TextPart | FilePart] = [*form_fields(body), file.part("file")]
    return await _send_form(request, "/v1/files", parts)


async def add_upload_part(request: web.Request) -> web.StreamResponse:
    """``POST /v1/actions/uploads/{id}/parts`` → multipart part ``data``."""
    upload_id = _segment(request, "upload_id")
    body = await load(request)
    file = file_from_base64(
        request,
        body.pop("data_base64"),
        param="data_base64",
        filename=body.pop("filename"),
        media_type=body.pop("mime_type"),
    )
    parts: list[TextPart | FilePart] = [*form_fields(body), file.part("data")]
    return await _send_form(request, f"/v1/uploads/{upload_id}/parts", parts)


async def cancel_upload(request: web.Request) -> web.StreamResponse:
    upload_id = _segment(request, "upload_id")
    return await relay(request, "POST", f"/v1/uploads/{upload_id}/cancel")


# ------------------------------------------------------------------ images


def _image(file: InputFile, param: str, *, png: bool = False) -> InputFile:
    allowed = {"image/png"} if png else IMAGE_TYPES - {"image/gif"}
    if file.media_type not in allowed:
        raise BadRequestError(
            f"'{param}' must be a {' or '.join(sorted(allowed))} image; the bytes are "
            f"{file.media_type}.",
            code="invalid_image",
            param=param,
        )
    return file


async def _url_or_base64_image(request: web.Request, body: dict[str, Any]) -> InputFile | None:
    """The image in ``image_url`` or ``image_base64``, if ``body`` has one (popped)."""
    if "image_url" in body:
        file = await file_from_link(
            request, body.pop("image_url"), param="image_url", fallback_name="image"
        )
        return _image(file, "image_url")
    if "image_base64" in body:
        file = file_from_base64(
            request, body.pop("image_base64"), param="image_base64", fallback_name="image"
        )
        return _image(file, "image_base64")
    return None


async def _ref_images(
    request: web.Request, refs: list[FileRef], skip: int | None = None
) -> list[InputFile]:
    """The images behind ``refs`` (but ``skip``), fetched at once: ChatGPT's 45 s
    budget does not allow ten downloads one after another."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(_from_ref(request, ref, f"openaiFileIdRefs[{i}]", "image"))
                for i, ref in enumerate(refs)
                if i != skip
            ]
    except* RelaydError as failed:  # the first refusal is the answer; the rest were cancelled
        raise failed.exceptions[0] from None
    params = [f"openaiFileIdRefs[{i}]" for i in range(len(refs)) if i != skip]
    return [_image(task.result(), param) for task, param in zip(tasks, params, strict=True)]


async def _mask(request: web.Request, body: dict[str, Any]) -> InputFile | None:
    refs: list[FileRef] = body.get("openaiFileIdRefs") or []
    index = body.pop("mask_index", None)
    if index is not None:
        file = await _from_ref(request, refs[index], f"openaiFileIdRefs[{index}]", "mask")
        return _image(file, f"openaiFileIdRefs[{index}]", png=True)
    if "mask_url" in body:
        file = await file_from_link(
            request, body.pop("mask_url"), param="mask_url", fallback_name="mask"
        )
        return _image(file, "mask_url", png=True)
    if "mask_base64" in body:
        file = file_from_base64(
            request, body.pop("mask_base64"), param="mask_base64", fallback_name="mask"
        )
        return _image(file, "mask_base64", png=True)
    return None


async def _images_back(
    request: web.Request, path: str, *, data: Any, content_type: str
) -> web.StreamResponse:
    got = await upstream_json(request, "POST", path, data=data, content_type=content_type)
    if isinstance(got, web.StreamResponse):
        return got
    result = got.document
    if isinstance(result, dict):
        result = await images_for_chatgpt(request, result)
    return json_answer(result, upstream=got.answer)


async def edit_image(request: web.Request) -> web.StreamResponse:
    """``POST /v1/actions/images/edits`` → multipart ``POST /v1/images/edits``.

    Every ``openaiFileIdRefs`` item is an image (``image[]`` when there are several)
    except the one ``mask_index`` names; ``image_url``/``image_base64`` add one more.
    """
    body = await load(request)
    refs: list[FileRef] = body.get("openaiFileIdRefs") or []
    images = await _ref_images(request, refs, skip=body.get("mask_index"))
    mask = await _mask(request, body)
    body.pop("openaiFileIdRefs", None)
    extra = await _url_or_base64_image(request, body)
    if extra is not None:
        images.append(extra)
    name = "image" if len(images) == 1 else "image[]"
    parts: list[TextPart | FilePart] = [*form_fields(body)]
    parts += [image.part(name) for image in images]
    if mask is not None:
        parts.append(mask.part("mask"))
    form = multipart_body(parts)
    return await _images_back(
        request, "/v1/images/edits", data=form, content_type=form.content_type
    )


async def create_image_variation(request: web.Request) -> web.StreamResponse:
    """``POST /v1/actions/images/variations`` → multipart ``POST /v1/images/variations``."""
    body = await load(request)
    refs: list[FileRef] = body.pop("openaiFileIdRefs", None) or []
    found = await _ref_images(request, refs) if refs else []
    image = found[0] if found else await _url_or_base64_image(request, body)
    assert image is not None  # the schema insists on exactly one source
    form = multipart_body([*form_fields(body), image.part("image")])
    return await _images_back(
        request, "/v1/images/variations", data=form, content_type=form.content_type
    )


async def generate_image(request: web.Request) -> web.StreamResponse:
    """``POST /v1/actions/images/generations``: images as ``openaiFileResponse``."""
    body = await load(request)
    body.pop("stream", None)  # ChatGPT cannot read a stream of partial images
    body.pop("partial_images", None)
    return await _images_back(
        request, "/v1/images/generations", data=json_body(body), content_type="application/json"
    )


# ------------------------------------------------------------------ videos


async def generate_video(request: web.Request) -> web.StreamResponse:
    """``POST /v1/actions/videos/generations`` → multipart ``POST /v1/videos``.

    The checks of docs/chatgpt.md#video-checks (prompt; model, size and seconds from
    the configured sets; older clients' duration and frame caps; a base64 reference
    under the size cap), then the path that exists upstream (``/v1/videos``, not
    ``/v1/videos/generations``).
    """
    settings = request.app[SETTINGS]
    body = await load(
        request,
        models=settings.actions.video_models,
        sizes=settings.actions.video_sizes,
        seconds=settings.actions.video_seconds,
    )
    refs: list[FileRef] = body.pop("openaiFileIdRefs", None) or []
    filename, claimed = body.pop("filename", None), body.pop("mime_type", None)
    reference: InputFile | None = None
    if "data_base64" in body:
        reference = file_from_base64(
            request,
            body.pop("data_base64"),
            param="data_base64",
            filename=filename,
            media_type=claimed,
            fallback_name="input",
            cap=settings.actions.video_max_bytes,
        )
    elif refs:
        reference = await _from_ref(request, refs[0], "openaiFileIdRefs[0]", "input")
        if len(reference.data) > settings.actions.video_max_bytes:
            raise PayloadTooLargeError(
                f"The reference file is larger than {settings.actions.video_max_bytes} bytes.",
                code="file_too_large",
                param="openaiFileIdRefs[0]",
            )
    parts: list[TextPart | FilePart] = [*form_fields(body)]
    if reference is not None:
        parts.append(reference.part("input_reference"))
    return await _send_form(request, "/v1/videos", parts)
