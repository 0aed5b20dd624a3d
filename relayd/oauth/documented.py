"""How /openapi.json describes the OAuth routes: they answer in OAuth's shapes
(RFC 6749 errors, RFC 8414 / RFC 9728 documents) and with HTML pages, not in
OpenAI's; relayd's own refusals (413, 415, 431, a missing public url) stay in
OpenAI's error shape, the document's default answer."""

from __future__ import annotations

from typing import Any, Final

__all__ = [
    "AUTHORIZE_ANSWERS",
    "METADATA_ANSWERS",
    "REGISTER_ANSWERS",
    "REVOKE_ANSWERS",
    "TOKEN_ANSWERS",
]

_STRING: Final = {"type": "string"}
_OAUTH_ERROR: Final = {
    "description": "An OAuth error (RFC 6749 §5.2).",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {"error": _STRING, "error_description": _STRING},
                "required": ["error"],
            }
        }
    },
}
_PAGE: Final = {
    "description": "The login page, or a page saying why the request cannot go on.",
    "content": {"text/html": {"schema": _STRING}},
}
_JSON_OBJECT: Final = {"type": "object", "properties": {}, "additionalProperties": True}

METADATA_ANSWERS: Final[dict[str, Any]] = {
    "200": {
        "description": "The metadata document.",
        "content": {"application/json": {"schema": _JSON_OBJECT}},
    },
}
AUTHORIZE_ANSWERS: Final[dict[str, Any]] = {
    "200": _PAGE,
    "303": {
        "description": "Back to the client's redirect URI with code, state and iss, or an error.",
        "headers": {"Location": {"schema": _STRING}},
    },
    "400": _PAGE,
    "401": _PAGE,
    "403": _PAGE,
    "429": _PAGE,
}
TOKEN_ANSWERS: Final[dict[str, Any]] = {
    "200": {
        "description": "An access token, and a refresh token when offline_access was granted.",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "access_token": _STRING,
                        "token_type": _STRING,
                        "expires_in": {"type": "integer"},
                        "refresh_token": _STRING,
                        "scope": _STRING,
                    },
                    "required": ["access_token", "token_type", "expires_in"],
                }
            }
        },
    },
    "400": _OAUTH_ERROR,
    "401": _OAUTH_ERROR,
}
REVOKE_ANSWERS: Final[dict[str, Any]] = {
    "200": {"description": "Revoked, or never known (RFC 7009 §2.2: no difference is told)."},
    "400": _OAUTH_ERROR,
}
REGISTER_ANSWERS: Final[dict[str, Any]] = {
    "201": {
        "description": "The registered client (RFC 7591 §3.2.1).",
        "content": {"application/json": {"schema": _JSON_OBJECT}},
    },
    "400": _OAUTH_ERROR,
    "429": _OAUTH_ERROR,
}
