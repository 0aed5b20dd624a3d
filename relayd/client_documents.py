"""Fetching OAuth client ID metadata documents, for relayd/oauth/ (which never
opens a connection itself; the application hands it :func:`document_fetcher`).

The same care as user file links (relayd/actions/fetch.py): upstream.py's link
session, which holds no credentials, follows no redirect and reaches public
addresses only; https only; one deadline for the whole fetch; a byte cap counted
as the body arrives; and the answer must say it is JSON.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiohttp
from yarl import URL

from relayd.config import Settings
from relayd.connectors import non_public_literal
from relayd.oauth.clients import DocumentFetchError
from relayd.upstream import Upstream

__all__ = ["document_fetcher", "fetch_client_document"]


def document_fetcher(upstream: Upstream, settings: Settings) -> Callable[[str], Awaitable[bytes]]:
    async def fetch(url: str) -> bytes:
        return await fetch_client_document(upstream, settings, url)

    return fetch


async def fetch_client_document(upstream: Upstream, settings: Settings, url_text: str) -> bytes:
    """The document's bytes; DocumentFetchError (a reason a person can read) if not."""
    url = URL(url_text)
    if url.scheme != "https" or not url.host:
        raise DocumentFetchError("is not an https URL")
    if url.user is not None or url.password is not None:
        raise DocumentFetchError("carries credentials in its URL")
    if not settings.actions.fetch_allow_private and (reason := non_public_literal(url.host)):
        raise DocumentFetchError(f"points at {reason}")
    oauth = settings.oauth
    cap = oauth.client_document_max_bytes
    try:
        async with asyncio.timeout(oauth.client_document_timeout_s):
            async with upstream.open_link(url) as response:
                if 300 <= response.status < 400:
                    raise DocumentFetchError(
                        f"answered with a redirect (HTTP {response.status}); relayd follows none"
                    )
                if response.status != 200:
                    raise DocumentFetchError(f"answered HTTP {response.status}")
                media = response.content_type
                if media != "application/json" and not media.endswith("+json"):
                    raise DocumentFetchError(f"is not JSON (Content-Type {media})")
                if response.content_length is not None and response.content_length > cap:
                    raise DocumentFetchError(f"is larger than {cap} bytes")
                data = bytearray()
                while chunk := await response.content.read(cap + 1 - len(data)):
                    data += chunk
                    if len(data) > cap:
                        raise DocumentFetchError(f"is larger than {cap} bytes")
                return bytes(data)
    except TimeoutError:
        raise DocumentFetchError(
            f"took longer than {oauth.client_document_timeout_s:g} s to fetch"
        ) from None
    except (aiohttp.ClientError, OSError) as exc:
        raise DocumentFetchError(f"could not be fetched ({type(exc).__name__})") from None
