"""Relay keys: named, stored hashed, compared in constant time, optionally scoped.

A key is accepted as ``Authorization: Bearer <key>``, in the configured header
(``X-Relay-Key`` by default), or for browser WebSockets as the subprotocol
``openai-insecure-api-key.<key>``. The middleware runs before any handler, so no
request body is read before the caller is known: an unauthenticated client must
not make relayd allocate for its upload.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from aiohttp import hdrs, web

from relayd.config import RelayKey, Settings, hash_key
from relayd.errors import AuthenticationError, PermissionDeniedError
from relayd.loopback import is_loopback_host, is_loopback_origin
from relayd.oauth.metadata import PROTECTED_GROUP
from relayd.oauth.tokens import is_access_token
from relayd.routing import Exposure, Handler, Route
from relayd.state import KEY, KEYRING, OAUTH, ROUTE, ROUTE_MAP, SETTINGS
from relayd.store.redis import StoreUnavailableError

__all__ = [
    "EPHEMERAL_PREFIX",
    "WS_KEY_PREFIX",
    "KeyRing",
    "auth_middleware",
    "presented_key",
    "refuse_unless_loopback",
]

WS_KEY_PREFIX = "openai-insecure-api-key."
EPHEMERAL_PREFIX = "ek_"  # OpenAI's ephemeral client secrets (/v1/realtime/client_secrets)


class KeyRing:
    """The current relay keys; ``replace()`` swaps them atomically (SIGHUP)."""

    __slots__ = ("_by_digest", "_by_name", "_keys")

    def __init__(self, keys: Iterable[RelayKey]) -> None:
        self._keys: tuple[RelayKey, ...] = ()
        self._by_digest: dict[bytes, RelayKey] = {}
        self._by_name: dict[str, RelayKey] = {}
        self.replace(keys)

    @property
    def keys(self) -> tuple[RelayKey, ...]:
        return self._keys

    def replace(self, keys: Iterable[RelayKey]) -> None:
        keys = tuple(keys)
        # Built whole, then swapped in one assignment each (a request between the
        # two sees the old ring's lookups, never a half-built one).
        by_digest = {key.digest: key for key in keys}
        by_name = {key.name: key for key in keys}  # names are unique (config.checks)
        self._keys, self._by_digest, self._by_name = keys, by_digest, by_name

    def current(self, key: RelayKey) -> RelayKey | None:
        """``key`` as the ring holds it now (scopes may have changed), or None once
        it was removed or its secret replaced: what it opened must then end."""
        for held in self._keys:
            if held.name == key.name and hmac.compare_digest(held.digest, key.digest):
                return held
        return None

    def by_name(self, name: str) -> RelayKey | None:
        return self._by_name.get(name)

    def identify(self, secret: str) -> RelayKey | None:
        """The key matching ``secret``: one dictionary lookup of its SHA-256 digest.
        The lookup's timing can only tell about the digest of what was sent, which
        says nothing about any key's secret (a preimage of SHA-256 is out of reach)."""
        return self._by_digest.get(hash_key(secret))


def presented_key(request: web.Request, header: str) -> str | None:
    """The relay key the client presented, from whichever place it used.

    An OpenAI ephemeral secret (``ek_…``) is never a relay key: a realtime client
    may send one next to its relay key (as Bearer, or as a second key subprotocol)
    for relayd to use upstream, so it is skipped here (handlers/realtime.py).
    """
    authorization = request.headers.get(hdrs.AUTHORIZATION, "")
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() == "bearer" and token and not token.startswith(EPHEMERAL_PREFIX):
        return token
    custom = request.headers.get(header, "").strip()
    if custom:
        return custom
    for protocol in request.headers.get(hdrs.SEC_WEBSOCKET_PROTOCOL, "").split(","):
        protocol = protocol.strip()
        if protocol.startswith(WS_KEY_PREFIX):
            secret = protocol.removeprefix(WS_KEY_PREFIX)
            if not secret.startswith(EPHEMERAL_PREFIX):
                return secret
    return None


def _is_public(route: Route, settings: Settings) -> bool:
    if route.exposure is Exposure.SIGNED:
        return True  # the handler checks the URL's signature instead of a key
    if settings.auth.public_paths is None:
        return not route.needs_key
    return route.path in settings.auth.public_paths


