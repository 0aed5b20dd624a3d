"""The OAuth routes' handlers: read the request, ask the Authority, answer.

Thin on purpose: every decision is in :mod:`relayd.oauth.authority`. Nothing here
logs a request's parameters or body (they carry codes, tokens and relay keys);
the access line names only the route.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterable, Mapping
from typing import Any, Final
from urllib.parse import parse_qsl

from aiohttp import web

from relayd.errors import PayloadTooLargeError
from relayd.oauth.authority import AUTHORIZE_FIELDS, LOGIN_FORM_TTL_S, Authority, AuthorizeRequest
from relayd.oauth.clients import redirect_host
from relayd.oauth.errors import NO_STORE, LoginPageError, OAuthError, RedirectError
from relayd.oauth.metadata import require
from relayd.oauth.page import HEADERS, error_page, login_page
from relayd.state import CLIENT_ADDRESS, KEYRING, OAUTH, SETTINGS
from relayd.store.redis import StoreUnavailableError

__all__ = [
    "COOKIE",
    "authorize_page",
    "authorize_submit",
    "register",
    "resource_metadata",
    "revoke",
    "server_metadata",
    "token",
]

# The login page's browser binding (CSRF): set when the page is shown, sent back
# only with same-site posts.
COOKIE: Final = "relayd_login"
MAX_FORM_BYTES: Final = 64 * 1024


def _authority(request: web.Request) -> Authority:
    """The authorization server; a 500 ``public_url_not_set`` without one."""
    authority = request.app.get(OAUTH)
    require(authority.endpoints if authority is not None else None)
    assert authority is not None
    return authority


async def server_metadata(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    return web.json_response(_authority(request).endpoints.server_document(settings))


async def resource_metadata(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    return web.json_response(_authority(request).endpoints.resource_document(settings))


# ------------------------------------------------------------------ authorize


async def authorize_page(request: web.Request) -> web.StreamResponse:
    """``GET /oauth/authorize``: check the request, then show the login page."""
    try:
        return await _authorize_page(request)
    except StoreUnavailableError:
        return _refused(request, _STORE_DOWN_PAGE, 503)


async def authorize_submit(request: web.Request) -> web.StreamResponse:
    """``POST /oauth/authorize``: the login form, checked again from scratch."""
    try:
        return await _authorize_submit(request)
    except StoreUnavailableError:
        return _refused(request, _STORE_DOWN_PAGE, 503)


_STORE_DOWN_PAGE: Final = (
    "The relay cannot reach its grant store just now. Wait a moment, then start again from the app."
)


async def _authorize_page(request: web.Request) -> web.StreamResponse:
    authority = _authority(request)
    try:
        params = _single(request.query.items())
    except OAuthError as exc:
        return _refused(request, exc.description)
    checked = await _checked(request, authority, params)
    if isinstance(checked, web.StreamResponse):
        return checked
    browser = request.cookies.get(COOKIE) or secrets.token_urlsafe(24)
    response = await _login(request, authority, checked, browser)
    response.set_cookie(
        COOKIE,
        browser,
        path=request.path,
        max_age=int(LOGIN_FORM_TTL_S),
        httponly=True,
        samesite="Strict",
        secure=authority.endpoints.issuer.startswith("https://"),
    )
    return response


async def _authorize_submit(request: web.Request) -> web.StreamResponse:
    try:
        form = await _form(request)  # first: a body too large is the client's 413
    except OAuthError as exc:
        return _refused(request, exc.description)
    authority = _authority(request)
    params = {name: form[name] for name in AUTHORIZE_FIELDS if name in form}
    checked = await _checked(request, authority, params)
    if isinstance(checked, web.StreamResponse):
        return checked
    browser = request.cookies.get(COOKIE, "")
    if not await authority.csrf_valid(checked, browser, form.get("csrf", "")):
        return _refused(
            request,
            "This form expired or was not sent from relayd's own page (cookies must be on). "
            "Start again from the app.",
        )
    if form.get("action") == "deny":
        refusal = RedirectError("access_denied", "The user declined to link the app.")
        return _see_other(authority.error_redirect(params, refusal))
    address = request[CLIENT_ADDRESS]
    wait = await authority.failed_logins.retry_after(address)
    if wait is not None:
        message = f"Too many wrong relay keys from here. Try again in {int(wait) + 1} seconds."
        response = await _login(request, authority, checked, browser, error=message, status=429)
        response.headers["Retry-After"] = str(int(wait) + 1)
        return response
    key = request.app[KEYRING].identify(form.get("relay_key", ""))
    if key is None:
        await authority.failed_logins.record(address)
        message = "That is not a valid relay key. Check it and try again."
        return await _login(request, authority, checked, browser, error=message, status=401)
    try:
        location = await authority.issue_code(checked, key)
    except LoginPageError as exc:
        return await _login(request, authority, checked, browser, error=exc.description, status=403)
    return _see_other(location)


async def _checked(
    request: web.Request, authority: Authority, params: Mapping[str, str]
) -> AuthorizeRequest | web.StreamResponse:
    try:
        return await authority.check_authorize(params)
    except LoginPageError as exc:
        return _refused(request, exc.description, exc.status)
    except RedirectError as exc:
        return _see_other(authority.error_redirect(params, exc))


async def _login(
    request: web.Request,
    authority: Authority,
    checked: AuthorizeRequest,
    browser: str,
    *,
    error: str | None = None,
    status: int = 200,
) -> web.Response:
    hidden = {name: checked.params[name] for name in AUTHORIZE_FIELDS if name in checked.params}
    hidden["csrf"] = await authority.csrf_token(checked, browser, int(time.time()))
    page = login_page(
        relay_name=request.app[SETTINGS].meta.name,
        client_name=checked.client.name,
        redirect_host=redirect_host(checked.redirect_uri),
        scopes=checked.scopes or (),
        offline=checked.offline,
        hidden=hidden,
        error=error,
    )
    return web.Response(
        status=status, text=page, content_type="text/html", charset="utf-8", headers=HEADERS
    )


def _refused(request: web.Request, message: str, status: int = 400) -> web.Response:
    page = error_page(request.app[SETTINGS].meta.name, message)
    return web.Response(
        status=status, text=page, content_type="text/html", charset="utf-8", headers=HEADERS
    )


def _see_other(location: str) -> web.Response:
    # 303: the browser follows a POST's answer with a GET (RFC 9110 §15.4.4).
    return web.Response(status=303, headers={"Location": location, **HEADERS})


# -------------------------------------------------------- token, revoke, register


async def token(request: web.Request) -> web.Response:
    try:
        form = await _form(request)  # first: a body too large is the client's 413
        answer = await _authority(request).exchange(form, request.app[KEYRING].by_name)
    except OAuthError as exc:
        return exc.response()
    except StoreUnavailableError:
        return _store_down().response()
    return web.json_response(answer, headers=NO_STORE)


async def revoke(request: web.Request) -> web.Response:
    try:
        form = await _form(request)  # first: a body too large is the client's 413
        await _authority(request).revoke(form)
    except OAuthError as exc:
        return exc.response()
    except StoreUnavailableError:
        return _store_down().response()
    return web.Response(status=200, headers=NO_STORE)


async def register(request: web.Request) -> web.Response:
    try:
        body = await _bounded_body(request)  # first: a body too large is the client's 413
        authority = _authority(request)
        try:
            document: Any = json.loads(body)
        except ValueError:
            raise OAuthError("invalid_client_metadata", "The body is not JSON.") from None
        answer = await authority.register(document, request[CLIENT_ADDRESS])
    except OAuthError as exc:
        return exc.response()
    except StoreUnavailableError:
        return _store_down().response()
    return web.json_response(answer, status=201, headers=NO_STORE)


def _store_down() -> OAuthError:
    """The grant store did not answer: a 503 the client may retry; its code, token
    or registration was not touched (or, for a code, is gone: a new login)."""
    return OAuthError(
        "temporarily_unavailable",
        "The relay's grant store did not answer; try again in a moment.",
        status=503,
    )


# ----------------------------------------------------------------- parsing


async def _bounded_body(request: web.Request) -> bytes:
    """The whole (small) body, or a 413 once it passes the cap, counted as it arrives."""
    cap = min(MAX_FORM_BYTES, request.app[SETTINGS].limits.max_json_bytes)
    too_large = PayloadTooLargeError(f"An OAuth request body is at most {cap} bytes.")
    if request.content_length is not None and request.content_length > cap:
        raise too_large
    body = b""
    while len(body) <= cap and (more := await request.content.read(cap + 1 - len(body))):
        body += more
    if len(body) > cap:
        raise too_large
    return body


async def _form(request: web.Request) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body (RFC 6749 §3.2)."""
    body = await _bounded_body(request)
    try:
        text = body.decode("utf-8")
        pairs = parse_qsl(text, keep_blank_values=True, max_num_fields=64)
    except (UnicodeDecodeError, ValueError):
        raise OAuthError("invalid_request", "The form body cannot be read.") from None
    return _single(pairs)


def _single(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Parameters by name; one sent twice is refused (RFC 6749 §3.1)."""
    values: dict[str, str] = {}
    for name, value in pairs:
        if name in values:
            raise OAuthError("invalid_request", f"The parameter {name!r} was sent twice.")
        values[name] = value
    return values
