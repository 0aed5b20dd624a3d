"""OAuth clients: client ID metadata documents and dynamic registration.

Two ways a client becomes known, both public clients (no secret; PKCE S256 proves
the code's owner):

- a *client ID metadata document* (draft-ietf-oauth-client-id-metadata-document):
  the client_id is an https URL on the operator's allowlist (ChatGPT's by
  default); relayd fetches it through a function it is handed (this package never
  opens a connection), and trusts only what the document itself says: its
  ``client_id`` must be its own URL, the redirect URIs come from it alone;
- *dynamic registration* (RFC 7591, ``POST /oauth/register``): redirect URIs must be
  https, or http on a loopback address (RFC 8252 §7.3, native apps).
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final
from urllib.parse import urlsplit

from relayd.loopback import is_loopback_name
from relayd.oauth.errors import LoginPageError, OAuthError
from relayd.store.grants import ClientRecord

__all__ = [
    "DocumentFetchError",
    "FetchDocument",
    "client_from_document",
    "document_allowed",
    "fetch_document_client",
    "looks_like_document_url",
    "redirect_host",
    "register_client",
    "registration_answer",
]

# Fetches a document's bytes, or raises DocumentFetchError saying why not.
FetchDocument = Callable[[str], Awaitable[bytes]]

# The one method relayd offers: public clients, proven by PKCE. A document lists
# what its client can do (ChatGPT's: private_key_jwt and none) in the plural field;
# the singular one is a legacy field some servers misread (kentcdodds/kody#1905).
AUTH_METHOD: Final = "none"
_SEGMENT: Final = "[A-Za-z0-9_-]+"
_MAX_NAME: Final = 200
_MAX_REDIRECTS: Final = 10


class DocumentFetchError(Exception):
    """A client's metadata document could not be fetched; the text says why."""


def document_allowed(url: str, patterns: Sequence[str]) -> bool:
    """Whether ``url`` matches an allowlisted pattern, where ``*`` is one path
    segment (so ``/oauth/*/client.json`` never matches ``/oauth/a/b/client.json``)."""
    for pattern in patterns:
        regex = _SEGMENT.join(re.escape(part) for part in pattern.split("*"))
        if re.fullmatch(regex, url):
            return True
    return False


def looks_like_document_url(client_id: str) -> bool:
    return client_id.startswith("https://")


def client_from_document(url: str, data: bytes) -> ClientRecord:
    """The client a fetched metadata document describes; a LoginPageError when it
    cannot be trusted."""

    def refuse(why: str) -> LoginPageError:
        return LoginPageError(f"The client's metadata document ({url}) {why}.")

    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise refuse("is not JSON") from None
    if not isinstance(document, dict):
        raise refuse("is not a JSON object")
    if document.get("client_id") != url:
        # The document must name itself, or one host could speak for another.
        raise refuse("names another client_id than its own URL")
    if "client_secret" in document or "client_secret_expires_at" in document:
        raise refuse("carries a client secret, which a public document must not")
    methods = document.get("token_endpoint_auth_methods_supported", [AUTH_METHOD])
    if not isinstance(methods, list) or AUTH_METHOD not in methods:
        raise refuse(f"does not list the token endpoint auth method {AUTH_METHOD!r}")
    uris = document.get("redirect_uris")
    if not _string_list(uris) or not uris:
        raise refuse("lists no redirect_uris")
    for uri in uris:
        if problem := _redirect_problem(uri, allow_loopback_http=False):
            raise refuse(f"lists the redirect URI {uri!r}, which relayd refuses: {problem}")
    return ClientRecord(url, "document", _name(document, url), tuple(uris), AUTH_METHOD)


def register_client(document: Any) -> ClientRecord:
    """A client registered by RFC 7591 metadata; OAuthError (§3.2.2) if refused."""
    if not isinstance(document, dict):
        raise OAuthError("invalid_client_metadata", "The body must be a JSON object.")
    uris = document.get("redirect_uris")
    if not _string_list(uris) or not uris or len(uris) > _MAX_REDIRECTS:
        raise OAuthError(
            "invalid_redirect_uri",
            f"redirect_uris must list 1 to {_MAX_REDIRECTS} redirect URIs.",
        )
    for uri in uris:
        problem = _redirect_problem(uri, allow_loopback_http=True)
        if problem:
            raise OAuthError("invalid_redirect_uri", f"Redirect URI {uri!r}: {problem}.")
    for field, allowed in (
        ("grant_types", {"authorization_code", "refresh_token"}),
        ("response_types", {"code"}),
    ):
        listed = document.get(field, [])
        if not _string_list(listed) or not set(listed) <= allowed:
            raise OAuthError(
                "invalid_client_metadata",
                f"{field} may list only {', '.join(sorted(allowed))}.",
            )
    client_id = "rlyc_" + secrets.token_urlsafe(16)
    # Whatever method was asked for, the client is public (RFC 7591 §3.2.1 lets the
    # server replace a value; the answer says which one holds).
    return ClientRecord(
        client_id, "registered", _name(document, client_id), tuple(uris), AUTH_METHOD, time.time()
    )


def registration_answer(client: ClientRecord) -> dict[str, Any]:
    """RFC 7591 §3.2.1: the registered metadata, as relayd will hold the client to it."""
    return {
        "client_id": client.client_id,
        "client_id_issued_at": int(client.saved_at),
        "client_name": client.name,
        "redirect_uris": list(client.redirect_uris),
        "token_endpoint_auth_method": client.auth_method,
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
    }


def _string_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _name(document: dict[str, Any], fallback: str) -> str:
    name = document.get("client_name")
    if isinstance(name, str) and name.strip():
        return name.strip()[:_MAX_NAME]
    return fallback


def _redirect_problem(uri: str, *, allow_loopback_http: bool) -> str | None:
    """Why ``uri`` cannot be a redirect URI, or None (RFC 6749 §3.1.2, RFC 8252 §7.3)."""
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        return "not a URL"
    if parts.fragment or "#" in uri:
        return "a redirect URI must not have a fragment"
    if not parts.hostname:
        return "not an absolute URL"
    if parts.username is not None or parts.password is not None:
        return "a redirect URI must not carry credentials"
    if parts.scheme == "https":
        return None
    if parts.scheme == "http" and allow_loopback_http and is_loopback_name(parts.hostname):
        return None
    if allow_loopback_http:
        return "must be https, or http on a loopback address"
    return "must be https"


def redirect_host(uri: str) -> str:
    """What the login page shows of a redirect URI: where the code will go."""
    parts = urlsplit(uri)
    return parts.netloc or uri


async def fetch_document_client(
    url: str, patterns: Sequence[str], fetch: FetchDocument
) -> ClientRecord:
    """Fetch and check the document at ``url`` (already known to be allowlisted)."""
    if not document_allowed(url, patterns):
        raise LoginPageError(
            f"The client {url} is not one this relay trusts (its metadata document is "
            "not on the [oauth] client_documents list)."
        )
    try:
        data = await fetch(url)
    except DocumentFetchError as exc:
        raise LoginPageError(f"The client's metadata document ({url}) {exc}.") from None
    return client_from_document(url, data)
