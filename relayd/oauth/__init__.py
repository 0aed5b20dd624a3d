"""relayd as an OAuth 2.1 authorization server for its own relay keys
(docs/security.md#oauth).

ChatGPT apps cannot send a relay key; they speak OAuth. A person links an app once
by typing their relay key on relayd's login page; the app then holds opaque tokens
that act as that key (its name, its scopes narrowed to the token's) until the key
is removed or replaced, the token expires, or the grant is revoked.

- :mod:`~relayd.oauth.metadata`: the URLs and the RFC 8414 / RFC 9728 documents;
- :mod:`~relayd.oauth.authority`: every decision of the flow;
- :mod:`~relayd.oauth.clients`: client ID metadata documents, dynamic registration;
- :mod:`~relayd.oauth.tokens`: secrets, digests, PKCE;
- :mod:`~relayd.oauth.page`: the login page (its limit: :mod:`relayd.store.attempts`);
- :mod:`~relayd.oauth.endpoints`: the thin route handlers.

This package opens no connection and holds no SQL: grants live in
:mod:`relayd.store.grants`, and client documents are fetched by a function the
application hands in (relayd/client_documents.py).
"""

from __future__ import annotations

from relayd.oauth.authority import Authority as Authority
from relayd.oauth.metadata import Endpoints as Endpoints

__all__ = ["Authority", "Endpoints"]
