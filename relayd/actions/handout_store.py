"""Short-lived signed download links for files relayd hands back to ChatGPT.

GPT Actions show files only through ``openaiFileResponse``: inline base64, or https URLs
that answer with ``Content-Type`` and ``Content-Disposition`` within 10 s
(docs/chatgpt.md#files-out-openaifileresponse, docs/security.md#signed-links). ChatGPT
fetches those URLs without the action's credentials, so the URL itself is the
credential: an HMAC-SHA256-signed token with an expiry.

- Upstream files and videos need no storage: the token names the upstream object
  (stateless), and the download handler streams it from upstream when asked.
- Bytes relayd made itself (images decoded from ``b64_json``) go to the blob store
  (relayd/store/blobs.py): files under the state directory, or the shared Redis,
  kept as long as their link lives.

The signing key is the same for every worker and instance (relayd/store/signing.py):
from the operator, or made once and kept in the state directory; never per process.

A link lives no longer than the relay key that asked for it (issue 11, item 7): the
token names that key and a fingerprint of it (an HMAC of its digest, so the token
reveals nothing of the key), and a reload that removes the key or replaces its
secret makes the link a 404 ``link_revoked``. A link made in keyless mode stops
working once keys are required.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from relayd.auth import KeyRing
from relayd.config import RelayKey, Settings
from relayd.errors import NotFoundError, PayloadTooLargeError
from relayd.state import HANDOUTS
from relayd.store.blobs import BlobStore, BlobTooLargeError

__all__ = ["Claims", "HandoutStore", "handout_store_ctx"]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class Claims:
    """What a download link names: an upstream object or a stored blob, and its labels."""

    kind: str  # "file" (upstream /v1/files), "video" (upstream /v1/videos), "blob"
    ref: str  # the upstream id, or the blob id
    filename: str
    media_type: str
    variant: str | None = None  # videos: video, thumbnail or spritesheet


class _Signer:
    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def sign(self, claims: Claims, expires: float, holder: RelayKey | None) -> str:
        body: dict[str, str | int] = {
            "k": claims.kind,
            "r": claims.ref,
            "n": claims.filename,
            "t": claims.media_type,
        }
        if claims.variant:
            body["v"] = claims.variant
        if holder is not None:
            body["a"] = holder.name
            body["f"] = self.fingerprint(holder)
        body["e"] = int(expires)
        payload = _b64(json.dumps(body, separators=(",", ":")).encode())
        return f"{payload}.{self._mac(payload)}"

    def fingerprint(self, key: RelayKey) -> str:
        return _b64(hmac.new(self._secret, b"holder\0" + key.digest, hashlib.sha256).digest()[:12])

    def verify(self, token: str, now: float) -> tuple[Claims, tuple[str, str] | None]:
        """The claims of a token this signer made, and the key that asked for it
        (name, fingerprint) if one did."""
        payload, _, mac = token.partition(".")
        # A token we made is URL-safe base64, so ASCII; compare_digest raises
        # TypeError on any other str, which must not be a 500.
        if not mac or not token.isascii() or not hmac.compare_digest(mac, self._mac(payload)):
            raise NotFoundError("This download link is not valid.", code="link_invalid")
        try:
            body: dict[str, Any] = json.loads(_unb64(payload))
            claims = Claims(body["k"], body["r"], body["n"], body["t"], body.get("v"))
            expires = int(body["e"])
            holder = (str(body["a"]), str(body["f"])) if "a" in body else None
        except (ValueError, KeyError, TypeError) as exc:  # signed but not ours: a key reuse
            raise NotFoundError("This download link is not valid.", code="link_invalid") from exc
        if expires < now:
            raise NotFoundError("This download link has expired.", code="link_expired")
        return claims, holder

    def _mac(self, payload: str) -> str:
        return _b64(hmac.new(self._secret, payload.encode(), hashlib.sha256).digest())


class HandoutStore:
    """Signs download links and keeps the bytes that need keeping (in the shared
    :class:`~relayd.store.blobs.BlobStore`, so any worker or instance serves them).

    Built with the app; its ``cleanup_ctx`` (:func:`handout_store_ctx`) closes the
    blob store when the app stops.
    """

    def __init__(
        self, settings: Settings, keyring: KeyRing, blobs: BlobStore, secret: bytes
    ) -> None:
        self._signer = _Signer(secret)
        self._settings = settings
        self._keyring = keyring
        self._ttl_s = settings.actions.link_ttl_s
        self.blobs = blobs

    async def close(self) -> None:
        await self.blobs.close()

    def token(self, claims: Claims, holder: RelayKey | None) -> str:
        """A signed token naming ``claims``, valid for ``[actions] link_ttl`` seconds
        and while ``holder`` (the relay key of the request, if any) stays."""
        return self._signer.sign(claims, time.time() + self._ttl_s, holder)

    def claims(self, token: str) -> Claims:
        """What a valid, unexpired, unrevoked token names; else a 404 saying which."""
        claims, holder = self._signer.verify(token, time.time())
        if holder is None:
            revoked = bool(self._keyring.keys) and not self._settings.auth.disabled
        else:
            name, fingerprint = holder
            key = self._keyring.by_name(name)
            revoked = key is None or not hmac.compare_digest(
                self._signer.fingerprint(key), fingerprint
            )
        if revoked:
            raise NotFoundError(
                "This download link was revoked with the relay key that asked for it.",
                code="link_revoked",
            )
        return claims

    async def keep(self, data: bytes | bytearray) -> str:
        """Store ``data`` for as long as its link lives; the blob id to put in the
        link's claims. A file too large for a link is a 413; a store that does not
        answer, a 503 (StoreUnavailableError)."""
        try:
            return await self.blobs.put(data, self._ttl_s)
        except BlobTooLargeError as exc:
            raise PayloadTooLargeError(
                f"The file is too large for a download link: {exc}.", code="file_too_large"
            ) from None

    async def blob(self, blob_id: str) -> bytes | Path:
        """A stored blob's bytes (or its file); a 404 once it expired."""
        found = await self.blobs.get(blob_id)
        if found is None:
            raise NotFoundError("This download link has expired.", code="link_expired")
        return found


async def handout_store_ctx(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx``: the download store lives as long as the app."""
    try:
        yield
    finally:
        await app[HANDOUTS].close()
