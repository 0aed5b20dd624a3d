"""OAuth grants on the shared Redis or Valkey server: any instance redeems, refreshes and
checks what another issued.

Keys (under ``[store] redis_prefix``), every one a hash:

- ``{oauth:grants}:client:<client_id>``: a registered client (kept), or a fetched
  client document (kept as long as a refresh token could still name it);
- ``{oauth:grants}:family:<id>``: what the user granted (relay key name and
  fingerprint, scopes, resource, offline) and whether it is revoked;
- ``{oauth:grants}:code:<sha256 hex>`` and ``…:token:<sha256 hex>``: a code or token
  by its digest, naming its family, with its expiry and whether it was used.

Every code, token and family key expires a day after the last thing it holds
(:data:`~relayd.store.grants.REPLAY_MEMORY_S`), so a late replay still finds, and
revokes, its family; expiries are judged by the server's clock (``TIME``), so the
instances' clocks never disagree about a token.

One hash tag for all of them: a code or token does not say which family it
belongs to, so the scripts that use one up and revoke its family find the family
only once they have read the token. Redis Cluster lets a script touch keys of its
own slot only; one slot for every grant keeps that true (OAuth state is small: a
few keys per linked app).

Single-use codes, refresh-token rotation and revocation are each one Lua script:
a code or refresh token presented twice at once is used by exactly one of them,
and the other revokes the family in the same step.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Sequence
from typing import Final

from redis import asyncio as aioredis

from relayd.config import Settings
from relayd.store.deadlines import bounded
from relayd.store.grants import REPLAY_MEMORY_S, ClientRecord, CodeRecord, Grant, ReplayError
from relayd.store.redis import tagged

__all__ = ["GRANTS_TAG", "RedisGrantStore"]

# Every grant key's hash tag (a relay key's name cannot hold ':', so no relay key's
# own tag is ever this one).
GRANTS_TAG: Final = "oauth:grants"
_FAMILY_FIELDS: Final = ("client_id", "key_name", "key_print", "scopes", "resource", "offline")

# The server's clock in milliseconds, for every script.
_NOW: Final = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local function ms(value)  -- an integer as text, never in exponent notation
  return string.format('%.0f', value)
end
"""
_FAMILY_READ: Final = """
local function family(key)
  return redis.call('HMGET', key, 'client_id', 'key_name', 'key_print', 'scopes',
                    'resource', 'offline', 'revoked')
end
local function grant(f)
  return {f[1], f[2], f[3], f[4], f[5], f[6]}
end
-- A code or refresh token presented again: its family is revoked now.
local function replayed(key, f)
  redis.call('HSET', key, 'revoked', '1')
  local answer = grant(f)
  table.insert(answer, 1, 'replay')
  return answer
end
"""

# KEYS: family, code. ARGV: code life (ms), replay memory (ms), redirect_uri,
# challenge, family id, then the family's fields and values.
_ADD_CODE: Final = (
    _NOW
    + """
local life = tonumber(ARGV[1])
local keep = life + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'revoked', '0', 'created', ms(now), unpack(ARGV, 6))
redis.call('PEXPIRE', KEYS[1], ms(keep))
redis.call('HSET', KEYS[2], 'family', ARGV[5], 'redirect_uri', ARGV[3],
           'challenge', ARGV[4], 'exp', ms(now + life), 'used', '0')
redis.call('PEXPIRE', KEYS[2], ms(keep))
return 1
"""
)

# KEYS: code. ARGV: the family keys' prefix.
# Returns false (unknown), {'gone'} (expired or revoked; now used),
# {'replay', family fields...} (used before: the family is revoked now), or
# {'ok', family, redirect_uri, challenge, family fields...}.
_TAKE_CODE: Final = (
    _NOW
    + _FAMILY_READ
    + """
local code = redis.call('HMGET', KEYS[1], 'family', 'redirect_uri', 'challenge', 'exp', 'used')
if not code[1] then return false end
local key = ARGV[1] .. code[1]
local f = family(key)
if not f[1] then return false end
if code[5] == '1' then return replayed(key, f) end
redis.call('HSET', KEYS[1], 'used', '1')
if f[7] == '1' or tonumber(code[4]) <= now then return {'gone'} end
local answer = grant(f)
table.insert(answer, 1, code[3])
table.insert(answer, 1, code[2])
table.insert(answer, 1, code[1])
table.insert(answer, 1, 'ok')
return answer
"""
)

