"""Safe download of user file links (docs/security.md#files-and-links).

A link is tried only if it is https (unless configured otherwise), carries no
credentials, and names an allowlisted host (ChatGPT's file hosts by default); an IP
literal must be a public address. The download itself runs on upstream.py's link
session, which refuses non-public peers at resolve and connect time, follows no
redirect, and is bounded here by a byte cap and one deadline for the whole fetch.
What comes back is labelled by its bytes (mime.py), never by the sender's word.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

import aiohttp
from yarl import URL

from relayd.actions.mime import sniff
from relayd.config import Settings
from relayd.connectors import non_public_literal
from relayd.errors import (
    BadRequestError,
    ClientRequestError,
    ForbiddenAddressError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RelaydError,
)
from relayd.memory import Lease
from relayd.upstream import Upstream, cause_chain

__all__ = ["Fetched", "check_link", "fetch_link"]

_READ: Final = 256 * 1024


@dataclass(frozen=True, slots=True)
class Fetched:
    data: bytearray  # filled in place as it arrives: one buffer, no joined copy
    media_type: str  # sniffed from the bytes
    filename: str  # the link's last path segment, "" if none


@contextlib.contextmanager
def link_errors(what: str) -> Iterator[None]:
    """Translate failures fetching a user's file link into the caller's 4xx errors."""
    try:
        yield
    except RelaydError:
        raise
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        for cause in cause_chain(exc):
            if isinstance(cause, ForbiddenAddressError):
                raise PermissionDeniedError(
                    f"Refusing to fetch {what}: {cause}.", code="file_url_forbidden"
                ) from exc
        if isinstance(exc, TimeoutError):
            raise BadRequestError(
                f"Fetching {what} took too long.", code="file_fetch_timeout"
            ) from exc
        if isinstance(exc, aiohttp.ClientConnectorCertificateError):
            raise BadRequestError(
                f"Fetching {what} failed: its TLS certificate is not valid.",
                code="file_fetch_failed",
            ) from exc
        raise BadRequestError(
            f"Fetching {what} failed ({type(exc).__name__}).", code="file_fetch_failed"
        ) from exc


def _forbidden(message: str, param: str | None) -> PermissionDeniedError:
    return PermissionDeniedError(message, code="file_url_forbidden", param=param)


def check_link(
    url_text: str,
    settings: Settings,
    *,
    param: str | None = None,
    extra_hosts: tuple[str, ...] = (),
) -> URL:
    """The parsed link if relayd may try it; a 400/403 naming ``param`` otherwise.
    ``extra_hosts``: patterns the calling face adds to ``[actions] fetch_hosts``
    (ChatGPT apps' file hosts, ``[mcp] fetch_hosts``)."""
    try:
        url = URL(url_text)
    except (ValueError, TypeError) as exc:
        raise BadRequestError(f"{param or 'The link'} is not a URL.", param=param) from exc
    schemes = ("https",) if settings.actions.fetch_https_only else ("https", "http")
    if url.scheme not in schemes or not url.host:
        raise _forbidden(
            f"Only absolute {' or '.join(schemes)} links are fetched; got {url.scheme or 'none'}.",
            param,
        )
    if url.user is not None or url.password is not None:
        raise _forbidden("Links with credentials in them are not fetched.", param)
    host = url.host.lower().rstrip(".")
    allowed = (*settings.actions.fetch_hosts, *extra_hosts)
    if not any(fnmatch.fnmatchcase(host, p.lower()) for p in allowed):
        raise _forbidden(
            f"Links to {host} are not fetched; allowed hosts: {', '.join(allowed)}.",
            param,
        )
    if not settings.actions.fetch_allow_private and (reason := non_public_literal(host)):
        raise _forbidden(f"Refusing to fetch the link: {reason}.", param)
    return url


async def fetch_link(
    upstream: Upstream,
    settings: Settings,
    url_text: str,
    *,
    param: str | None = None,
    lease: Lease | None = None,
    extra_hosts: tuple[str, ...] = (),
) -> Fetched:
    """Download a user's file link whole, under the size cap and the fetch deadline.

    Refusals and failures are the caller's 4xx, naming ``param``: 403 for a link
    relayd will not fetch (scheme, host, private address, redirect), 413 past the
    cap, 400 for a link that failed or was too slow. Nothing goes upstream here.
    The bytes are held whole, so they are reserved in ``lease`` (the request's share
    of the memory budget) as they arrive.
    """
    url = check_link(url_text, settings, param=param, extra_hosts=extra_hosts)
    cap = settings.actions.max_file_bytes
    what = param or "the link"
    try:
        with link_errors(what):
            async with asyncio.timeout(settings.actions.fetch_timeout_s):
                async with upstream.open_link(url) as response:
                    if 300 <= response.status < 400:
                        raise _forbidden(
                            f"{what} answered with a redirect (HTTP {response.status}); "
                            "redirects are not followed.",
                            param,
                        )
                    if response.status != 200:
                        raise BadRequestError(
                            f"{what} could not be downloaded (HTTP {response.status}); "
                            "ChatGPT's file links expire after five minutes.",
                            code="file_fetch_failed",
                        )
                    if response.content_length is not None and response.content_length > cap:
                        raise _too_large(what, cap, param)
                    data = bytearray()
                    while chunk := await response.content.read(_READ):
                        if len(data) + len(chunk) > cap:
                            raise _too_large(what, cap, param)
                        if lease is not None:
                            lease.grow(len(chunk))
                        data += chunk
    except ClientRequestError as exc:
        exc.param = exc.param or param
        raise
    return Fetched(data, sniff(data), posixpath.basename(url.path))


def _too_large(what: str, cap: int, param: str | None) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"{what} is larger than the relay's limit of {cap} bytes.",
        code="file_too_large",
        param=param,
    )
