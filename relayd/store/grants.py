"""The OAuth grant store: clients, authorization codes, access and refresh tokens.

:class:`GrantStore` is the contract, with two backends chosen by ``[store] backend``
(:func:`open_grant_store`): :class:`SqliteGrantStore` here, and
:class:`~relayd.store.grants_redis.RedisGrantStore` for several machines. Codes
and tokens are stored only as their SHA-256 digests: a copy of the store lets
nobody act as anyone. A *family* is everything one authorization code led to (the
code, each access token, each refresh token it rotated into); revoking a family
ends all of it at once (a code used twice, an old refresh token used again,
``/oauth/revoke``). Codes and tokens are kept a day past their expiry, so a late
replay still finds, and revokes, its family.

Every method may raise :class:`~relayd.store.redis.StoreUnavailableError` when the
store cannot answer (a 503 for the request, never a 401 or a 500).

The SQLite backend is one database (``oauth.sqlite3`` under the state directory), so
every worker and every restart sees the same grants. Every call is one short
transaction on the event loop's thread: each touches a handful of rows by primary
key, which costs microseconds, far below what handing it to a thread would. The
check of an access token, made on every bearer request, is cheaper still: each
worker remembers live tokens' grants until ``oauth.epoch``, eight shared bytes
that every change renews, says the database changed (:class:`_Epoch`).
"""

from __future__ import annotations

import functools
import json
import logging
import mmap
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, ParamSpec, Protocol, TypeVar

from relayd.config import Settings
from relayd.store import state_dir, state_path
from relayd.store.redis import StoreUnavailableError
from relayd.store.sqlite import open_database

if TYPE_CHECKING:
    from redis import asyncio as aioredis

__all__ = [
    "ClientRecord",
    "CodeRecord",
    "Grant",
    "GrantStore",
    "ReplayError",
    "SqliteGrantStore",
    "forget_remembered_grants",
    "open_grant_store",
]

log = logging.getLogger("relayd.oauth")

FILENAME: Final = "oauth.sqlite3"
EPOCH_FILENAME: Final = "oauth.epoch"

_T = TypeVar("_T")
_P = ParamSpec("_P")

_MIGRATIONS: Final = (
    """
    CREATE TABLE clients (
        client_id TEXT PRIMARY KEY,
        origin TEXT NOT NULL,              -- 'registered' or 'document'
        name TEXT NOT NULL,
        redirect_uris TEXT NOT NULL,       -- JSON list
        auth_method TEXT NOT NULL,
        saved_at REAL NOT NULL
    );
    CREATE TABLE families (
        family TEXT PRIMARY KEY,
        client_id TEXT NOT NULL,
        key_name TEXT NOT NULL,
        key_print TEXT NOT NULL,
        scopes TEXT,                       -- JSON list; NULL: all of the key's
        resource TEXT NOT NULL,
        offline INTEGER NOT NULL,
        revoked INTEGER NOT NULL DEFAULT 0,
        created REAL NOT NULL
    );
    CREATE TABLE codes (
        code_hash BLOB PRIMARY KEY,
        family TEXT NOT NULL REFERENCES families (family) ON DELETE CASCADE,
        redirect_uri TEXT NOT NULL,
        challenge TEXT NOT NULL,
        expires REAL NOT NULL,
        used INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE tokens (
        token_hash BLOB PRIMARY KEY,
        family TEXT NOT NULL REFERENCES families (family) ON DELETE CASCADE,
        kind TEXT NOT NULL,                -- 'access' or 'refresh'
        expires REAL NOT NULL,
        used INTEGER NOT NULL DEFAULT 0    -- a refresh token that was rotated
    );
    CREATE INDEX tokens_by_family ON tokens (family);
    CREATE TABLE secrets (
        name TEXT PRIMARY KEY,
        value BLOB NOT NULL
    );
    """,
)


class ReplayError(Exception):
    """A code or refresh token was used a second time; its grant is now revoked."""

    def __init__(self, grant: Grant) -> None:
        super().__init__("replayed")
        self.grant = grant


@dataclass(frozen=True, slots=True)
class ClientRecord:
    client_id: str
    origin: str  # "registered" (POST /oauth/register) or "document" (a fetched CIMD)
    name: str
    redirect_uris: tuple[str, ...]
    auth_method: str
    saved_at: float = 0.0


@dataclass(frozen=True, slots=True)
class Grant:
    """What the user granted a client when they typed their relay key."""

    client_id: str
    key_name: str
    key_print: str  # a fingerprint of the key's digest: rotating the key ends the grant
    scopes: tuple[str, ...] | None  # route groups; None: all of the key's
    resource: str
    offline: bool  # offline_access: refresh tokens are issued


@dataclass(frozen=True, slots=True)
class CodeRecord:
    family: str
    grant: Grant
    redirect_uri: str
    challenge: str