# KEYS: family, then each token. ARGV: family id, replay memory (ms), then kind and
# life (ms) of each token in turn.
_ADD_TOKENS: Final = (
    _NOW
    + """
local memory = tonumber(ARGV[2])
local longest = 0
for i = 2, #KEYS do
  local life = tonumber(ARGV[2 * i])
  redis.call('HSET', KEYS[i], 'family', ARGV[1], 'kind', ARGV[2 * i - 1],
             'exp', ms(now + life), 'used', '0')
  redis.call('PEXPIRE', KEYS[i], ms(life + memory))
  if life + memory > longest then longest = life + memory end
end
redis.call('PEXPIRE', KEYS[1], ms(longest), 'GT')
return 1
"""
)

# KEYS: token. ARGV: the family keys' prefix. Returns the grant, or false.
_ACCESS: Final = (
    _NOW
    + _FAMILY_READ
    + """
local token = redis.call('HMGET', KEYS[1], 'family', 'kind', 'exp')
if not token[1] or token[2] ~= 'access' or tonumber(token[3]) <= now then return false end
local f = family(ARGV[1] .. token[1])
if not f[1] or f[7] == '1' then return false end
return grant(f)
"""
)

# KEYS: token. ARGV: the family keys' prefix. Returns as _TAKE_CODE does, with
# {'ok', family, family fields...}.
_USE_REFRESH: Final = (
    _NOW
    + _FAMILY_READ
    + """
local token = redis.call('HMGET', KEYS[1], 'family', 'kind', 'exp', 'used')
if not token[1] or token[2] ~= 'refresh' then return false end
local key = ARGV[1] .. token[1]
local f = family(key)
if not f[1] then return false end
if token[4] == '1' then return replayed(key, f) end
if f[7] == '1' or tonumber(token[3]) <= now then return {'gone'} end
redis.call('HSET', KEYS[1], 'used', '1')
local answer = grant(f)
table.insert(answer, 1, token[1])
table.insert(answer, 1, 'ok')
return answer
"""
)

# KEYS: token. ARGV: the family keys' prefix. Returns 1 if the token was known.
_REVOKE: Final = """
local name = redis.call('HGET', KEYS[1], 'family')
if not name then return 0 end
local key = ARGV[1] .. name
if redis.call('EXISTS', key) == 1 then redis.call('HSET', key, 'revoked', '1') end
return 1
"""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _grant(fields: Sequence[bytes | str]) -> Grant:
    client_id, key_name, key_print, scopes, resource, offline = (_text(f) for f in fields)
    parsed = json.loads(scopes)
    return Grant(
        client_id,
        key_name,
        key_print,
        None if parsed is None else tuple(parsed),
        resource,
        offline == "1",
    )


def _life_ms(expires: float) -> int:
    """Milliseconds from now to ``expires`` (this machine's clock measures only the
    interval; the script anchors it to the server's)."""
    return max(0, int((expires - time.time()) * 1000))


