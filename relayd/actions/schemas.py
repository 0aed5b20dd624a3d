"""marshmallow (4.x) schemas for the Actions wrapper payloads and relayd's own answers.

Every wrapper body is validated here before anything goes upstream. Schemas whose
payload is passed on use ``unknown = INCLUDE``: OpenAI adds request fields often,
and a field relayd does not know still reaches upstream (as JSON, or as a form
field in the multipart it builds), where it is judged.

The same classes document the bodies in both OpenAPI documents (apispec's
marshmallow plugin), so they stay within what ChatGPT's GPT builder parses: plain
types, simple enums, ``openaiFileIdRefs`` declared as an array of strings, and
``properties`` on every object.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

from marshmallow import (
    INCLUDE,
    RAISE,
    Schema,
    ValidationError,
    fields,
    post_load,
    pre_load,
    validate,
    validates_schema,
)

__all__ = [
    "ActionAnswer",
    "ActionResponseRequest",
    "FileRef",
    "FileRefField",
    "FileUploadRequest",
    "FilesAnswer",
    "ImageEditRequest",
    "ImageGenerationRequest",
    "ImageVariationRequest",
    "ProxyRequest",
    "UploadCompleteRequest",
    "UploadCreateRequest",
    "UploadPartRequest",
    "VideoCreateRequest",
    "VideoGenerationRequest",
    "VideoRemixRequest",
]

# ChatGPT sends at most ten files per call (docs/chatgpt.md#files-in-openaifileidrefs).
MAX_REFS: Final = 10
# Older clients' duration_seconds and frames caps (docs/chatgpt.md#video-checks).
MAX_VIDEO_DURATION_S: Final = 30
MAX_VIDEO_FRAMES: Final = 300
PROXY_METHODS: Final = ("GET", "POST", "PUT", "PATCH", "DELETE")

# A bare file name: it goes into a multipart header as it is (RFC 7578 §4.2).
_FILENAME: Final = re.compile(r'[^\x00-\x1f\x7f/\\"]{1,255}')
_MEDIA_TYPE: Final = re.compile(r"[A-Za-z0-9][\w.+-]*/[A-Za-z0-9][\w.+-]*")

_REFS_HELP: Final = (
    "Files the user attached in ChatGPT; ChatGPT fills this in with download links "
    "valid for five minutes."
)


def _plain_filename(value: str) -> None:
    if not _FILENAME.fullmatch(value) or value in (".", ".."):
        raise ValidationError(
            "must be a plain file name (no path, quotes, backslashes or control characters)"
        )


def _media_type(value: str) -> None:
    if not _MEDIA_TYPE.fullmatch(value):
        raise ValidationError("must be a media type such as image/png")


def _filename(**kwargs: Any) -> fields.String:
    return fields.String(validate=_plain_filename, **kwargs)


def _media(**kwargs: Any) -> fields.String:
    return fields.String(validate=_media_type, **kwargs)


def _free_object(description: str, **kwargs: Any) -> fields.Dict:
    # "properties: {}" because ChatGPT's builder rejects an object without it.
    metadata = {"description": description, "properties": {}, "additionalProperties": True}
    return fields.Dict(metadata=metadata, **kwargs)


@dataclass(frozen=True, slots=True)
class FileRef:
    """One item of ``openaiFileIdRefs``, whichever form ChatGPT used."""

    download_link: str
    name: str | None = None
    id: str | None = None
    mime_type: str | None = None


class FileRefField(fields.Field[FileRef]):
    """An ``openaiFileIdRefs`` item: ``{name, id, mime_type, download_link}`` or a URL.

    The GPT builder only hands files over when the items are declared as strings
    (docs/chatgpt.md#files-in-openaifileidrefs), so the documents say ``string``
    while ChatGPT sends objects.
    """

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> FileRef:
        if isinstance(value, str):
            if value.startswith(("https://", "http://")):
                return FileRef(download_link=value)
            raise ValidationError(
                "is a bare id; relayd needs the file's download_link (ChatGPT sends "
                "objects with name, id, mime_type and download_link)"
            )
        if not isinstance(value, dict):
            raise ValidationError("must be an object with a download_link, or a URL")
        link = value.get("download_link")
        if not isinstance(link, str) or not link:
            raise ValidationError("has no download_link")
        name, mime_type = value.get("name"), value.get("mime_type")
        return FileRef(
            download_link=link,
            name=name if isinstance(name, str) and _FILENAME.fullmatch(name) else None,
            id=value.get("id") if isinstance(value.get("id"), str) else None,
            mime_type=mime_type if isinstance(mime_type, str) else None,
        )


def _refs(maximum: int = MAX_REFS, **kwargs: Any) -> fields.List[FileRef]:
    return fields.List(
        FileRefField(),
        validate=validate.Length(max=maximum),
        metadata={"description": _REFS_HELP},
        **kwargs,
    )


class _PassOn(Schema):
    class Meta:
        unknown = INCLUDE


# ------------------------------------------------------------------ files and uploads


class FileUploadRequest(_PassOn):
    """``/v1/actions/files/upload``: one file, from base64 or from an attached file."""

    purpose = fields.String(
        required=True,
        metadata={"description": "assistants, batch, fine-tune, vision, user_data or evals."},
    )
    filename = _filename(metadata={"description": "Required with data_base64."})
    mime_type = _media(metadata={"description": "Sniffed from the bytes when left out."})
    data_base64 = fields.String(metadata={"description": "The file's bytes, base64."})
    openaiFileIdRefs = _refs(maximum=1)

    @validates_schema
    def _one_source(self, data: dict[str, Any], **kwargs: Any) -> None:
        has_data = "data_base64" in data
        if has_data == bool(data.get("openaiFileIdRefs")):
            raise ValidationError(
                "send the file either as data_base64 or as one openaiFileIdRefs item",
                field_name="data_base64",
            )
        if has_data and "filename" not in data:
            raise ValidationError("Missing data for required field.", field_name="filename")


class _ExpiresAfter(Schema):
    anchor = fields.String(required=True, metadata={"description": "created_at"})
    seconds = fields.Integer(required=True, validate=validate.Range(min=1))


class UploadCreateRequest(_PassOn):
    purpose = fields.String(required=True)
    filename = _filename(required=True)
    bytes = fields.Integer(required=True, validate=validate.Range(min=1))
    mime_type = _media(required=True)
    expires_after = fields.Nested(_ExpiresAfter)


class UploadPartRequest(_PassOn):
    filename = _filename(load_default="part")
    mime_type = _media(load_default="application/octet-stream")
    data_base64 = fields.String(required=True, metadata={"description": "The part, base64."})


class UploadCompleteRequest(_PassOn):
    part_ids = fields.List(fields.String(), required=True, validate=validate.Length(min=1))
    md5 = fields.String()


# ------------------------------------------------------------------ images


class _ImageCommon(_PassOn):
    model = fields.String()
    n = fields.Integer(validate=validate.Range(min=1, max=10))
    size = fields.String(metadata={"description": "For example 1024x1024, or auto."})
    user = fields.String()


class ImageEditRequest(_ImageCommon):
    """``/v1/actions/images/edits``: images and an optional mask, from any source."""

    prompt = fields.String(required=True, validate=validate.Length(min=1))
    openaiFileIdRefs = _refs()
    mask_index = fields.Integer(
        validate=validate.Range(min=0),
        metadata={"description": "Which openaiFileIdRefs item (0-based) is the mask."},
    )
    image_url = fields.String(metadata={"description": "An https link to the image."})
    image_base64 = fields.String(metadata={"description": "The image, base64."})
    mask_url = fields.String()
    mask_base64 = fields.String()
    quality = fields.String()
    background = fields.String()
    output_format = fields.String()
    input_fidelity = fields.String()
    response_format = fields.String()

    @validates_schema
    def _sources(self, data: dict[str, Any], **kwargs: Any) -> None:
        refs = data.get("openaiFileIdRefs") or []
        index = data.get("mask_index")
        if index is not None and index >= len(refs):
            raise ValidationError(
                "points past the end of openaiFileIdRefs", field_name="mask_index"
            )
        masks = (index is not None) + ("mask_url" in data) + ("mask_base64" in data)
        if masks > 1:
            raise ValidationError("give one mask at most", field_name="mask_index")
        images = len(refs) - (index is not None) + ("image_url" in data)
        images += "image_base64" in data
        if images < 1:
            raise ValidationError(
                "give an image: openaiFileIdRefs, image_url or image_base64",
                field_name="openaiFileIdRefs",
            )


class ImageVariationRequest(_ImageCommon):
    """``/v1/actions/images/variations`` (dall-e-2): one square PNG."""

    openaiFileIdRefs = _refs(maximum=1)
    image_url = fields.String(metadata={"description": "An https link to the image."})
    image_base64 = fields.String(metadata={"description": "The image, base64."})
    response_format = fields.String()

    @validates_schema
    def _one_source(self, data: dict[str, Any], **kwargs: Any) -> None:
        sources = bool(data.get("openaiFileIdRefs")) + ("image_url" in data)
        sources += "image_base64" in data
        if sources != 1:
            raise ValidationError(
                "give exactly one image: openaiFileIdRefs, image_url or image_base64",
                field_name="openaiFileIdRefs",
            )


class ImageGenerationRequest(_ImageCommon):
    prompt = fields.String(required=True, validate=validate.Length(min=1))
    quality = fields.String()
    background = fields.String()
    output_format = fields.String(metadata={"description": "png, jpeg or webp."})
    moderation = fields.String()


# ------------------------------------------------------------------ videos


class _Seconds(fields.Field[str]):
    """Clip length: OpenAI wants the string "4", "8" or "12"; people write numbers."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValidationError("must be a whole number of seconds")
        text = str(value).strip()
        if not text.isdigit():
            raise ValidationError("must be a whole number of seconds")
        return str(int(text))


class VideoCreateRequest(_PassOn):
    """``/v1/actions/videos``: JSON for ``POST /v1/videos``, checked and passed on."""

    prompt = fields.String(required=True, validate=validate.Length(min=1))
    model = fields.String()
    size = fields.String()
    seconds = _Seconds(metadata={"type": "integer", "description": "4, 8 or 12."})
    input_reference = _free_object("{image_url} or {file_id} of a first frame.")


class VideoRemixRequest(_PassOn):
    prompt = fields.String(required=True, validate=validate.Length(min=1))


class VideoGenerationRequest(_PassOn):
    """``/v1/actions/videos/generations``: checked (docs/chatgpt.md#video-checks), then multipart.

    The allowed models, sizes and lengths are configuration; pass them in.
    """

    prompt = fields.String(required=True, validate=validate.Length(min=1))
    model = fields.String()
    size = fields.String()
    seconds = fields.Integer()
    duration_seconds = fields.Integer(
        validate=validate.Range(max=MAX_VIDEO_DURATION_S),
        metadata={"description": "Legacy name for seconds."},
    )
    frames = fields.Integer(
        validate=validate.Range(max=MAX_VIDEO_FRAMES),
        metadata={"description": "Legacy; checked, not sent upstream."},
    )
    data_base64 = fields.String(metadata={"description": "A reference image, base64."})
    input_reference_base64 = fields.String(metadata={"description": "Alias of data_base64."})
    filename = _filename()
    mime_type = _media()
    openaiFileIdRefs = _refs(maximum=1)

    def __init__(
        self,
        *,
        models: tuple[str, ...] = ("sora-2", "sora-2-pro"),
        sizes: tuple[str, ...] = ("720x1280", "1280x720", "1024x1792", "1792x1024"),
        seconds: tuple[int, ...] = (4, 8, 12),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.allowed = {"model": models, "size": sizes, "seconds": seconds}

    @validates_schema
    def _allowed(self, data: dict[str, Any], **kwargs: Any) -> None:
        for name, allowed in self.allowed.items():
            value = data.get(name)
            if name == "seconds" and value is None:
                value = data.get("duration_seconds")
            if value is not None and value not in allowed:
                given = name if name in data else "duration_seconds"
                raise ValidationError(
                    f"must be one of: {', '.join(str(a) for a in allowed)}", field_name=given
                )
        if "data_base64" in data and "input_reference_base64" in data:
            raise ValidationError(
                "give data_base64 or input_reference_base64, not both", field_name="data_base64"
            )

    @post_load
    def _legacy_names(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        # Older clients' names become the names upstream knows
        # (docs/chatgpt.md#video-checks); frames is only checked (POST /v1/videos has
        # no such field).
        duration = data.pop("duration_seconds", None)
        if "seconds" not in data and duration is not None:
            data["seconds"] = duration
        data.pop("frames", None)
        if "input_reference_base64" in data:
            data["data_base64"] = data.pop("input_reference_base64")
        return data


# ------------------------------------------------------------------ responses


class _Input(fields.Field[Any]):
    """A Responses ``input``: text, or a list of input items."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if isinstance(value, str) and value.strip():
            return value
        if isinstance(value, list) and value:
            return value
        raise ValidationError("must be a non-empty string or a list of input items")


class ActionResponseRequest(_PassOn):
    """A Responses request; relayd sets ``stream`` (and ``background``) itself."""

    input = _Input(
        required=True, metadata={"type": "string", "description": "What to ask the model."}
    )
    model = fields.String(metadata={"description": "Defaults to the relay's default model."})
    instructions = fields.String()
    previous_response_id = fields.String(
        metadata={"description": "Continue from an earlier answer's id."}
    )
    max_output_tokens = fields.Integer(validate=validate.Range(min=1))


# ------------------------------------------------------------------ the proxy envelope


# Clients written for an earlier relay send these names (docs/security.md#the-proxy-envelope).
_PROXY_ALIASES: Final = {
    "params": "query",
    "query_params": "query",
    "json": "body",
    "json_body": "body",
}


class ProxyRequest(Schema):
    """``/v1/proxy``: one JSON call to an allowlisted OpenAI path."""

    class Meta:
        unknown = RAISE

    method = fields.String(required=True, validate=validate.OneOf(PROXY_METHODS))
    path = fields.String(
        required=True,
        validate=validate.Length(min=1, max=2048),
        metadata={"description": "An OpenAI API path such as /v1/files or /v1/models."},
    )
    query = _free_object("Query parameters (alias: params).")
    body = _free_object("The JSON body for POST (alias: json).")

    @pre_load
    def _aliases(self, data: Any, **kwargs: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for alias, name in _PROXY_ALIASES.items():
            if alias in data:
                if name in data:
                    raise ValidationError(f"give {name} or {alias}, not both", field_name=alias)
                data[name] = data.pop(alias)
        if isinstance(data.get("method"), str):
            data["method"] = data["method"].strip().upper()
        return data


# ------------------------------------------------------------------ answers (documents)


class _Usage(Schema):
    input_tokens = fields.Integer()
    output_tokens = fields.Integer()
    total_tokens = fields.Integer()


class ActionAnswer(Schema):
    """What the Actions responses operations answer."""

    id = fields.String(metadata={"description": "The response id; poll it while in progress."})
    object = fields.String(metadata={"description": "relay.answer"})
    status = fields.String(metadata={"description": "completed, in_progress, queued, failed…"})
    model = fields.String()
    output_text = fields.String()
    usage = fields.Nested(_Usage)
    poll_after_s = fields.Float(
        metadata={"description": "Still running: call getActionResponse with id after this."}
    )
    relay_note = fields.String(metadata={"description": "Set when the relay cut the answer."})


class _InlineFile(Schema):
    name = fields.String()
    mime_type = fields.String()
    content = fields.String(metadata={"format": "byte"})


class FilesAnswer(Schema):
    """Files handed to ChatGPT, with upstream's own fields beside them."""

    class Meta:
        unknown = INCLUDE

    openaiFileResponse = fields.List(
        fields.Nested(_InlineFile),
        metadata={
            "description": "Inline files (name, mime_type, base64 content), or https "
            "links that expire within minutes."
        },
    )
    relay_note = fields.String()