# A token's row outlives its expiry by this much: a replay a day late is still caught.
REPLAY_MEMORY_S: Final = 86400.0


class GrantStore(Protocol):
    """Where OAuth grants live; every method is one atomic step."""

    async def secret(self, name: str) -> bytes:
        """A random 32-byte secret made once and shared by every worker and instance
        (the login form's CSRF key)."""
        ...

    async def save_client(self, client: ClientRecord) -> None: ...

    async def client(self, client_id: str) -> ClientRecord | None: ...

    async def add_code(
        self, code_hash: bytes, grant: Grant, redirect_uri: str, challenge: str, expires: float
    ) -> None:
        """A new family, and the authorization code that opens it."""
        ...

    async def take_code(self, code_hash: bytes) -> CodeRecord | None:
        """The code's grant, marking the code used. A code already used revokes its
        family (RFC 6749 §4.1.2: the tokens it issued must not outlive a replay)
        and raises ReplayError; an unknown, expired or revoked code is None."""
        ...

    async def add_tokens(self, family: str, tokens: list[tuple[bytes, str, float]]) -> None:
        """``(digest, kind, expires)`` rows for ``family``."""
        ...

    async def access(self, token_hash: bytes) -> Grant | None:
        """The grant behind a live access token (one read: every bearer request)."""
        ...

    async def use_refresh(self, token_hash: bytes) -> tuple[str, Grant] | None:
        """The family and grant of a live refresh token, which is used up by this.
        One used before revokes its whole family and raises ReplayError (OAuth 2.1
        §4.3.1: a replayed refresh token means it leaked)."""
        ...

    async def revoke(self, token_hash: bytes) -> bool:
        """Revoke the family of an access or refresh token; False if none is known."""
        ...

    async def close(self) -> None: ...


def open_grant_store(settings: Settings, client: aioredis.Redis | None) -> GrantStore:
    """The grant store ``[store] backend`` names (``client``: the shared one, for redis)."""
    if settings.store.backend == "redis":
        from relayd.store.grants_redis import RedisGrantStore

        assert client is not None, "backend redis: the app makes the client first"
        return RedisGrantStore(client, settings)
    return SqliteGrantStore.open(settings)


