"""Short-lived signed download links for files relayd hands back to ChatGPT.

GPT Actions show files only through ``openaiFileResponse``: inline base64, or https URLs
that answer with ``Content-Type`` and ``Content-Disposition`` within 10 s
(docs/chatgpt.md#files-out-openaifileresponse, docs/security.md#signed-links). ChatGPT
fetches those URLs without the action's credentials, so the URL itself is the
credential: an HMAC-SHA256-signed token with an expiry.

- Upstream files and videos need no storage: the token names the upstream object
  (stateless), and the download handler streams it from upstream when asked.
- Bytes relayd made itself (images decoded from ``b64_json``) go to a bounded
  on-disk store: files older than the link lifetime are removed, and the oldest go
  first when the store is over its byte budget.

The signing key comes from config, else it is random per process: links then work
only on the worker that made them, so several workers need a configured key (and a
shared ``store_dir``).

A link lives no longer than the relay key that asked for it (issue 11, item 7): the
token names that key and a fingerprint of it (an HMAC of its digest, so the token
reveals nothing of the key), and a reload that removes the key or replaces its
secret makes the link a 404 ``link_revoked``. A link made in keyless mode stops
working once keys are required.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from relayd.auth import KeyRing
from relayd.config import RelayKey, Settings
from relayd.errors import NotFoundError
from relayd.state import HANDOUTS

__all__ = ["Claims", "HandoutStore", "handout_store_ctx"]

log = logging.getLogger("relayd.actions.handout_store")

_BLOB_NAME: Final = 32  # hex characters of a blob id


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


class _BlobStore:
    """Files named by random ids in one directory; every method blocks (run in a thread)."""

    def __init__(self, directory: Path, max_bytes: int, ttl_s: float) -> None:
        self.directory = directory
        self._max_bytes = max_bytes
        self._ttl_s = ttl_s

    def put(self, data: bytes | bytearray) -> str:
        blob_id = secrets.token_hex(_BLOB_NAME // 2)
        temporary = self.directory / f".{blob_id}.tmp"
        temporary.write_bytes(data)
        temporary.rename(self.directory / blob_id)  # readers never see half a file
        self.sweep(keep=blob_id)
        return blob_id

    def path(self, blob_id: str) -> Path | None:
        if len(blob_id) != _BLOB_NAME or not all(c in "0123456789abcdef" for c in blob_id):
            return None
        path = self.directory / blob_id
        try:
            fresh = time.time() - path.stat().st_mtime <= self._ttl_s
        except OSError:
            return None
        return path if fresh else None

    def sweep(self, keep: str | None = None) -> None:
        """Remove expired blobs, then the oldest while the store is over budget."""
        now = time.time()
        entries: list[tuple[float, int, Path]] = []
        for path in self.directory.iterdir():
            try:
                stat = path.stat()
            except OSError:
                continue  # another worker removed it
            if now - stat.st_mtime > self._ttl_s + 60:  # stale, or a torn .tmp
                path.unlink(missing_ok=True)
            else:
                entries.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self._max_bytes:
                break
            if path.name != keep:
                path.unlink(missing_ok=True)
                total -= size


class HandoutStore:
    """Signs download links and keeps the bytes that need keeping.

    Built with the app; ``start()``/``close()`` (the app's ``cleanup_ctx``) make
    and remove the store's directory when relayd chose it.
    """

    def __init__(self, settings: Settings, keyring: KeyRing) -> None:
        secret = settings.actions.signing_secret
        self._signer = _Signer(secret.encode() if secret else secrets.token_bytes(32))
        self._settings = settings
        self._keyring = keyring
        self._ttl_s = settings.actions.link_ttl_s
        self._store: _BlobStore | None = None
        self._owned: Path | None = None

    def start(self) -> None:
        s = self._settings
        if s.actions.store_dir is not None:
            directory = Path(s.actions.store_dir)
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        else:
            # systemd's RuntimeDirectory= (private to the unit) when there is one.
            parent = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or None
            directory = self._owned = Path(tempfile.mkdtemp(prefix="relayd-files-", dir=parent))
        self._store = _BlobStore(directory, s.actions.store_max_bytes, self._ttl_s)
        if s.server.workers > 1 and not s.actions.signing_secret:
            log.warning(
                "several workers and no [actions] signing secret: a download link works "
                "only on the worker that made it; set signing_secret_file and store_dir"
            )

    def close(self) -> None:
        if self._owned is not None:
            shutil.rmtree(self._owned, ignore_errors=True)
            self._owned = None
        self._store = None

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
        """Store ``data``; the blob id to put in a link's claims."""
        return await asyncio.to_thread(self._running().put, data)

    async def blob_path(self, blob_id: str) -> Path:
        path = await asyncio.to_thread(self._running().path, blob_id)
        if path is None:
            raise NotFoundError("This download link has expired.", code="link_expired")
        return path

    def _running(self) -> _BlobStore:
        if self._store is None:
            raise RuntimeError("HandoutStore.start() was not called")
        return self._store


async def handout_store_ctx(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx``: the download store lives as long as the app."""
    store = app[HANDOUTS]
    store.start()
    try:
        yield
    finally:
        store.close()
