"""The ``[realtime]`` policy, one for every route under ``/v1/realtime``.

It governs more than the WebSocket bridge: ``client_secrets``, ``calls*``,
translation secrets and the legacy sessions mint ``ek_`` secrets and start calls
that then run against OpenAI directly, outside relayd's keys, logs and limits.
So, on every realtime route and on any ``/v1/realtime`` path the catch-all
would pass:

- realtime disabled is a 403 (for the bridge, before the upgrade);
- every model the request names (query, JSON body, ``session.model``, a call's
  ``session`` part) must be one of ``allowed_models`` when that list is set; a
  realtime session that names none gets ``default_model``, so upstream's own
  default cannot slip past the list; a path relayd does not know how to read is
  refused while the list is set;
- the bridge's query names exactly one of ``model``, ``call_id``, ``intent``,
  once, and nothing else, as the official clients build it (openai-node
  ``buildRealtimeURL``). A ``call_id`` session joins a call whose model was
  checked when the call was created or accepted through relayd (or fixed by a
  secret relayd minted), so it is not refused when models are restricted.

Everything here decides; the handlers in ``realtime.py`` relay.
"""

from __future__ import annotations

import json
from typing import Any, Final

from aiohttp import BodyPartReader, MultipartWriter, hdrs, web
from aiohttp.payload import BytesPayload

from relayd.config import Settings
from relayd.errors import (
    BadRequestError,
    PayloadTooLargeError,
    PermissionDeniedError,
    UnsupportedMediaTypeError,
)
from relayd.memory import buffer_lease
from relayd.state import SETTINGS

__all__ = [
    "SELECTORS",
    "admit",
    "admit_unlisted",
    "check_model",
    "check_named_models",
    "checked_call_form",
    "checked_query",
    "fill_default_model",
    "is_realtime_path",
    "refuse_if_disabled",
]

# What names a bridge session (openai-node buildRealtimeURL sends exactly one).
SELECTORS: Final = ("model", "call_id", "intent")


def checked_query(request: web.Request, settings: Settings) -> tuple[str, str]:
    """The one session selector the query names, and its value; anything else is a 400."""
    query = request.query
    unknown = sorted({name for name in query if name not in SELECTORS})
    if unknown:
        raise BadRequestError(
            f"Unknown query parameter {unknown[0]!r}; the realtime query names one of "
            "model, call_id or intent, and nothing else.",
            code="invalid_realtime_query",
            param=unknown[0],
        )
    named = [name for name in SELECTORS if name in query]
    if len(named) != 1:
        found = " and ".join(named) if named else "none"
        raise BadRequestError(
            f"Name exactly one of model, call_id or intent in the query (found {found}).",
            code="invalid_realtime_query",
        )
    name = named[0]
    values = query.getall(name)
    if len(values) != 1 or not values[0].strip():
        raise BadRequestError(
            f"The query parameter {name!r} must be given once, with a value.",
            code="invalid_realtime_query",
            param=name,
        )
    if name == "model":
        check_model(values[0], settings)
    return name, values[0]


def check_model(model: object, settings: Settings) -> None:
    if not isinstance(model, str) or not model:
        raise BadRequestError("'model' must be a non-empty string.", param="model")
    allowed = settings.realtime.allowed_models
    if allowed and model not in allowed:
        raise BadRequestError(
            f"The model {model!r} is not allowed for realtime on this relay; "
            f"allowed: {', '.join(allowed)}.",
            code="model_not_allowed",
            param="model",
        )


def is_realtime_path(path: str) -> bool:
    """Whether a (decoded) path is one the realtime policy governs."""
    lowered = path.lower()  # case-insensitive, like the path policy
    return lowered == "/v1/realtime" or lowered.startswith("/v1/realtime/")


def refuse_if_disabled(settings: Settings) -> None:
    if not settings.realtime.enabled:
        raise PermissionDeniedError("Realtime is disabled on this relay.", code="realtime_disabled")