def _answered(
    method: Callable[_P, Coroutine[Any, Any, _T]],
) -> Callable[_P, Coroutine[Any, Any, _T]]:
    """A database that cannot be written (locked past busy_timeout, read-only, full)
    fails the call as an unavailable store, as Redis would."""

    @functools.wraps(method)
    async def call(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return await method(*args, **kwargs)
        except sqlite3.Error as exc:
            raise _unavailable(method.__name__, exc) from None

    return call


def _unavailable(what: str, exc: sqlite3.Error) -> StoreUnavailableError:
    return StoreUnavailableError(f"the grant store did not answer ({what}: {type(exc).__name__})")


class SqliteGrantStore:
    """The grants of one state directory. Not thread-safe: use it from the loop."""

    def __init__(self, path: Path, *, busy_timeout_s: float = 2.0) -> None:
        self.path = path
        self._db = open_database(path, _MIGRATIONS, busy_timeout_s=busy_timeout_s)
        self._epoch = _Epoch(path.with_name(EPOCH_FILENAME))
        # access(): token digest -> (grant, expires), valid while the epoch is _seen.
        self._live: dict[bytes, tuple[Grant, float]] = {}
        self._seen = b""

    @classmethod
    def open(cls, settings: Settings) -> SqliteGrantStore:
        return cls(state_dir(settings) / FILENAME, busy_timeout_s=settings.store.busy_timeout_s)

    async def close(self) -> None:
        self._db.close()
        self._epoch.close()

    def _write(self) -> _Transaction:
        return _Transaction(self._db, self._epoch)

    # ----------------------------------------------------------------- secrets

    @_answered
    async def secret(self, name: str) -> bytes:
        """A random 32-byte secret made once and shared by every worker (the login
        form's CSRF key)."""
        with self._write() as db:
            row = db.execute("SELECT value FROM secrets WHERE name = ?", (name,)).fetchone()
            if row is not None:
                return bytes(row[0])
            value = secrets.token_bytes(32)
            db.execute("INSERT INTO secrets (name, value) VALUES (?, ?)", (name, value))
            return value

    # ----------------------------------------------------------------- clients

    @_answered
    async def save_client(self, client: ClientRecord) -> None:
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO clients VALUES (?, ?, ?, ?, ?, ?)",
                (
                    client.client_id,
                    client.origin,
                    client.name,
                    json.dumps(list(client.redirect_uris)),
                    client.auth_method,
                    client.saved_at or time.time(),
                ),
            )

    @_answered
    async def client(self, client_id: str) -> ClientRecord | None:
        row = self._db.execute(
            "SELECT client_id, origin, name, redirect_uris, auth_method, saved_at "
            "FROM clients WHERE client_id = ?",
            (client_id,),
        ).fetchone()
        if row is None:
            return None
        return ClientRecord(row[0], row[1], row[2], tuple(json.loads(row[3])), row[4], row[5])

    # ------------------------------------------------------------------- codes

    async def add_code(
        self, code_hash: bytes, grant: Grant, redirect_uri: str, challenge: str, expires: float
    ) -> None:
        """A new family, and the authorization code that opens it."""
        family = secrets.token_hex(16)
        now = time.time()
        with self._write() as db:
            self._purge(db, now)
            db.execute(
                "INSERT INTO families (family, client_id, key_name, key_print, scopes, "
                "resource, offline, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    family,
                    grant.client_id,
                    grant.key_name,
                    grant.key_print,
                    None if grant.scopes is None else json.dumps(list(grant.scopes)),
                    grant.resource,
                    int(grant.offline),
                    now,
                ),
            )
            db.execute(
                "INSERT INTO codes (code_hash, family, redirect_uri, challenge, expires) "
                "VALUES (?, ?, ?, ?, ?)",
                (code_hash, family, redirect_uri, challenge, expires),
            )

    @_answered
    async def take_code(self, code_hash: bytes) -> CodeRecord | None:
        """The code's grant, marking the code used. A code already used revokes its
        family (RFC 6749 §4.1.2: the tokens it issued must not outlive a replay)
        and raises ReplayError; an unknown, expired or revoked code is None."""
        now = time.time()
        replayed = None
        with self._write() as db:
            row = db.execute(
                "SELECT c.family, c.redirect_uri, c.challenge, c.expires, c.used, f.revoked, "
                f"{_GRANT_COLUMNS} FROM codes c JOIN families f ON f.family = c.family "
                "WHERE c.code_hash = ?",
                (code_hash,),
            ).fetchone()
            if row is None:
                return None
            family, redirect_uri, challenge, expires, used, revoked = row[:6]
            if used:
                self._revoke(db, family)
                replayed = _grant(row[6:])
            else:
                db.execute("UPDATE codes SET used = 1 WHERE code_hash = ?", (code_hash,))
                if revoked or expires <= now:
                    return None
                return CodeRecord(family, _grant(row[6:]), redirect_uri, challenge)
        raise ReplayError(replayed)

    # ------------------------------------------------------------------ tokens

    @_answered
    async def add_tokens(self, family: str, tokens: list[tuple[bytes, str, float]]) -> None:
        """``(digest, kind, expires)`` rows for ``family``."""
        with self._write() as db:
            db.executemany(
                "INSERT INTO tokens (token_hash, family, kind, expires) VALUES (?, ?, ?, ?)",
                [(digest, family, kind, expires) for digest, kind, expires in tokens],
            )

    async def access(self, token_hash: bytes) -> Grant | None:
        """The grant behind a live access token.

        Every bearer request asks, so a live token's grant is remembered for as long
        as the grant database is unchanged: any change, by any worker, gives the
        epoch a new value (:class:`_Epoch`), and this worker then forgets
        everything it remembered, so a revocation still counts from the next
        request. Reading the epoch is a read of shared memory; even the cheapest
        SQLite read (a transaction of its own) cost three times the whole check.
        """
        now = time.time()
        epoch = self._epoch.read()
        if epoch != self._seen:
            self._live.clear()
            self._seen = epoch
        elif (live := self._live.get(token_hash)) is not None and live[1] > now:
            return live[0]
        try:
            row = self._db.execute(_ACCESS, (token_hash, now)).fetchone()
        except sqlite3.Error as exc:  # not @_answered: a coroutine less on every bearer request
            raise _unavailable("access", exc) from None
        if row is None:
            return None
        grant = _grant(row[1:])
        if len(self._live) >= _LIVE_TOKENS:
            self._live.clear()
        self._live[token_hash] = (grant, row[0])
        return grant

    @_answered
    async def use_refresh(self, token_hash: bytes) -> tuple[str, Grant] | None:
        """The family and grant of a live refresh token, which is used up by this.
        One used before revokes its whole family and raises ReplayError (OAuth 2.1
        §4.3.1: a replayed refresh token means it leaked)."""
        now = time.time()
        replayed = None
        with self._write() as db:
            row = db.execute(
                f"SELECT t.family, t.expires, t.used, f.revoked, {_GRANT_COLUMNS} "
                "FROM tokens t JOIN families f ON f.family = t.family "
                "WHERE t.token_hash = ? AND t.kind = 'refresh'",
                (token_hash,),
            ).fetchone()
            if row is None:
                return None
            family, expires, used, revoked = row[:4]
            if used:
                self._revoke(db, family)
                replayed = _grant(row[4:])
            else:
                if revoked or expires <= now:
                    return None
                db.execute("UPDATE tokens SET used = 1 WHERE token_hash = ?", (token_hash,))
                return family, _grant(row[4:])
        raise ReplayError(replayed)

    @_answered
    async def revoke(self, token_hash: bytes) -> bool:
        """Revoke the family of an access or refresh token; False if none is known."""
        with self._write() as db:
            row = db.execute(
                "SELECT family FROM tokens WHERE token_hash = ?", (token_hash,)
            ).fetchone()
            if row is None:
                return False
            self._revoke(db, row[0])
            return True

    @staticmethod
    def _revoke(db: sqlite3.Connection, family: str) -> None:
        db.execute("UPDATE families SET revoked = 1 WHERE family = ?", (family,))

    @staticmethod
    def _purge(db: sqlite3.Connection, now: float) -> None:
        """Forget what can no longer be used: expired codes and tokens, and families
        left with neither (kept a day, so a late replay still finds its family)."""
        db.execute("DELETE FROM codes WHERE expires < ?", (now - REPLAY_MEMORY_S,))
        db.execute("DELETE FROM tokens WHERE expires < ?", (now - REPLAY_MEMORY_S,))
        db.execute(
            "DELETE FROM families WHERE created < ? AND family NOT IN "
            "(SELECT family FROM tokens) AND family NOT IN (SELECT family FROM codes)",
            (now - REPLAY_MEMORY_S,),
        )


