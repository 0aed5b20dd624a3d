"""Secrets: the upstream key, relay keys and the signing secret, each from several places.

The upstream key is taken from the first of ``OPENAI_API_KEY``,
``OPENAI_API_KEY_FILE``, the systemd credential ``openai_api_key``
(``$CREDENTIALS_DIRECTORY``), ``[upstream] api_key_file`` and ``[upstream] api_key``.
Relay keys are not overridden but collected: ``RELAYD_KEYS``, plus one keys file
(``RELAYD_KEYS_FILE``, else ``[auth] keys_file``, else the credential
``relay_keys``), plus ``[[auth.keys]]``. A secret's file readable by others is a
warning, not an error (issue 11).
"""

from __future__ import annotations

import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from relayd.config.casts import ConfigError
from relayd.config.keys import RelayKey, parse_keys_env, parse_keys_file, parse_keys_toml

__all__ = [
    "CREDENTIAL_UPSTREAM_KEY",
    "collect_keys",
    "holds_secrets",
    "redis_password",
    "signing_secret",
    "too_open",
    "upstream_key",
]

CREDENTIAL_UPSTREAM_KEY: Final = "openai_api_key"
CREDENTIAL_RELAY_KEYS: Final = "relay_keys"
CREDENTIAL_SIGNING_SECRET: Final = "actions_signing_secret"
CREDENTIAL_REDIS_PASSWORD: Final = "redis_password"
# relayd's own TLS pair, by [server] field (docs/security.md#own-tls).
CREDENTIALS_TLS: Final = {"tls_cert": "tls_cert", "tls_key": "tls_key"}


def credential(env: Mapping[str, str], name: str) -> Path | None:
    """The systemd credential ``name`` (LoadCredential=), if this process has it."""
    directory = env.get("CREDENTIALS_DIRECTORY")
    path = Path(directory) / name if directory else None
    return path if path is not None and path.is_file() else None


def upstream_key(
    env: Mapping[str, str], upstream: Mapping[str, Any], base: Path, warnings: list[str]
) -> tuple[str | None, str | None]:
    """The upstream key and where it came from (None, None: nowhere)."""
    if env.get("OPENAI_API_KEY"):
        return env["OPENAI_API_KEY"].strip(), "env OPENAI_API_KEY"
    if env.get("OPENAI_API_KEY_FILE"):
        key = _read_secret(Path(env["OPENAI_API_KEY_FILE"]), "OPENAI_API_KEY_FILE", warnings)
        return key, "env OPENAI_API_KEY_FILE"
    if (path := credential(env, CREDENTIAL_UPSTREAM_KEY)) is not None:
        key = _read_secret(path, "systemd credential", warnings)
        return key, f"credential {CREDENTIAL_UPSTREAM_KEY}"
    key_file = _toml_path(upstream, "api_key_file", "upstream", base)
    if key_file:
        return _read_secret(Path(key_file), "[upstream] api_key_file", warnings), "file"
    inline = upstream.get("api_key")
    if inline is not None and not isinstance(inline, str):
        raise ConfigError("[upstream] api_key must be a string")
    return inline or None, ("file" if inline else None)


def signing_secret(
    env: Mapping[str, str], actions: Mapping[str, Any], base: Path, warnings: list[str]
) -> tuple[str | None, str | None]:
    """The Actions link-signing secret and where it came from."""
    return _secret_from_file(
        env, "RELAYD_SIGNING_SECRET_FILE", actions, ("actions", "signing_secret_file"),
        CREDENTIAL_SIGNING_SECRET, "signing secret file", base, warnings,
    )  # fmt: skip


def redis_password(
    env: Mapping[str, str], store: Mapping[str, Any], base: Path, warnings: list[str]
) -> tuple[str | None, str | None]:
    """The shared store's password and where it came from."""
    return _secret_from_file(
        env, "RELAYD_REDIS_PASSWORD_FILE", store, ("store", "redis_password_file"),
        CREDENTIAL_REDIS_PASSWORD, "redis password file", base, warnings,
    )  # fmt: skip


def _secret_from_file(
    env: Mapping[str, str],
    env_name: str,
    table: Mapping[str, Any],
    where: tuple[str, str],
    credential_name: str,
    label: str,
    base: Path,
    warnings: list[str],
) -> tuple[str | None, str | None]:
    """A secret kept in a file, in this order: the file the env names, the file the
    TOML names (``where``: section and key), the systemd credential."""
    from_env = env.get(env_name)
    section, toml_key = where
    secret_file = from_env or _toml_path(table, toml_key, section, base)
    if secret_file:
        secret = _read_secret(Path(secret_file), label, warnings)
        return secret, (f"env {env_name}" if from_env else "file")
    if (path := credential(env, credential_name)) is not None:
        return _read_secret(path, "systemd credential", warnings), f"credential {credential_name}"
    return None, None


def tls_credentials(env: Mapping[str, str]) -> dict[str, str]:
    """The TLS files systemd passed as credentials, by [server] field."""
    found = {field: credential(env, name) for field, name in CREDENTIALS_TLS.items()}
    return {field: str(path) for field, path in found.items() if path is not None}


def keys_file_credential(env: Mapping[str, str]) -> str | None:
    path = credential(env, CREDENTIAL_RELAY_KEYS)
    return None if path is None else str(path)


def collect_keys(
    env_keys: str | None, keys_file: str | None, toml_keys: Any, warnings: list[str]
) -> tuple[RelayKey, ...]:
    keys: list[RelayKey] = []
    if env_keys:
        keys += parse_keys_env(env_keys)
    if keys_file:
        from_file = parse_keys_file(keys_file)
        if not from_file:
            warnings.append(f"keys file {keys_file} holds no key: every line is blank or a comment")
        keys += from_file
        # A keys file of digests only is no secret; one with a key in it is (issue 11).
        if any(key.from_plaintext for key in from_file) and (
            too_open_file := too_open(Path(keys_file), "keys file")
        ):
            warnings.append(too_open_file)
    keys += parse_keys_toml(toml_keys)
    return tuple(keys)


def holds_secrets(upstream: Mapping[str, Any], auth: Mapping[str, Any]) -> bool:
    """The TOML file itself names the upstream key or a relay key (not a digest)."""
    keys = auth.get("keys")
    return bool(upstream.get("api_key")) or (
        isinstance(keys, list) and any(isinstance(k, dict) and "key" in k for k in keys)
    )


def _read_secret(path: Path, origin: str, warnings: list[str]) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {origin} {str(path)!r}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{origin} {str(path)!r} is not UTF-8 text ({exc.reason})") from None
    if not text:
        raise ConfigError(f"{origin} {str(path)!r} is empty")
    if too_open_file := too_open(path, origin):
        warnings.append(too_open_file)
    return text


def too_open(path: Path, what: str) -> str | None:
    """ssh's check for private key files: a secret's file must be its owner's alone.

    Only a warning (issue 11, item 7): refusing to start would take a running
    relay down over a file mode, and the operator reads the warning at start and
    in ``check-config``.
    """
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None
    if not mode & 0o077:
        return None
    rights = (("read", mode & 0o044), ("change", mode & 0o022), ("run", mode & 0o011))
    can = " and ".join(right for right, granted in rights if granted)
    return (
        f"permissions {mode:04o} for {what} {str(path)!r} are too open: users other "
        f"than its owner can {can} it. Run: chmod 600 {str(path)!r}"
    )


def _toml_path(table: Mapping[str, Any], key: str, section: str, base: Path) -> str | None:
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"[{section}] {key} must be a string")
    return str(base / value) if value else None
