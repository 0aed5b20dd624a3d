"""An OAuth client's side of relayd's login, for the tests: PKCE, the login form, codes.

What a browser would do is done with an aiohttp session (it keeps the login
cookie): GET the page, read its hidden fields, post them with a relay key, read
where the 303 points.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
from aiohttp.test_utils import TestClient

from tests.conftest import CANARY

REDIRECT = "https://app.example/callback"
_INPUT = re.compile(r'<input type="hidden" name="([^"]+)" value="([^"]*)">')


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
    return verifier, challenge.rstrip(b"=").decode()


def hidden_fields(page: str) -> dict[str, str]:
    from html import unescape

    return {name: unescape(value) for name, value in _INPUT.findall(page)}


@dataclass
class Login:
    """One authorization request and what came of it."""

    client_id: str
    verifier: str
    params: dict[str, str]
    location: str | None = None

    @property
    def answer(self) -> dict[str, str]:
        assert self.location is not None, "no redirect"
        return {k: v[0] for k, v in parse_qs(urlsplit(self.location).query).items()}

    @property
    def code(self) -> str:
        return CANARY.watch_logs(self.answer["code"])


async def register(relay: TestClient, redirect: str = REDIRECT, **extra: Any) -> str:
    response = await relay.post(
        "/oauth/register", json={"redirect_uris": [redirect], "client_name": "Test app", **extra}
    )
    assert response.status == 201, await response.text()
    return str((await response.json())["client_id"])


def request_params(client_id: str, challenge: str, **extra: str) -> dict[str, str]:
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": REDIRECT,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "state": "st-" + secrets.token_hex(4),
    }
    params.update(extra)
    return {k: v for k, v in params.items() if v != ""}


async def login(
    relay: TestClient | aiohttp.ClientSession,
    client_id: str,
    key: str,
    *,
    base: str = "",
    **extra: str,
) -> Login:
    """The whole login: page, form, redirect. ``extra`` adds request parameters."""
    verifier, challenge = pkce_pair()
    params = request_params(client_id, challenge, **extra)
    page = await relay.get(f"{base}/oauth/authorize", params=params, allow_redirects=False)
    assert page.status == 200, await page.text()
    form = hidden_fields(await page.text())
    form.update(relay_key=key, action="allow")
    posted = await relay.post(f"{base}/oauth/authorize", data=form, allow_redirects=False)
    assert posted.status == 303, await posted.text()
    return Login(client_id, verifier, params, posted.headers["Location"])


async def tokens(
    relay: TestClient | aiohttp.ClientSession, done: Login, *, base: str = "", **extra: str
) -> tuple[int, dict[str, Any]]:
    form = {
        "grant_type": "authorization_code",
        "code": done.code,
        "code_verifier": done.verifier,
        "redirect_uri": done.params["redirect_uri"],
        "client_id": done.client_id,
    }
    form.update(extra)
    response = await relay.post(f"{base}/oauth/token", data=form)
    body = await response.json()
    for name in ("access_token", "refresh_token"):
        if name in body:
            CANARY.watch_logs(body[name])
    return response.status, body


async def refresh(
    relay: TestClient | aiohttp.ClientSession, client_id: str, token: str, *, base: str = ""
) -> tuple[int, dict[str, Any]]:
    form = {"grant_type": "refresh_token", "refresh_token": token, "client_id": client_id}
    response = await relay.post(f"{base}/oauth/token", data=form)
    body = await response.json()
    for name in ("access_token", "refresh_token"):
        if name in body:
            CANARY.watch_logs(body[name])
    return response.status, body


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