_GRANT_COLUMNS: Final = "f.client_id, f.key_name, f.key_print, f.scopes, f.resource, f.offline"
_ACCESS: Final = (
    f"SELECT t.expires, {_GRANT_COLUMNS} FROM tokens t JOIN families f ON f.family = t.family "
    "WHERE t.token_hash = ? AND t.kind = 'access' AND t.expires > ? AND f.revoked = 0"
)
_EPOCH_BYTES: Final = 8
# Live tokens remembered by one worker; past this many it starts again from none.
_LIVE_TOKENS: Final = 4096


def _grant(row: tuple[object, ...]) -> Grant:
    client_id, key_name, key_print, scopes, resource, offline = row
    return Grant(
        str(client_id),
        str(key_name),
        str(key_print),
        None if scopes is None else tuple(json.loads(str(scopes))),
        str(resource),
        bool(offline),
    )


class _Transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` (rollback on error): a read-modify-write that
    another worker cannot interleave with. A commit that changed anything renews
    the epoch, after the commit: a worker that reads the new epoch then reads
    the new rows."""

    __slots__ = ("_changes", "_db", "_epoch")

    def __init__(self, db: sqlite3.Connection, epoch: _Epoch) -> None:
        self._db = db
        self._epoch = epoch
        self._changes = 0

    def __enter__(self) -> sqlite3.Connection:
        self._db.execute("BEGIN IMMEDIATE")
        self._changes = self._db.total_changes
        return self._db

    def __exit__(self, kind: object, value: object, trace: object) -> None:
        if kind is not None:
            self._db.execute("ROLLBACK")
            return
        self._db.execute("COMMIT")
        if self._db.total_changes != self._changes:
            self._epoch.renew()


class _Epoch:
    """Eight bytes beside the grant database that every worker maps, given a new
    random value after each commit that changed the database: a worker whose
    remembered answers were read under another value forgets them.

    Random, not a counter: two workers renewing at once cannot both write what
    a third already saw. If a worker dies between its commit and the renewal,
    the supervisor renews for it (:func:`forget_remembered_grants`).
    """

    __slots__ = ("_map",)

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < _EPOCH_BYTES:
                os.ftruncate(fd, _EPOCH_BYTES)
            self._map = mmap.mmap(fd, _EPOCH_BYTES)
        finally:
            os.close(fd)

    def read(self) -> bytes:
        return self._map[:_EPOCH_BYTES]

    def renew(self) -> None:
        self._map[:_EPOCH_BYTES] = os.urandom(_EPOCH_BYTES)

    def close(self) -> None:
        self._map.close()


def forget_remembered_grants(settings: Settings) -> None:
    """Make every worker forget the grants it remembers: a worker died, perhaps
    after committing a revocation and before renewing the epoch. Never raises:
    the supervisor that calls it still has a worker to restart."""
    if settings.store.backend == "redis":
        return
    path = state_path(settings) / EPOCH_FILENAME
    try:
        if path.exists():
            epoch = _Epoch(path)
            epoch.renew()
            epoch.close()
    except OSError as exc:
        log.error(
            "could not tell workers to forget the OAuth grants they remember (%s: %s); "
            "a revocation the dead worker made may take effect only when tokens expire",
            path,
            exc.strerror or exc,
        )
