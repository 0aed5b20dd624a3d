"""Bytes behind download links: kept for a while, readable by every worker and instance.

A signed link (actions/handout_store.py) names a blob by a random id; whoever
serves the link fetches the bytes from here. Two backends, one contract
(:class:`BlobStore`):

- :class:`LocalBlobStore`: one file per blob in a directory (``[actions] store_dir``,
  else ``files`` in the state directory), shared by every worker of one machine and
  kept across restarts. A blob's expiry is its file's modification time; the
  oldest to expire go first when the directory is over ``[actions] store_max_bytes``.
- :class:`RedisBlobStore`: one key per blob (``SET … PX ttl``) on the shared server,
  so a link made through one instance is served by any other. Redis's own memory
  limit bounds the total; each key expires with its link.

The blob holds bytes only: its name and media type travel in the signed link,
which no one can alter, so nothing else needs keeping beside it.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol

from relayd.config import Settings
from relayd.store import state_dir, state_path
from relayd.store.deadlines import bounded
from relayd.store.redis import key

__all__ = [
    "MAX_BLOB_BYTES",
    "BlobStore",
    "BlobTooLargeError",
    "LocalBlobStore",
    "RedisBlobStore",
    "blob_directory",
    "open_blob_store",
]

if TYPE_CHECKING:
    from redis import asyncio as aioredis

# ChatGPT takes files of at most 10 MB from an action
# (docs/chatgpt.md#files-out-openaifileresponse): a larger blob could never be
# fetched by it, and would sit in Redis's memory for nothing.
MAX_BLOB_BYTES: Final = 10 * 1024 * 1024
_ID_CHARS: Final = 32  # hex characters of a blob id
# A blob this long past its expiry (or a temporary file torn by a crash) is swept.
_SWEEP_GRACE_S: Final = 60.0


class BlobTooLargeError(ValueError):
    """A blob over :data:`MAX_BLOB_BYTES`; nothing was stored."""

    def __init__(self, size: int) -> None:
        super().__init__(
            f"a download link holds at most {MAX_BLOB_BYTES} bytes (ChatGPT's 10 MB per "
            f"file); this file has {size}"
        )
        self.size = size


class BlobStore(Protocol):
    """Where the bytes behind download links wait to be fetched."""

    async def put(self, data: bytes | bytearray, ttl_s: float) -> str:
        """Keep ``data`` for ``ttl_s`` seconds; its id. BlobTooLargeError over
        :data:`MAX_BLOB_BYTES`; StoreUnavailableError when the store fails."""
        ...

    async def get(self, blob_id: str) -> bytes | Path | None:
        """The blob: its bytes, or (local) the file holding them, to be sent as it
        is; None when unknown or expired."""
        ...

    async def close(self) -> None: ...


def _new_id() -> str:
    return secrets.token_hex(_ID_CHARS // 2)


def _valid_id(blob_id: str) -> bool:
    return len(blob_id) == _ID_CHARS and all(c in "0123456789abcdef" for c in blob_id)


def _check_size(data: bytes | bytearray) -> None:
    if len(data) > MAX_BLOB_BYTES:
        raise BlobTooLargeError(len(data))


def blob_directory(settings: Settings) -> Path:
    """Where the local backend keeps blobs (not created): ``[actions] store_dir``,
    else ``files`` under the state directory path."""
    if settings.actions.store_dir is not None:
        return Path(settings.actions.store_dir)
    return state_path(settings) / "files"


class LocalBlobStore:
    """Files named by their ids in one directory; the blocking work runs in a thread."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.directory = directory
        self._max_bytes = max_bytes

    async def put(self, data: bytes | bytearray, ttl_s: float) -> str:
        _check_size(data)
        return await asyncio.to_thread(self._put, bytes(data), time.time() + ttl_s)

    async def get(self, blob_id: str) -> Path | None:
        return await asyncio.to_thread(self._path, blob_id)

    async def close(self) -> None:
        return None

    def _put(self, data: bytes, expires: float) -> str:
        blob_id = _new_id()
        temporary = self.directory / f".{blob_id}.tmp"
        temporary.write_bytes(data)
        os.utime(temporary, (expires, expires))  # the expiry, read back by _path
        temporary.rename(self.directory / blob_id)  # readers never see half a file
        self.sweep(keep=blob_id)
        return blob_id

    def _path(self, blob_id: str) -> Path | None:
        if not _valid_id(blob_id):
            return None
        path = self.directory / blob_id
        try:
            live = path.stat().st_mtime > time.time()
        except OSError:
            return None
        return path if live else None

    def sweep(self, keep: str | None = None) -> None:
        """Remove expired blobs, then those closest to expiry while over budget."""
        now = time.time()
        entries: list[tuple[float, int, Path]] = []
        for path in self.directory.iterdir():
            try:
                stat = path.stat()
            except OSError:
                continue  # another worker removed it
            if stat.st_mtime < now - _SWEEP_GRACE_S:
                path.unlink(missing_ok=True)
            elif path.name.startswith(".") and stat.st_ctime < now - _SWEEP_GRACE_S:
                path.unlink(missing_ok=True)  # a temporary file a crash left behind
            else:
                entries.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self._max_bytes:
                break
            if path.name != keep:
                path.unlink(missing_ok=True)
                total -= size


class RedisBlobStore:
    """One key per blob on the shared server, expiring with its link."""

    def __init__(self, client: aioredis.Redis, settings: Settings) -> None:
        self._client = client
        self._settings = settings

    def _key(self, blob_id: str) -> str:
        return key(self._settings, "blob", blob_id)

    async def put(self, data: bytes | bytearray, ttl_s: float) -> str:
        _check_size(data)
        blob_id = _new_id()
        async with bounded(self._settings, "storing a download"):
            await self._client.set(self._key(blob_id), bytes(data), px=max(1, int(ttl_s * 1000)))
        return blob_id

    async def get(self, blob_id: str) -> bytes | None:
        if not _valid_id(blob_id):
            return None
        async with bounded(self._settings, "reading a download"):
            found = await self._client.get(self._key(blob_id))
        return found if isinstance(found, bytes) else None

    async def close(self) -> None:
        return None  # the client is the application's (state.STORE_CLIENT)


def open_blob_store(settings: Settings, client: aioredis.Redis | None) -> BlobStore:
    """The blob store ``[store] backend`` names (``client``: the shared one, for redis)."""
    if settings.store.backend == "redis":
        assert client is not None, "backend redis: the app makes the client first"
        return RedisBlobStore(client, settings)
    if settings.actions.store_dir is None:
        state_dir(settings)  # made 0700 first: the files directory sits inside it
    return LocalBlobStore(blob_directory(settings), settings.actions.store_max_bytes)
