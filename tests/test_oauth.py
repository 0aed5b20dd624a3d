"""relayd as an OAuth 2.1 authorization server: documents, login, tokens, refusals.

Assertions never take a code or token as an operand: pytest would print it.

Everything runs against an in-process relayd on a loopback socket, with the grant
store in the test's own state directory. Codes and tokens a test receives are
watched in every log record (CANARY.watch_logs).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from relayd.app import create_app
from relayd.config import ConfigError, parse_keys_env, validate
from relayd.oauth.metadata import protected_route
from relayd.oauth.tokens import pkce_matches
from relayd.routes import TABLE
from relayd.state import KEYRING, OAUTH
from tests.conftest import OTHER_KEY, RELAY_KEY, make_settings
from tests.oauthflow import (
    REDIRECT,
    bearer,
    hidden_fields,
    login,
    pkce_pair,
    refresh,
    register,
    request_params,
    tokens,
)

PUBLIC_URL = "http://127.0.0.1:8999"


MCP = protected_route(TABLE)
assert MCP is not None
RESOURCE = PUBLIC_URL + MCP.path
PING = {"jsonrpc": "2.0", "id": 1, "method": "ping"}


async def call_mcp(relay: TestClient, token: str) -> ClientResponse:
    """A JSON-RPC ping on the MCP endpoint, with ``token`` as its bearer."""
    return await relay.post(MCP.path, json=PING, headers=bearer(token))


def access_keys(caplog: pytest.LogCaptureFixture, path: str) -> list[object]:
    """The key names the access lines of requests to ``path`` were booked under."""
    return [
        getattr(r, "fields", {}).get("key")
        for r in caplog.records
        if r.name == "relayd.access" and getattr(r, "fields", {}).get("route") == path
    ]


Start = Callable[..., Awaitable[TestClient]]


@pytest.fixture
def start(aiohttp_client: AiohttpClient) -> Start:
    async def start(**sections: Any) -> TestClient:
        sections.setdefault("server", {"public_url": PUBLIC_URL})
        settings = make_settings(**sections)
        return await aiohttp_client(create_app(settings))

    return start


@pytest.fixture
async def relay(start: Start) -> TestClient:
    return await start()


# ---------------------------------------------------------------- documents


async def test_server_metadata_comes_from_the_public_url_never_the_host(relay: TestClient) -> None:
    forged = {"Host": "evil.example", "X-Forwarded-Host": "evil.example"}
    for path in ("/.well-known/oauth-authorization-server", "/.well-known/openid-configuration"):
        document = await (await relay.get(path, headers=forged)).json()
        assert document["issuer"] == PUBLIC_URL
        assert document["authorization_endpoint"] == f"{PUBLIC_URL}/oauth/authorize"
        assert document["token_endpoint"] == f"{PUBLIC_URL}/oauth/token"
        assert document["revocation_endpoint"] == f"{PUBLIC_URL}/oauth/revoke"
        assert document["registration_endpoint"] == f"{PUBLIC_URL}/oauth/register"
        assert document["code_challenge_methods_supported"] == ["S256"]
        assert document["authorization_response_iss_parameter_supported"] is True
        assert document["client_id_metadata_document_supported"] is True
        assert "offline_access" in document["scopes_supported"]
        assert "mcp" in document["scopes_supported"]


async def test_protected_resource_metadata_names_the_mcp_endpoint(relay: TestClient) -> None:
    root = "/.well-known/oauth-protected-resource"
    for path in (root, root + MCP.path):
        response = await relay.get(path)
        assert response.status == 200, path
        document = await response.json()
        assert document["resource"] == RESOURCE
        assert document["authorization_servers"] == [PUBLIC_URL]
        assert "offline_access" not in document["scopes_supported"]


async def test_registration_can_be_switched_off(start: Start) -> None:
    relay = await start(oauth={"registration": False})
    document = await (await relay.get("/.well-known/oauth-authorization-server")).json()
    assert "registration_endpoint" not in document
    response = await relay.post("/oauth/register", json={"redirect_uris": [REDIRECT]})
    assert response.status == 400
    assert (await response.json())["error"] == "access_denied"


async def test_without_a_public_url_oauth_says_what_is_missing(start: Start) -> None:
    relay = await start(server={"public_url": None})
    response = await relay.get("/.well-known/oauth-authorization-server")
    body = await response.json()
    assert body["error"]["code"] == "public_url_not_set"
    assert "RELAYD_PUBLIC_URL" in body["error"]["message"]
    challenge = (await relay.post(MCP.path, json=PING)).headers["WWW-Authenticate"]
    assert challenge == "Bearer"


# ---------------------------------------------------------------- the flow


async def test_a_linked_app_acts_as_the_key_and_refreshes(
    relay: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    client_id = await register(relay)
    done = await login(relay, client_id, RELAY_KEY, scope="mcp offline_access")
    answer = done.answer
    assert answer["state"] == done.params["state"]
    assert answer["iss"] == PUBLIC_URL
    status, granted = await tokens(relay, done, resource=RESOURCE)
    assert status == 200, granted
    assert granted["token_type"] == "Bearer"
    assert 3000 <= granted["expires_in"] <= 3600
    prefixed = granted["access_token"].startswith("rlyat_")
    assert prefixed, "access tokens carry the rlyat_ prefix"
    assert granted["scope"] == "mcp offline_access"
    caplog.set_level(logging.INFO, "relayd.access")
    who = await call_mcp(relay, granted["access_token"])
    assert who.status == 200
    assert (await who.json())["result"] == {}
    async with asyncio.timeout(2):  # the access line is booked on a later loop turn
        while not access_keys(caplog, MCP.path):
            await asyncio.sleep(0.01)
    assert access_keys(caplog, MCP.path) == ["team"]  # the token acts as its key, by name

    status, renewed = await refresh(relay, client_id, granted["refresh_token"])
    assert status == 200, renewed
    rotated = renewed["refresh_token"] != granted["refresh_token"]
    assert rotated, "a refresh rotates the refresh token"  # (never printed: secrets)
    assert (await call_mcp(relay, renewed["access_token"])).status == 200


async def test_a_token_without_scopes_asked_gets_the_keys_and_works_beyond_mcp(
    relay: TestClient,
) -> None:
    done = await login(relay, await register(relay), RELAY_KEY)
    status, granted = await tokens(relay, done)
    assert status == 200
    assert "refresh_token" not in granted  # no offline_access asked
    models = await relay.get("/v1/actions/ping", headers=bearer(granted["access_token"]))
    assert models.status == 200


async def test_a_token_gets_only_the_asked_scopes_the_key_has(start: Start) -> None:
    scoped = dataclasses.replace(
        parse_keys_env(f"scoped:{OTHER_KEY}")[0], scopes=frozenset({"mcp", "meta"})
    )
    relay = await start(
        auth={"keys": (*parse_keys_env(f"team:{RELAY_KEY}"), scoped)},
    )
    done = await login(relay, await register(relay), OTHER_KEY, scope="mcp models")
    status, granted = await tokens(relay, done)
    assert granted["scope"] == "mcp"
    assert (await call_mcp(relay, granted["access_token"])).status == 200
    refused = await relay.get("/v1/actions/ping", headers=bearer(granted["access_token"]))
    assert refused.status == 403
    assert (await refused.json())["error"]["code"] == "key_scope"


# ---------------------------------------------------------------- the page


async def test_the_login_page_shows_who_asks_and_cannot_be_framed(relay: TestClient) -> None:
    client_id = await register(relay)
    _, challenge = pkce_pair()
    params = request_params(client_id, challenge, scope="mcp offline_access")
    page = await relay.get("/oauth/authorize", params=params)
    assert page.status == 200
    assert page.headers["Cache-Control"] == "no-store"
    assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
    assert page.headers["X-Frame-Options"] == "DENY"
    text = await page.text()
    assert "Test app" in text and "app.example" in text and "mcp" in text
    assert 'name="relay_key"' in text
    assert "<script" not in text


async def test_a_wrong_key_shows_the_page_again_and_issues_no_code(relay: TestClient) -> None:
    client_id = await register(relay)
    _, challenge = pkce_pair()
    page = await relay.get("/oauth/authorize", params=request_params(client_id, challenge))
    form = hidden_fields(await page.text()) | {"relay_key": "rk-wrong-wrong-wrong-wrong"}
    again = await relay.post("/oauth/authorize", data=form, allow_redirects=False)
    assert again.status == 401
    assert "Location" not in again.headers
    assert "not a valid relay key" in await again.text()


async def test_failed_logins_are_limited_per_address(start: Start) -> None:
    relay = await start(oauth={"login_attempts": 2})
    client_id = await register(relay)
    _, challenge = pkce_pair()
    page = await relay.get("/oauth/authorize", params=request_params(client_id, challenge))
    form = hidden_fields(await page.text())
    for _ in range(2):
        wrong = await relay.post("/oauth/authorize", data=form | {"relay_key": "rk-nope-nope-nope"})
        assert wrong.status == 401
    right = await relay.post(
        "/oauth/authorize", data=form | {"relay_key": RELAY_KEY}, allow_redirects=False
    )
    assert right.status == 429
    assert int(right.headers["Retry-After"]) > 0
    assert "Location" not in right.headers


async def test_a_form_from_elsewhere_is_refused(relay: TestClient, aiohttp_client: Any) -> None:
    client_id = await register(relay)
    _, challenge = pkce_pair()
    page = await relay.get("/oauth/authorize", params=request_params(client_id, challenge))
    form = hidden_fields(await page.text()) | {"relay_key": RELAY_KEY}
    relay.session.cookie_jar.clear()  # another browser: no login cookie
    forged = await relay.post("/oauth/authorize", data=form, allow_redirects=False)
    assert forged.status == 400
    assert "Location" not in forged.headers
    page = await relay.get("/oauth/authorize", params=request_params(client_id, challenge))
    tampered = hidden_fields(await page.text()) | {"relay_key": RELAY_KEY, "scope": "models"}
    forged = await relay.post("/oauth/authorize", data=tampered, allow_redirects=False)
    assert forged.status == 400


async def test_cancel_sends_access_denied(relay: TestClient) -> None:
    client_id = await register(relay)
    _, challenge = pkce_pair()
    page = await relay.get("/oauth/authorize", params=request_params(client_id, challenge))
    form = hidden_fields(await page.text()) | {"action": "deny"}
    denied = await relay.post("/oauth/authorize", data=form, allow_redirects=False)
    assert denied.status == 303
    assert "error=access_denied" in denied.headers["Location"]


# ------------------------------------------------------- authorize refusals


@pytest.mark.parametrize(
    ("change", "expect"),
    [
        ({"client_id": "rlyc_unknown"}, "not registered"),
        ({"redirect_uri": "https://evil.example/callback"}, "not one this client registered"),
        ({"redirect_uri": ""}, "no redirect_uri"),
        ({"client_id": "https://evil.example/client.json"}, "not one this relay trusts"),
    ],
    ids=["unknown-client", "unregistered-redirect", "no-redirect", "document-not-allowed"],
)
async def test_client_problems_are_a_page_never_a_redirect(
    relay: TestClient, change: dict[str, str], expect: str
) -> None:
    client_id = await register(relay)
    _, challenge = pkce_pair()
    params = request_params(client_id, challenge) | change
    page = await relay.get(
        "/oauth/authorize", params={k: v for k, v in params.items() if v}, allow_redirects=False
    )
    assert page.status == 400
    assert "Location" not in page.headers
    assert expect in await page.text()


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"code_challenge": ""}, "invalid_request"),
        ({"code_challenge_method": "plain"}, "invalid_request"),
        ({"code_challenge_method": ""}, "invalid_request"),
        ({"resource": "https://elsewhere.example/mcp"}, "invalid_target"),
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"scope": "mcp no_such_group"}, "invalid_scope"),
    ],
    ids=["no-pkce", "plain-pkce", "no-method", "wrong-resource", "implicit", "unknown-scope"],
)
async def test_request_problems_go_back_to_the_client(
    relay: TestClient, change: dict[str, str], error: str
) -> None:
    client_id = await register(relay)
    _, challenge = pkce_pair()
    params = {k: v for k, v in (request_params(client_id, challenge) | change).items() if v}
    answer = await relay.get("/oauth/authorize", params=params, allow_redirects=False)
    assert answer.status == 303
    location = answer.headers["Location"]
    assert location.startswith(REDIRECT + "?")
    assert f"error={error}" in location
    assert f"state={params['state']}" in location
    assert "code=" not in location


# ----------------------------------------------------------- token refusals


async def test_a_wrong_verifier_is_refused(relay: TestClient) -> None:
    done = await login(relay, await register(relay), RELAY_KEY)
    status, body = await tokens(relay, done, code_verifier=pkce_pair()[0])
    assert (status, body["error"]) == (400, "invalid_grant")


async def test_a_reused_code_fails_and_revokes_what_it_issued(relay: TestClient) -> None:
    done = await login(relay, await register(relay), RELAY_KEY)
    status, granted = await tokens(relay, done)
    assert status == 200
    status, body = await tokens(relay, done)
    assert (status, body["error"]) == (400, "invalid_grant")
    assert (await call_mcp(relay, granted["access_token"])).status == 401


async def test_an_expired_code_is_refused(start: Start) -> None:
    relay = await start(oauth={"code_ttl_s": 0.05})
    done = await login(relay, await register(relay), RELAY_KEY)
    await asyncio.sleep(0.1)  # past the code's 50 ms
    status, body = await tokens(relay, done)
    assert (status, body["error"]) == (400, "invalid_grant")


@pytest.mark.parametrize(
    ("change", "status", "error"),
    [
        ({"redirect_uri": "https://app.example/other"}, 400, "invalid_grant"),
        ({"resource": "https://elsewhere.example/mcp"}, 400, "invalid_target"),
        ({"client_id": "rlyc_unknown"}, 401, "invalid_client"),
        ({"grant_type": "password"}, 400, "unsupported_grant_type"),
        ({"code_verifier": ""}, 400, "invalid_request"),
    ],
    ids=["redirect-mismatch", "resource-mismatch", "unknown-client", "grant-type", "no-verifier"],
)
async def test_token_requests_are_checked_exactly(
    relay: TestClient, change: dict[str, str], status: int, error: str
) -> None:
    done = await login(relay, await register(relay), RELAY_KEY)
    got, body = await tokens(relay, done, **change)
    assert (got, body["error"]) == (status, error)
    assert "access_token" not in body


async def test_another_clients_code_is_refused(relay: TestClient) -> None:
    done = await login(relay, await register(relay), RELAY_KEY)
    other = await register(relay)
    status, body = await tokens(relay, done, client_id=other)
    assert (status, body["error"]) == (400, "invalid_grant")


async def test_a_reused_refresh_token_revokes_the_family(
    relay: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    client_id = await register(relay)
    done = await login(relay, client_id, RELAY_KEY, scope="mcp offline_access")
    _, first = await tokens(relay, done)
    _, second = await refresh(relay, client_id, first["refresh_token"])
    status, body = await refresh(relay, client_id, first["refresh_token"])  # a replay
    assert (status, body["error"]) == (400, "invalid_grant")
    assert "a refresh token was used a second time" in caplog.text  # the operator hears
    for token in (first["access_token"], second["access_token"]):
        assert (await call_mcp(relay, token)).status == 401
    status, body = await refresh(relay, client_id, second["refresh_token"])
    assert (status, body["error"]) == (400, "invalid_grant")


async def test_revoke_ends_the_grant(relay: TestClient) -> None:
    client_id = await register(relay)
    done = await login(relay, client_id, RELAY_KEY, scope="mcp offline_access")
    _, granted = await tokens(relay, done)
    revoked = await relay.post(
        "/oauth/revoke", data={"token": granted["access_token"], "client_id": client_id}
    )
    assert revoked.status == 200
    assert (await call_mcp(relay, granted["access_token"])).status == 401
    status, _ = await refresh(relay, client_id, granted["refresh_token"])
    assert status == 400
    unknown = await relay.post("/oauth/revoke", data={"token": "rlyat_nothing"})
    assert unknown.status == 200  # RFC 7009 §2.2: no oracle


async def test_a_removed_or_rotated_key_kills_its_tokens(relay: TestClient) -> None:
    client_id = await register(relay)
    done = await login(relay, client_id, RELAY_KEY, scope="mcp offline_access")
    _, granted = await tokens(relay, done)
    for _ in range(2):  # answered, and so perhaps remembered, before the key changes
        assert (await call_mcp(relay, granted["access_token"])).status == 200
    assert relay.app is not None
    keyring = relay.app[KEYRING]
    original = keyring.keys
    keyring.replace(parse_keys_env(f"other:{OTHER_KEY}"))  # SIGHUP without "team"
    gone = await call_mcp(relay, granted["access_token"])
    assert gone.status == 401
    assert 'error="invalid_token"' in gone.headers["WWW-Authenticate"]
    keyring.replace(parse_keys_env(f"team:{OTHER_KEY}-rotated"))  # same name, new secret
    assert (await call_mcp(relay, granted["access_token"])).status == 401
    status, body = await refresh(relay, client_id, granted["refresh_token"])
    assert (status, body["error"]) == (400, "invalid_grant")
    keyring.replace(original)


# ----------------------------------------------------------- the 401 challenge


async def test_the_mcp_endpoint_challenges_with_its_metadata(relay: TestClient) -> None:
    metadata = f"{PUBLIC_URL}/.well-known/oauth-protected-resource{MCP.path}"
    missing = await relay.post(MCP.path, json=PING)
    assert missing.status == 401
    assert missing.headers["WWW-Authenticate"] == f'Bearer resource_metadata="{metadata}"'
    wrong = await call_mcp(relay, "rlyat_not-a-real-token")
    assert wrong.status == 401
    assert wrong.headers["WWW-Authenticate"] == (
        f'Bearer resource_metadata="{metadata}", error="invalid_token"'
    )
    elsewhere = await relay.get("/v1/models")
    assert "WWW-Authenticate" not in elsewhere.headers


async def test_a_key_without_the_mcp_scope_hears_which_scope_would_do(start: Start) -> None:
    scoped = dataclasses.replace(
        parse_keys_env(f"scoped:{OTHER_KEY}")[0], scopes=frozenset({"meta"})
    )
    relay = await start(auth={"keys": (scoped,)})
    refused = await call_mcp(relay, OTHER_KEY)
    assert refused.status == 403
    challenge = refused.headers["WWW-Authenticate"]
    assert 'error="insufficient_scope"' in challenge and 'scope="mcp"' in challenge


# ------------------------------------------------------------- registration


@pytest.mark.parametrize(
    ("uris", "ok"),
    [
        (["https://app.example/cb"], True),
        (["http://127.0.0.1:33333/callback"], True),
        (["http://localhost:4000/cb"], True),
        (["http://app.example/cb"], False),
        (["https://app.example/cb#frag"], False),
        (["javascript:alert(1)"], False),
        ([], False),
    ],
    ids=["https", "loopback-ip", "localhost", "plain-http", "fragment", "javascript", "none"],
)
async def test_registration_takes_https_or_loopback_redirects_only(
    relay: TestClient, uris: list[str], ok: bool
) -> None:
    response = await relay.post("/oauth/register", json={"redirect_uris": uris})
    body = await response.json()
    if ok:
        assert response.status == 201
        assert body["token_endpoint_auth_method"] == "none"
        assert body["redirect_uris"] == uris
    else:
        assert (response.status, body["error"]) == (400, "invalid_redirect_uri")


async def test_registration_refuses_what_relayd_does_not_do(relay: TestClient) -> None:
    response = await relay.post(
        "/oauth/register",
        json={"redirect_uris": [REDIRECT], "grant_types": ["client_credentials"]},
    )
    assert (await response.json())["error"] == "invalid_client_metadata"
    response = await relay.post(
        "/oauth/register", data=b"[not json", headers={"Content-Type": "application/json"}
    )
    assert response.status == 400


def test_pkce_s256_matches_rfc_7636_appendix_b() -> None:
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert pkce_matches(verifier, "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM")
    assert not pkce_matches(verifier[:-1] + "l", "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM")


async def test_the_grant_store_holds_no_code_or_token(relay: TestClient) -> None:
    client_id = await register(relay)
    done = await login(relay, client_id, RELAY_KEY, scope="mcp offline_access")
    _, granted = await tokens(relay, done)
    _, renewed = await refresh(relay, client_id, granted["refresh_token"])
    assert relay.app is not None
    database = relay.app[OAUTH].store.path
    stored = b"".join(p.read_bytes() for p in database.parent.glob(database.name + "*"))
    issued = [done.code, *granted.values(), *renewed.values(), RELAY_KEY]
    found = [str(i)[:6] for i in issued if len(str(i)) > 20 and str(i).encode() in stored]
    assert not found, f"stored in the clear: {found}"


@pytest.mark.parametrize(
    "pattern",
    ["http://chatgpt.com/oauth/client.json", "https://*.example/client.json", "https://a/b?c=*"],
)
def test_client_document_patterns_must_be_https_with_exact_hosts(pattern: str) -> None:
    settings = make_settings(oauth={"client_documents": (pattern,)})
    with pytest.raises(ConfigError, match="client_documents"):
        validate(settings)


def test_serve_refuses_a_state_directory_it_cannot_create(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = {
        "PATH": os.environ.get("PATH", ""),
        "OPENAI_API_KEY": "sk-test-upstream",
        "RELAYD_KEYS": f"team:{RELAY_KEY}",
        "RELAYD_LISTEN": "127.0.0.1:0",
        "RELAYD_PUBLIC_URL": PUBLIC_URL,
        "RELAYD_STATE_DIR": str(blocker / "state"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "relayd", "serve"], env=env, capture_output=True, timeout=30
    )
    assert done.returncode == 2
    assert b"state directory" in done.stderr and b"OAuth grants" in done.stderr
