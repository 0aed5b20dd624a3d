"""OAuth's own error answers (RFC 6749 §5.2), apart from relayd's OpenAI shape.

The token, revocation and registration endpoints answer OAuth clients, which read
``{"error": ..., "error_description": ...}``; the authorize endpoint answers a
person in a browser (an error page) or, once the client and its redirect URI are
known good, the client, through its redirect (§4.1.2.1). Nothing secret is ever
put in a description.
"""

from __future__ import annotations

import json
from typing import Final

from aiohttp import web

__all__ = ["NO_STORE", "LoginPageError", "OAuthError", "RedirectError"]

# RFC 6749 §5.1: answers carrying tokens (and their errors) are never cached.
NO_STORE: Final = {"Cache-Control": "no-store", "Pragma": "no-cache"}


class OAuthError(Exception):
    """An error answered as RFC 6749 JSON: ``error`` is the RFC's code."""

    def __init__(self, error: str, description: str, *, status: int = 400) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status

    def response(self) -> web.Response:
        headers = dict(NO_STORE)
        if self.status == 401:
            # RFC 6749 §5.2: a 401 for invalid_client names the scheme to use.
            headers["WWW-Authenticate"] = 'Basic realm="relayd"'
        body = {"error": self.error, "error_description": self.description}
        return web.Response(
            status=self.status,
            body=json.dumps(body).encode(),
            content_type="application/json",
            headers=headers,
        )


class LoginPageError(Exception):
    """A problem shown to the person on the login page: the client or its redirect
    URI cannot be trusted, so nothing is sent back to it (RFC 6749 §4.1.2.1)."""

    def __init__(self, description: str, *, status: int = 400) -> None:
        super().__init__(description)
        self.description = description
        self.status = status


class RedirectError(Exception):
    """An error the client hears through its (verified) redirect URI."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
