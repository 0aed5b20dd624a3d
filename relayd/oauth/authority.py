"""The authorization server's decisions: who asks, what they get, what they hold.

:class:`Authority` turns request parameters into answers and talks to the grant
store; it reads no request and opens no connection (the endpoints do the HTTP,
a fetch function handed in does the one outbound GET for client documents).

The flow (OAuth 2.1 draft, authorization code + PKCE S256 only):

1. ``/oauth/authorize`` (GET): the client and its redirect URI are checked first;
   a problem there is shown to the person, never redirected (RFC 6749 §4.1.2.1).
   Then PKCE, the resource (RFC 8707) and the scopes; problems there go back to
   the client through its redirect. Then the login page.
2. The page posts the relay key: a good one gets a code (60 s, single use) sent
   to the redirect URI with ``state`` and ``iss`` (RFC 9207).
3. ``/oauth/token``: the code, its verifier and the same redirect URI and resource
   give an access token (about an hour) and, with ``offline_access``, a refresh
   token that rotates on every use.
4. Each token acts as its relay key (:meth:`Authority.key_for_token`), for as long
   as that key is in the key ring with the same secret.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlencode

from relayd.config import RelayKey, Settings
from relayd.oauth.clients import (
    FetchDocument,
    fetch_document_client,
    looks_like_document_url,
    register_client,
    registration_answer,
)
from relayd.oauth.errors import LoginPageError, OAuthError, RedirectError
from relayd.oauth.metadata import OFFLINE_ACCESS, PROTECTED_GROUP, Endpoints
from relayd.oauth.tokens import (
    ACCESS_PREFIX,
    CODE_PREFIX,
    REFRESH_PREFIX,
    digest,
    key_print,
    new_secret,
    pkce_matches,
    valid_challenge,
)
from relayd.store.attempts import AttemptLimit, MemoryAttemptLimit
from relayd.store.grants import ClientRecord, Grant, GrantStore, ReplayError

__all__ = ["Authority", "AuthorizeRequest", "KeyLookup"]

# What an operator should know (links made, replays caught); never a code or token.
log = logging.getLogger("relayd.oauth")

KeyLookup = Callable[[str], RelayKey | None]  # a relay key by name (KeyRing.by_name)
# An attempt limit by name, attempts and window (relayd.store.attempts.attempt_limit).
LimitFactory = Callable[[str, int, float], AttemptLimit]

# A fetched client document is trusted this long before it is fetched again.
_DOCUMENT_TTL_S: Final = 300.0
_REGISTRATIONS_PER_HOUR: Final = 30
# Tokens whose acting key one worker remembers; past this many it starts again.
_ACTING_TOKENS: Final = 4096
# How long a login page may wait for its form to be posted.
LOGIN_FORM_TTL_S: Final = 900.0
# What the authorize request carries that the form repeats, in the order signed.
AUTHORIZE_FIELDS: Final[tuple[str, ...]] = (
    "response_type",
    "client_id",
    "redirect_uri",
    "code_challenge",
    "code_challenge_method",
    "state",
    "resource",
    "scope",
)


@dataclass(frozen=True, slots=True)
class AuthorizeRequest:
    """An authorization request that passed every check."""

    client: ClientRecord
    redirect_uri: str
    state: str | None
    challenge: str
    resource: str
    scopes: tuple[str, ...] | None  # route groups asked for; None: none named
    offline: bool
    params: Mapping[str, str]  # as received, for the form to repeat


class Authority:
    def __init__(
        self,
        settings: Settings,
        endpoints: Endpoints,
        store: GrantStore,
        fetch: FetchDocument,
        limits: LimitFactory | None = None,
    ) -> None:
        self.settings = settings
        self.endpoints = endpoints
        self.store = store
        self._fetch = fetch
        limit = limits or (lambda _name, attempts, window: MemoryAttemptLimit(attempts, window))
        self.failed_logins = limit(
            "login", settings.oauth.login_attempts, settings.oauth.login_window_s
        )
        # Registration is open to anyone: bound how fast one address fills the store.
        self.registrations = limit("register", _REGISTRATIONS_PER_HOUR, 3600.0)
        # key_for_token(): token digest -> (grant, key, the key the token acts as).
        self._acting: dict[bytes, tuple[Grant, RelayKey, RelayKey]] = {}

    # -------------------------------------------------------------- authorize

    async def check_authorize(self, params: Mapping[str, str]) -> AuthorizeRequest:
        """Validate an authorization request (the page's GET, and again its POST)."""
        client_id = params.get("client_id", "")
        if not client_id:
            raise LoginPageError("The request names no client (client_id is missing).")
        client = await self._client(client_id)
        redirect_uri = params.get("redirect_uri", "")
        if not redirect_uri:
            raise LoginPageError("The request has no redirect_uri.")
        if redirect_uri not in client.redirect_uris:
            raise LoginPageError(
                "The redirect_uri is not one this client registered; relayd sends codes "
                "only to registered addresses."
            )
        state = params.get("state")
        if params.get("response_type") != "code":
            raise _redirect("unsupported_response_type", "Only response_type=code is supported.")
        challenge = params.get("code_challenge", "")
        method = params.get("code_challenge_method")
        if not challenge:
            raise _redirect("invalid_request", "PKCE is required: send code_challenge (S256).")
        if method != "S256":
            raise _redirect("invalid_request", "Only code_challenge_method=S256 is accepted.")
        if not valid_challenge(challenge):
            raise _redirect("invalid_request", "code_challenge is not an S256 challenge.")
        resource = params.get("resource", self.endpoints.resource)
        if resource != self.endpoints.resource:
            # RFC 8707 §2: a resource this server issues no tokens for.
            raise _redirect("invalid_target", f"The resource must be {self.endpoints.resource}.")
        scopes, offline = self._parse_scope(params.get("scope"))
        return AuthorizeRequest(
            client, redirect_uri, state, challenge, resource, scopes, offline, dict(params)
        )

    def _parse_scope(self, text: str | None) -> tuple[tuple[str, ...] | None, bool]:
        if text is None or not text.strip():
            return None, False
        asked = set(text.split())
        offline = OFFLINE_ACCESS in asked
        asked.discard(OFFLINE_ACCESS)
        unknown = sorted(asked - set(self.endpoints.scopes))
        if unknown:
            raise _redirect("invalid_scope", f"Unknown scope: {', '.join(unknown)}.")
        return (tuple(sorted(asked)) if asked else None), offline

    async def _client(self, client_id: str) -> ClientRecord:
        known = await self.store.client(client_id)
        if known is not None and (
            known.origin == "registered" or time.time() - known.saved_at < _DOCUMENT_TTL_S
        ):
            return known
        if looks_like_document_url(client_id):
            client = await fetch_document_client(
                client_id, self.settings.oauth.client_documents, self._fetch
            )
            client = dataclasses.replace(client, saved_at=time.time())
            await self.store.save_client(client)
            return client
        raise LoginPageError("This client is not registered with the relay.")

    async def csrf_token(self, request: AuthorizeRequest, browser: str, issued: int) -> str:
        """The login form's token: bound to this browser (its cookie), to every
        parameter of the request, and to when the page was shown. Its key is the
        store's, the same for every worker and instance (a page shown by one may be
        posted to another). Read each time, not kept: a store that lost it makes a new
        one, and every instance must then sign with that one."""
        key = await self.store.secret("login-csrf")
        # JSON: no value can pass for a field boundary.
        message = json.dumps([browser, issued, *(request.params.get(f) for f in AUTHORIZE_FIELDS)])
        mac = hmac.new(key, message.encode(), hashlib.sha256).hexdigest()
        return f"{issued}.{mac}"

    async def csrf_valid(self, request: AuthorizeRequest, browser: str, token: str) -> bool:
        issued_text, _, _ = token.partition(".")
        if not issued_text.isdigit() or not browser:
            return False
        issued = int(issued_text)
        if not 0 <= time.time() - issued <= LOGIN_FORM_TTL_S:
            return False
        return hmac.compare_digest(await self.csrf_token(request, browser, issued), token)

    def grant_scopes(self, request: AuthorizeRequest, key: RelayKey) -> tuple[str, ...] | None:
        """What a token may do: the scopes asked for that the key has (none asked
        for: all of the key's). A LoginPageError when that leaves nothing useful."""
        if not key.allows(PROTECTED_GROUP):
            raise LoginPageError(
                f"The relay key '{key.name}' may not use the '{PROTECTED_GROUP}' routes this "
                "client asks for.",
                status=403,
            )
        scopes = narrowed(request.scopes, key.scopes)
        if scopes is not None and PROTECTED_GROUP not in scopes:
            raise LoginPageError(
                f"The scopes asked for leave the relay key '{key.name}' nothing it may use "
                f"here ('{PROTECTED_GROUP}' is needed).",
                status=403,
            )
        return scopes

    async def issue_code(self, request: AuthorizeRequest, key: RelayKey) -> str:
        """The redirect URL carrying a fresh code (RFC 6749 §4.1.2, RFC 9207 iss)."""
        grant = Grant(
            client_id=request.client.client_id,
            key_name=key.name,
            key_print=key_print(key),
            scopes=self.grant_scopes(request, key),
            resource=request.resource,
            offline=request.offline,
        )
        code = new_secret(CODE_PREFIX)
        expires = time.time() + self.settings.oauth.code_ttl_s
        await self.store.add_code(
            digest(code), grant, request.redirect_uri, request.challenge, expires
        )
        log.info(
            "relay key %s linked app %r (client %s), scopes %s%s",
            key.name,
            request.client.name,
            request.client.client_id,
            " ".join(grant.scopes) if grant.scopes is not None else "(all of the key's)",
            ", with refresh tokens" if grant.offline else "",
        )
        return self.redirect_url(request, {"code": code})

    def redirect_url(self, request: AuthorizeRequest, values: dict[str, str]) -> str:
        if request.state is not None:
            values["state"] = request.state
        values["iss"] = self.endpoints.issuer
        separator = "&" if "?" in request.redirect_uri else "?"
        return request.redirect_uri + separator + urlencode(values)

    def error_redirect(self, request_params: Mapping[str, str], error: RedirectError) -> str:
        """Where a RedirectError goes: only ever called once the client and the
        redirect URI were verified (check_authorize raises it only after that)."""
        values = {"error": error.error, "error_description": error.description}
        if (state := request_params.get("state")) is not None:
            values["state"] = state
        values["iss"] = self.endpoints.issuer
        uri = request_params["redirect_uri"]
        return uri + ("&" if "?" in uri else "?") + urlencode(values)

    # ------------------------------------------------------------------ token

    async def exchange(self, form: Mapping[str, str], lookup: KeyLookup) -> dict[str, Any]:
        """``POST /oauth/token``: the token response, or an OAuthError."""
        grant_type = form.get("grant_type")
        client = await self._token_client(form)
        if grant_type == "authorization_code":
            return await self._redeem_code(form, client, lookup)
        if grant_type == "refresh_token":
            return await self._refresh(form, client, lookup)
        raise OAuthError(
            "unsupported_grant_type",
            "Only authorization_code and refresh_token grants are supported.",
        )

    async def _token_client(self, form: Mapping[str, str]) -> ClientRecord:
        client_id = form.get("client_id")
        if not client_id:
            raise OAuthError("invalid_client", "client_id is required.", status=401)
        if form.get("client_secret"):
            raise OAuthError(
                "invalid_client", "This client is public: it has no secret to send.", status=401
            )
        client = await self.store.client(client_id)
        if client is None:
            raise OAuthError("invalid_client", "Unknown client.", status=401)
        return client

    async def _redeem_code(
        self, form: Mapping[str, str], client: ClientRecord, lookup: KeyLookup
    ) -> dict[str, Any]:
        code, verifier = form.get("code"), form.get("code_verifier")
        redirect_uri = form.get("redirect_uri")
        if not code or not verifier or not redirect_uri:
            raise OAuthError(
                "invalid_request", "code, code_verifier and redirect_uri are all required."
            )
        # Taking the code uses it up, whatever follows: a code is tried once.
        try:
            record = await self.store.take_code(digest(code))
        except ReplayError as exc:
            _log_replay("an authorization code", exc.grant)
            record = None
        if record is None or record.grant.client_id != client.client_id:
            raise OAuthError(
                "invalid_grant", "The code is unknown, expired, used, or not this client's."
            )
        if record.redirect_uri != redirect_uri:
            raise OAuthError("invalid_grant", "redirect_uri differs from the authorization's.")
        if not pkce_matches(verifier, record.challenge):
            raise OAuthError("invalid_grant", "The code_verifier does not match the challenge.")
        self._check_resource(form, record.grant)
        key = self._live_key(record.grant, lookup)
        return await self._issue(record.family, record.grant, key)

    async def _refresh(
        self, form: Mapping[str, str], client: ClientRecord, lookup: KeyLookup
    ) -> dict[str, Any]:
        token = form.get("refresh_token")
        if not token:
            raise OAuthError("invalid_request", "refresh_token is required.")
        try:
            used = await self.store.use_refresh(digest(token))
        except ReplayError as exc:
            _log_replay("a refresh token", exc.grant)
            used = None
        if used is None or used[1].client_id != client.client_id:
            raise OAuthError(
                "invalid_grant", "The refresh token is unknown, expired, used or revoked."
            )
        family, grant = used
        asked, _ = self._parse_refresh_scope(form.get("scope"))
        if asked is not None and not set(asked) <= set(grant.scopes or self.endpoints.scopes):
            raise OAuthError("invalid_scope", "A refresh cannot widen the granted scopes.")
        self._check_resource(form, grant)
        key = self._live_key(grant, lookup)
        return await self._issue(family, grant, key)

    def _parse_refresh_scope(self, text: str | None) -> tuple[tuple[str, ...] | None, bool]:
        try:
            return self._parse_scope(text)
        except RedirectError as exc:
            raise OAuthError("invalid_scope", exc.description) from None

    def _check_resource(self, form: Mapping[str, str], grant: Grant) -> None:
        resource = form.get("resource")
        if resource is not None and resource != grant.resource:
            raise OAuthError("invalid_target", "resource differs from the authorization's.")

    @staticmethod
    def _live_key(grant: Grant, lookup: KeyLookup) -> RelayKey:
        key = lookup(grant.key_name)
        if key is None or not hmac.compare_digest(key_print(key), grant.key_print):
            raise OAuthError(
                "invalid_grant", "The relay key this grant was made with was removed or replaced."
            )
        return key

    async def _issue(self, family: str, grant: Grant, key: RelayKey) -> dict[str, Any]:
        oauth = self.settings.oauth
        now = time.time()
        access = new_secret(ACCESS_PREFIX)
        rows = [(digest(access), "access", now + oauth.access_token_ttl_s)]
        answer: dict[str, Any] = {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": int(oauth.access_token_ttl_s),
        }
        if grant.offline:
            refresh = new_secret(REFRESH_PREFIX)
            rows.append((digest(refresh), "refresh", now + oauth.refresh_token_ttl_s))
            answer["refresh_token"] = refresh
        await self.store.add_tokens(family, rows)
        scopes = narrowed(grant.scopes, key.scopes)
        granted = list(scopes if scopes is not None else self.endpoints.scopes)
        answer["scope"] = " ".join(granted + ([OFFLINE_ACCESS] if grant.offline else []))
        return answer

    # ------------------------------------------------------- revoke, register

    async def revoke(self, form: Mapping[str, str]) -> None:
        """RFC 7009: the token's whole grant ends; an unknown token is no error
        (§2.2), so a revocation tells nobody whether a token existed."""
        token = form.get("token")
        if not token:
            raise OAuthError("invalid_request", "token is required.")
        await self.store.revoke(digest(token))

    async def register(self, document: Any, address: str) -> dict[str, Any]:
        if not self.settings.oauth.registration:
            raise OAuthError(
                "access_denied", "Dynamic client registration is turned off on this relay."
            )
        if await self.registrations.retry_after(address) is not None:
            raise OAuthError(
                "temporarily_unavailable",
                "Too many client registrations from this address; try again later.",
                status=429,
            )
        client = register_client(document)
        await self.registrations.record(address)
        await self.store.save_client(client)
        return registration_answer(client)

    # ---------------------------------------------------------------- tokens

    async def key_for_token(self, token: str, lookup: KeyLookup) -> RelayKey | None:
        """The relay key an access token acts as, its scopes narrowed to the
        token's; None for a token that is unknown, expired, revoked, or whose key
        was removed or given a new secret since. One store read; a store that does
        not answer raises StoreUnavailableError (a 503, never a 401: a client told
        its token is bad drops it)."""
        token_hash = digest(token)
        grant = await self.store.access(token_hash)
        if grant is None:
            return None
        key = lookup(grant.key_name)
        if key is None:
            return None
        # The same grant (a store that remembers answers gives the same object)
        # and the same key object (a reload makes new ones) act as before.
        known = self._acting.get(token_hash)
        if known is not None and known[0] is grant and known[1] is key:
            return known[2]
        if not hmac.compare_digest(key_print(key), grant.key_print):
            return None
        scopes = narrowed(grant.scopes, key.scopes)
        acting = dataclasses.replace(key, scopes=None if scopes is None else frozenset(scopes))
        if len(self._acting) >= _ACTING_TOKENS:
            self._acting.clear()
        self._acting[token_hash] = (grant, key, acting)
        return acting


def narrowed(
    asked: tuple[str, ...] | frozenset[str] | None, held: frozenset[str] | None
) -> tuple[str, ...] | None:
    """``asked ∩ held``, where None is "everything"."""
    if asked is None:
        return None if held is None else tuple(sorted(held))
    if held is None:
        return tuple(sorted(asked))
    return tuple(sorted(set(asked) & held))


def _log_replay(what: str, grant: Grant) -> None:
    log.warning(
        "%s was used a second time: the grant of relay key %s to client %s is revoked "
        "(a leaked code or token, or a client that retried)",
        what,
        grant.key_name,
        grant.client_id,
    )


def _redirect(error: str, description: str) -> RedirectError:
    return RedirectError(error, description)