def admit(request: web.Request) -> Settings:
    """The checks every realtime REST route makes first: enabled, query models allowed.

    Any query parameter upstream might read as the model counts (``Model``,
    ``model[]``), each value checked.
    """
    settings = request.app[SETTINGS]
    refuse_if_disabled(settings)
    for name, value in request.query.items():
        if name.lower().rstrip("[]") == "model":
            check_model(value, settings)
    return settings


def admit_unlisted(request: web.Request) -> None:
    """A ``/v1/realtime`` path outside the route table (the catch-all): refused when
    realtime is disabled, and while models are restricted, since relayd does not
    know where such a route names its model."""
    settings = admit(request)
    if settings.realtime.allowed_models:
        raise PermissionDeniedError(
            f"{request.path} is not a realtime route this relay can check against "
            "[realtime] allowed_models.",
            code="realtime_route_not_checked",
        )


def check_named_models(payload: dict[str, Any], settings: Settings) -> None:
    """Every model a JSON body names, at the top or in its ``session``."""
    session = payload.get("session")
    for holder in (payload, session):
        if isinstance(holder, dict) and "model" in holder:
            check_model(holder["model"], settings)


def fill_default_model(session: dict[str, Any], settings: Settings) -> None:
    """A realtime session naming no model gets the default (transcription sessions
    name no realtime model)."""
    if session.get("type", "realtime") == "realtime" and "model" not in session:
        session["model"] = settings.realtime.default_model


async def checked_call_form(request: web.Request, settings: Settings) -> MultipartWriter:
    """A call form (``sdp`` and ``session`` parts) read under the JSON cap, its
    ``session`` checked and completed, rebuilt for upstream: upstream gets exactly
    the parts relayd checked, so no parser difference can hide a second session."""
    cap = settings.limits.max_json_bytes
    size = 0
    parts: list[tuple[str, str | None, str, bytes]] = []
    encoding = request.headers.get(hdrs.CONTENT_ENCODING, "identity").strip().lower()
    if encoding != "identity":
        # The form is parsed as it arrives; a compressed one would need decoding first.
        raise UnsupportedMediaTypeError(
            "Send the call form without a Content-Encoding.",
            code="unsupported_content_encoding",
        )
    lease = buffer_lease(request)  # the parts are held whole: reserved as they arrive
    reader = await request.multipart()
    async for part in reader:
        if not isinstance(part, BodyPartReader) or not part.name:
            raise BadRequestError(
                "Every part of a call form needs a name.", code="invalid_multipart"
            )
        held = bytearray()
        while chunk := await part.read_chunk():
            size += len(chunk)
            if size > cap:
                raise PayloadTooLargeError(f"The call form exceeds {cap} bytes.")
            lease.grow(len(chunk))
            held += chunk
        kind = part.headers.get(hdrs.CONTENT_TYPE, "text/plain")
        parts.append((part.name, part.filename, kind, bytes(held)))
    sessions = [i for i, part in enumerate(parts) if part[0] == "session"]
    if len(sessions) != 1:
        raise BadRequestError(
            "A call form needs exactly one 'session' part naming the model.",
            code="model_required",
            param="model",
        )
    name, filename, kind, raw = parts[sessions[0]]
    try:
        session = json.loads(raw)
    except ValueError as exc:
        raise BadRequestError("The 'session' part is not valid JSON.", code="invalid_json") from exc
    if not isinstance(session, dict):
        raise BadRequestError("The 'session' part must be a JSON object.", code="invalid_json")
    check_named_models(session, settings)
    fill_default_model(session, settings)
    parts[sessions[0]] = (name, filename, "application/json", json.dumps(session).encode())
    form = MultipartWriter("form-data")
    for name, filename, kind, data in parts:
        payload = BytesPayload(data, content_type=kind)
        if filename is None:
            payload.set_content_disposition("form-data", name=name)
        else:
            payload.set_content_disposition("form-data", name=name, filename=filename)
        payload.headers.popall(hdrs.CONTENT_LENGTH, None)
        form.append_payload(payload)
    return form
