"""Relay key formats: ``RELAYD_KEYS``, the keys file, ``[[auth.keys]]``, and the one hash.

A relay key is kept as a name and the SHA-256 digest of its secret; :func:`hash_key`
is the only digest function, used here to store a key and by ``relayd.auth`` to
look one up, so both sides always agree on the bytes hashed.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from relayd.config.casts import ConfigError

__all__ = [
    "EPHEMERAL_KEY_PREFIX",
    "MIN_KEY_CHARS",
    "RelayKey",
    "hash_key",
    "parse_keys_env",
    "parse_keys_file",
    "parse_keys_toml",
]

_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_PRINTABLE = re.compile(r"[!-~]")  # printable ASCII, space excluded
_SHA256SUM_STDIN = ("-", "*-")
MIN_KEY_CHARS: Final = 16
# OpenAI's ephemeral client secrets (relayd.auth.EPHEMERAL_PREFIX): the auth layer
# skips them when looking for a relay key, so a relay key like that would never match.
EPHEMERAL_KEY_PREFIX: Final = "ek_"
_KEY_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
_COMMENT = re.compile(r"(?:^|\s)#")


@dataclass(frozen=True, slots=True)
class RelayKey:
    """A relay key as relayd keeps it: a name for logs and only a SHA-256 digest."""

    name: str
    digest: bytes
    scopes: frozenset[str] | None = None  # None: every route group
    # Made from the key itself, not from a digest: its source is a secret to guard.
    from_plaintext: bool = field(default=False, compare=False)

    def allows(self, group: str) -> bool:
        return self.scopes is None or group in self.scopes


def hash_key(secret: str) -> bytes:
    """The SHA-256 digest relayd keeps for a key.

    ``surrogateescape``: a presented key (a header decoded by aiohttp) or an
    environment value (decoded by Python) may carry bytes that are not UTF-8;
    they hash as those bytes instead of raising.
    """
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()


def _make_key(name: str, secret: str, scopes: frozenset[str] | None, origin: str) -> RelayKey:
    if not _KEY_NAME.match(name):
        raise ConfigError(f"{origin}: key name {name!r} may use letters, digits and _.@- only")
    if name == "sha256":
        # "sha256:<hex>" without a name would otherwise make the digest itself a valid key.
        raise ConfigError(f"{origin}: a hashed key needs a name: write name:sha256:<hex>")
    if secret.startswith("sha256:"):
        hexdigest = secret.removeprefix("sha256:")
        if not _HEX64.match(hexdigest):
            raise ConfigError(f"{origin}: key {name!r} has a malformed sha256 digest")
        return RelayKey(name, bytes.fromhex(hexdigest), scopes)
    if len(secret) < MIN_KEY_CHARS or not all(_PRINTABLE.match(c) for c in secret):
        raise ConfigError(
            f"{origin}: key {name!r} must be at least {MIN_KEY_CHARS} characters, printable "
            "ASCII with no spaces"
        )
    if _HEX64.match(secret):
        # Is it a digest pasted without its "sha256:" or a key that happens to be 64
        # hex digits? Guessing wrong locks the key holder out, or makes the digest
        # itself a key: refuse and ask (issue 11).
        raise ConfigError(
            f"{origin}: key {name!r} is 64 hex digits, which reads as a SHA-256 digest: "
            f"write {name}:sha256:<hex> for a digest; a key itself must not look like one"
        )
    if secret.startswith(EPHEMERAL_KEY_PREFIX):
        raise ConfigError(
            f"{origin}: key {name!r} starts with {EPHEMERAL_KEY_PREFIX!r}, the prefix of "
            "OpenAI's ephemeral client secrets, which relayd never takes for a relay key"
        )
    return RelayKey(name, hash_key(secret), scopes, from_plaintext=True)


def _parse_scopes(text: str, origin: str) -> frozenset[str]:
    scopes = frozenset(s.strip() for s in text.split(",") if s.strip())
    if not scopes:
        raise ConfigError(f"{origin}: scopes= lists no route group")
    return scopes


def parse_keys_env(text: str) -> tuple[RelayKey, ...]:
    """``RELAYD_KEYS``: comma-separated ``key`` or ``name:key`` entries."""
    keys = []
    for index, item in enumerate(s.strip() for s in text.split(",")):
        if not item:
            continue
        name, sep, secret = item.partition(":")
        if not sep:
            name, secret = f"key{index + 1}", item
        keys.append(_make_key(name, secret, None, "RELAYD_KEYS"))
    return tuple(keys)


def parse_keys_file(path: str) -> tuple[RelayKey, ...]:
    """One ``name:key`` or ``name:sha256:<hex>`` per line, optionally followed by
    ``scopes=group,group``; ``#`` starts a comment. ``name:<hex>  -``, the line
    ``printf %s KEY | sha256sum`` prints after ``name:``, is a digest too."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read keys file {path!r}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"keys file {path!r} is not UTF-8 text ({exc.reason})") from None
    keys = []
    for number, raw in enumerate(lines, 1):
        # A comment starts at a "#" that begins the line or follows a space, so a
        # key containing "#" is never silently cut short.
        line = _COMMENT.split(raw, maxsplit=1)[0].strip()
        if not line:
            continue
        origin = f"keys file {path}, line {number}"
        entry, *rest = line.split()
        name, sep, secret = entry.partition(":")
        if not sep or not secret:
            raise ConfigError(f"{origin}: expected name:key or name:sha256:<hex>")
        if rest and rest[0] in _SHA256SUM_STDIN:
            # sha256sum names its input after the digest; "-" (or "*-" in binary
            # mode) is standard input.
            if not _HEX64.match(secret):
                raise ConfigError(f"{origin}: key {name!r} has a malformed sha256 digest")
            secret, rest = f"sha256:{secret}", rest[1:]
        scopes = None
        for option in rest:
            label, _, value = option.partition("=")
            if label != "scopes":
                raise ConfigError(f"{origin}: unknown option {label!r} (only scopes=)")
            scopes = _parse_scopes(value, origin)
        keys.append(_make_key(name, secret, scopes, origin))
    return tuple(keys)


def parse_keys_toml(entries: Any) -> tuple[RelayKey, ...]:
    """``[[auth.keys]]``: tables of ``name`` and ``sha256`` (or ``key``), and ``scopes``."""
    if not isinstance(entries, list):
        raise ConfigError("[auth] keys must be an array of tables ([[auth.keys]])")
    keys = []
    for index, entry in enumerate(entries, 1):
        origin = f"[[auth.keys]] #{index}"
        if not isinstance(entry, dict) or "name" not in entry:
            raise ConfigError(f"{origin}: needs name and sha256 (or key)")
        if "sha256" in entry:
            secret = f"sha256:{entry['sha256']}"
        elif "key" in entry:
            secret = str(entry["key"])
        else:
            raise ConfigError(f'{origin}: needs sha256 = "<hex>" (or key)')
        scopes = None
        if "scopes" in entry:
            listed = entry["scopes"]
            if not isinstance(listed, list) or not all(isinstance(s, str) for s in listed):
                raise ConfigError(f"{origin}.scopes must be a list of strings")
            scopes = frozenset(listed)
            if not scopes:
                raise ConfigError(f"{origin}: scopes lists no route group")
        keys.append(_make_key(str(entry["name"]), secret, scopes, origin))
    return tuple(keys)