class RedisGrantStore:
    """The grants of every instance sharing one Redis or Valkey server."""

    def __init__(self, client: aioredis.Redis, settings: Settings) -> None:
        self._client = client
        self._settings = settings
        # A fetched client document is kept as long as a refresh token naming its
        # client could still be presented.
        self._document_ttl_ms = int((settings.oauth.refresh_token_ttl_s + REPLAY_MEMORY_S) * 1000)
        self._memory_ms = int(REPLAY_MEMORY_S * 1000)
        self._family_prefix = self._key("family", "")
        self._add_code = client.register_script(_ADD_CODE)
        self._take_code = client.register_script(_TAKE_CODE)
        self._add_tokens = client.register_script(_ADD_TOKENS)
        self._access = client.register_script(_ACCESS)
        self._use_refresh = client.register_script(_USE_REFRESH)
        self._revoke = client.register_script(_REVOKE)

    def _key(self, kind: str, name: str) -> str:
        return tagged(self._settings, GRANTS_TAG, kind, name)

    async def close(self) -> None:
        return None  # the client is the application's (state.STORE_CLIENT)

    async def secret(self, name: str) -> bytes:
        fresh = secrets.token_bytes(32)
        async with bounded(self._settings, "reading a shared secret"):
            # SET NX GET: the value already there, or None when ours was set.
            held = await self._client.set(self._key("secret", name), fresh, nx=True, get=True)
        return fresh if not isinstance(held, bytes) else held

    async def save_client(self, client: ClientRecord) -> None:
        key = self._key("client", client.client_id)
        async with bounded(self._settings, "saving an OAuth client"):
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(key)
                pipe.hset(
                    key,
                    mapping={
                        "origin": client.origin,
                        "name": client.name,
                        "redirect_uris": json.dumps(list(client.redirect_uris)),
                        "auth_method": client.auth_method,
                        "saved_at": repr(client.saved_at or time.time()),
                    },
                )
                if client.origin == "document":
                    pipe.pexpire(key, self._document_ttl_ms)
                await pipe.execute()

    async def client(self, client_id: str) -> ClientRecord | None:
        async with bounded(self._settings, "reading an OAuth client"):
            found = await self._client.hgetall(self._key("client", client_id))
        if not found:
            return None
        row = {_text(k): _text(v) for k, v in found.items()}
        return ClientRecord(
            client_id,
            row["origin"],
            row["name"],
            tuple(json.loads(row["redirect_uris"])),
            row["auth_method"],
            float(row["saved_at"]),
        )

    async def add_code(
        self, code_hash: bytes, grant: Grant, redirect_uri: str, challenge: str, expires: float
    ) -> None:
        family = secrets.token_hex(16)
        fields: list[str] = []
        for name, value in zip(
            _FAMILY_FIELDS,
            (
                grant.client_id,
                grant.key_name,
                grant.key_print,
                json.dumps(None if grant.scopes is None else list(grant.scopes)),
                grant.resource,
                "1" if grant.offline else "0",
            ),
            strict=True,
        ):
            fields += [name, value]
        async with bounded(self._settings, "storing an authorization code"):
            await self._add_code(
                keys=[self._key("family", family), self._key("code", code_hash.hex())],
                args=[
                    _life_ms(expires),
                    self._memory_ms,
                    redirect_uri,
                    challenge,
                    family,
                    *fields,
                ],
            )

    async def take_code(self, code_hash: bytes) -> CodeRecord | None:
        async with bounded(self._settings, "redeeming an authorization code"):
            answer = await self._take_code(
                keys=[self._key("code", code_hash.hex())], args=[self._family_prefix]
            )
        if not answer or _text(answer[0]) == "gone":
            return None
        if _text(answer[0]) == "replay":
            raise ReplayError(_grant(answer[1:]))
        family, redirect_uri, challenge = (_text(v) for v in answer[1:4])
        return CodeRecord(family, _grant(answer[4:]), redirect_uri, challenge)

    async def add_tokens(self, family: str, tokens: list[tuple[bytes, str, float]]) -> None:
        keys = [self._key("family", family)]
        args: list[str | int] = [family, self._memory_ms]
        for digest, kind, expires in tokens:
            keys.append(self._key("token", digest.hex()))
            args += [kind, _life_ms(expires)]
        async with bounded(self._settings, "storing tokens"):
            await self._add_tokens(keys=keys, args=args)

    async def access(self, token_hash: bytes) -> Grant | None:
        async with bounded(self._settings, "checking an access token"):
            answer = await self._access(
                keys=[self._key("token", token_hash.hex())], args=[self._family_prefix]
            )
        return _grant(answer) if answer else None

    async def use_refresh(self, token_hash: bytes) -> tuple[str, Grant] | None:
        async with bounded(self._settings, "rotating a refresh token"):
            answer = await self._use_refresh(
                keys=[self._key("token", token_hash.hex())], args=[self._family_prefix]
            )
        if not answer or _text(answer[0]) == "gone":
            return None
        if _text(answer[0]) == "replay":
            raise ReplayError(_grant(answer[1:]))
        return _text(answer[1]), _grant(answer[2:])

    async def revoke(self, token_hash: bytes) -> bool:
        async with bounded(self._settings, "revoking a grant"):
            known = await self._revoke(
                keys=[self._key("token", token_hash.hex())], args=[self._family_prefix]
            )
        return bool(known)