def refuse_unless_loopback(request: web.Request) -> None:
    """Keyless mode: only requests addressed to this machine, from no page or a page
    served by this machine (issue 11, item 3: DNS rebinding).

    The listener being on loopback is not enough: a web page can point its own
    host name at 127.0.0.1, and the user's browser then talks to relayd for it,
    sending that name as ``Host`` and the page as ``Origin``.
    """
    for name, is_loopback in ((hdrs.HOST, is_loopback_host), (hdrs.ORIGIN, is_loopback_origin)):
        if not all(is_loopback(value) for value in request.headers.getall(name, ())):
            raise PermissionDeniedError(
                f"This relay has no relay keys, so it only answers requests for this "
                f"machine; the {name} header names another. Use http://localhost or "
                "http://127.0.0.1, or configure relay keys (RELAYD_KEYS).",
                code="keyless_loopback_only",
            )


async def _identify(request: web.Request, keyring: KeyRing, secret: str) -> RelayKey | None:
    """The relay key ``secret`` is, or acts as: a relay key itself, or an OAuth
    access token relayd issued (docs/security.md#oauth), which acts as the key it
    was granted with, its scopes narrowed to the token's. A grant store that does
    not answer raises StoreUnavailableError: a 503 the client retries, never a 401
    that would make it throw the token away."""
    key = keyring.identify(secret)
    if key is None and is_access_token(secret) and (authority := request.app.get(OAUTH)):
        key = await authority.key_for_token(secret, keyring.by_name)
    return key


def _unauthenticated(
    request: web.Request, route: Route, message: str, *, code: str, sent: bool
) -> AuthenticationError:
    """A 401; on the route OAuth protects, with the challenge that tells a client
    where to get a token (RFC 9728 §5.1; RFC 6750 §3.1 ``invalid_token`` when one
    was sent and failed)."""
    headers = {}
    if route.group == PROTECTED_GROUP:
        authority = request.app.get(OAUTH)
        challenge = "Bearer"
        if authority is not None:
            challenge += f' resource_metadata="{authority.endpoints.resource_metadata}"'
        if sent:
            challenge += (", " if authority is not None else " ") + 'error="invalid_token"'
        headers["WWW-Authenticate"] = challenge
    return AuthenticationError(message, code=code, headers=headers)


def _scope_challenge(request: web.Request, route: Route) -> dict[str, str]:
    """On the route OAuth protects, a 403 says which scope would do (RFC 6750 §3.1,
    ``insufficient_scope``), so a client can ask for it."""
    authority = request.app.get(OAUTH)
    if route.group != PROTECTED_GROUP or authority is None:
        return {}
    metadata = authority.endpoints.resource_metadata
    return {
        "WWW-Authenticate": (
            f'Bearer error="insufficient_scope", scope="{route.group}", '
            f'resource_metadata="{metadata}"'
        )
    }


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    keyring = request.app[KEYRING]
    # No keys at all is the loopback-only safe default (config.validate refuses it
    # on any other address, server.py on any inherited socket that is not
    # loopback): every route is open, to requests for this machine alone. Checked
    # before the route, so unknown paths and the realtime upgrade are covered too.
    keyless = not settings.auth.disabled and not keyring.keys
    if keyless:
        refuse_unless_loopback(request)
    route = request.app[ROUTE_MAP].get(request.match_info.route)
    if route is None:
        return await handler(request)  # the router's own 404/405
    request[ROUTE] = route
    if settings.auth.disabled or keyless:
        return await handler(request)
    secret = presented_key(request, settings.auth.header)
    if _is_public(route, settings):
        # Open to all, but a valid key is still identified (/health shows a key
        # holder more); a wrong one is no refusal here.
        if secret is not None:
            try:
                key = await _identify(request, keyring, secret)
            except StoreUnavailableError:
                key = None  # a public route answers whatever the store does
            if key is not None:
                request[KEY] = key
        return await handler(request)
    if secret is None:
        raise _unauthenticated(
            request,
            route,
            "Missing relay key. Send it as 'Authorization: Bearer <key>' or in the "
            f"'{settings.auth.header}' header.",
            code="missing_api_key",
            sent=False,
        )
    key = await _identify(request, keyring, secret)
    if key is None:
        message = "Incorrect relay key provided."
        if is_access_token(secret):
            message = "The access token is unknown, expired or revoked, or its relay key changed."
        raise _unauthenticated(request, route, message, code="invalid_api_key", sent=True)
    request[KEY] = key  # known from here on: a refusal below is logged under its name
    if not key.allows(route.group):
        raise PermissionDeniedError(
            f"The relay key '{key.name}' may not use the '{route.group}' routes.",
            code="key_scope",
            headers=_scope_challenge(request, route),
        )
    return await handler(request)
