"""Where the OAuth documents live and what they say (RFC 8414, RFC 9728).

Every URL is made from ``[server] public_url`` and the route table, never from the
request's ``Host`` or forwarding headers: a client that trusts these documents
trusts relayd's configuration, not whoever reached it. The protected resource is
the route of group ``mcp`` (``POST /mcp``): its metadata sits at the path-inserted
well-known URL (RFC 9728 §3.1) and also at the bare one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from relayd.config import Settings
from relayd.errors import PublicUrlNotSetError
from relayd.routing import Route, RouteTable

__all__ = [
    "OFFLINE_ACCESS",
    "PROTECTED_GROUP",
    "RESOURCE_METADATA",
    "Endpoints",
    "protected_route",
    "resource_metadata_path",
]

RESOURCE_METADATA: Final = "/.well-known/oauth-protected-resource"  # RFC 9728 §3
PROTECTED_GROUP: Final = "mcp"  # the route group OAuth tokens are issued for
OFFLINE_ACCESS: Final = "offline_access"  # asks for refresh tokens (OIDC Core §11)

# The operationIds of the authorization server's own routes (relayd/routes.py).
AUTHORIZE_OPERATION: Final = "showOAuthAuthorize"
TOKEN_OPERATION: Final = "createOAuthToken"
REVOKE_OPERATION: Final = "revokeOAuthToken"
REGISTER_OPERATION: Final = "registerOAuthClient"


def resource_metadata_path(resource_path: str) -> str:
    """RFC 9728 §3.1: the well-known segment goes between host and path."""
    return RESOURCE_METADATA + resource_path


def protected_route(table: RouteTable) -> Route | None:
    """The route OAuth protects (the MCP endpoint), if the table serves one."""
    return next((r for r in table if r.group == PROTECTED_GROUP and r.method == "POST"), None)


@dataclass(frozen=True, slots=True)
class Endpoints:
    """relayd's OAuth URLs, from the public url and the table."""

    issuer: str
    resource: str
    resource_metadata: str
    authorize: str
    token: str
    revoke: str
    register: str
    scopes: tuple[str, ...]  # the route groups behind a key, sorted

    @classmethod
    def build(cls, settings: Settings, table: RouteTable) -> Endpoints | None:
        """None without a public url (relayd never guesses its own origin), or for a
        table that serves no OAuth routes."""
        if not settings.server.public_url:
            return None
        operations = {route.operation_id for route in table}
        if not {AUTHORIZE_OPERATION, TOKEN_OPERATION} <= operations:
            return None
        issuer = settings.server.public_url.rstrip("/")
        protected = protected_route(table)
        resource_path = protected.path if protected is not None else "/"
        path = table.by_operation_id
        return cls(
            issuer=issuer,
            resource=issuer + resource_path,
            resource_metadata=issuer + resource_metadata_path(resource_path),
            authorize=issuer + path(AUTHORIZE_OPERATION).path,
            token=issuer + path(TOKEN_OPERATION).path,
            revoke=issuer + path(REVOKE_OPERATION).path,
            register=issuer + path(REGISTER_OPERATION).path,
            # The groups a key's scopes matter for: those with a route that needs one.
            scopes=tuple(sorted({route.group for route in table if route.needs_key})),
        )

    def server_document(self, settings: Settings) -> dict[str, Any]:
        """RFC 8414 authorization server metadata (served as openid-configuration
        too: ChatGPT asks for both). Only what relayd really does is advertised."""
        document: dict[str, Any] = {
            "issuer": self.issuer,
            "authorization_endpoint": self.authorize,
            "token_endpoint": self.token,
            "revocation_endpoint": self.revoke,
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["none"],
            "revocation_endpoint_auth_methods_supported": ["none"],
            "scopes_supported": [*self.scopes, OFFLINE_ACCESS],
            "client_id_metadata_document_supported": bool(settings.oauth.client_documents),
            # RFC 9207: every authorization response carries iss.
            "authorization_response_iss_parameter_supported": True,
        }
        if settings.oauth.registration:
            document["registration_endpoint"] = self.register
        return document

    def resource_document(self, settings: Settings) -> dict[str, Any]:
        """RFC 9728 protected resource metadata; offline_access stays out of it (the
        MCP authorization spec: it is the server's scope, not the resource's)."""
        return {
            "resource": self.resource,
            "authorization_servers": [self.issuer],
            "scopes_supported": list(self.scopes),
            "bearer_methods_supported": ["header"],
            "resource_name": settings.meta.name,
        }


def require(endpoints: Endpoints | None) -> Endpoints:
    if endpoints is None:
        raise PublicUrlNotSetError(
            "OAuth needs the relay's public https origin: set RELAYD_PUBLIC_URL "
            "([server] public_url). relayd never derives it from the request."
        )
    return endpoints
