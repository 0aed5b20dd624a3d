"""Loading: defaults, then the TOML file, then the environment, then command-line flags.

The file is ``--config`` or ``RELAYD_CONFIG``; without either, only the environment
and defaults apply. One generic loop reads every setting a section declares
(:mod:`relayd.config.fields`) and casts it by its type (:mod:`relayd.config.casts`);
only the secrets, which come from several places, have code of their own
(:mod:`relayd.config.secrets`). A table or key relayd does not know is refused with
the closest known name, so a typo never silently leaves a default in place.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from relayd.config import secrets
from relayd.config.casts import ConfigError, cast_env, cast_toml
from relayd.config.checks import validate, warnings_for
from relayd.config.fields import Declared, declared
from relayd.config.settings import SECTIONS, Settings
from relayd.config.spend_limits import parse_key_limits, parse_keys_table

__all__ = ["load_settings", "updated"]


def load_settings(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    require_upstream_key: bool = True,
    overrides: Mapping[str, Any] | None = None,
    route_groups: Collection[str] | None = None,
) -> Settings:
    """Load and validate settings.

    ``path`` wins over ``RELAYD_CONFIG``. ``require_upstream_key=False`` serves
    commands that never call upstream (``relayd openapi``) and ``check-config``,
    which then warns instead. ``overrides`` are command-line values by
    ``"table.key"`` (``{"server.workers": 2}`` from ``serve --workers``); they win
    over everything. ``route_groups``, the groups of the route table, makes an
    unknown scope name an error (this package cannot import the table itself).
    """
    env = os.environ if environ is None else environ
    path = path or env.get("RELAYD_CONFIG") or None
    doc: dict[str, Any] = _read_toml(Path(path)) if path else {}
    base = Path(path).parent if path else Path.cwd()
    _refuse_unknown(doc)
    tables = {name: _table(doc, name) for name in SECTIONS}

    sources: dict[str, str] = {}
    warnings: list[str] = []
    values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    flags = dict(overrides or {})
    for table, section in SECTIONS.items():
        for record in declared(section):
            if record.special:
                continue
            where = f"{table}.{record.key}"
            found, origin = _value(record, tables[table], table, env, base)
            if where in flags and flags[where] is not None:
                found, origin = flags.pop(where), f"flag --{record.key.replace('_', '-')}"
            if origin is not None:
                values[table][record.name] = found
            sources[where] = origin or "default"

    upstream, auth, actions = tables["upstream"], tables["auth"], tables["actions"]
    key, origin = secrets.upstream_key(env, upstream, base, warnings)
    if key:
        values["upstream"]["api_key"] = key
    sources["upstream.api_key"] = origin or "default"
    secret, origin = secrets.signing_secret(env, actions, base, warnings)
    if secret:
        values["actions"]["signing_secret"] = secret
    sources["actions.signing_secret_file"] = origin or "default"
    password, origin = secrets.redis_password(env, tables["store"], base, warnings)
    if password:
        values["store"]["redis_password"] = password
    sources["store.redis_password_file"] = origin or "default"

    for name, path in secrets.tls_credentials(env).items():
        if name not in values["server"]:  # the env and the file win, as for keys_file
            values["server"][name] = path
            sources[f"server.{name}"] = f"credential {secrets.CREDENTIALS_TLS[name]}"

    keys_file = values["auth"].get("keys_file")
    if keys_file is None and (keys_file := secrets.keys_file_credential(env)) is not None:
        values["auth"]["keys_file"] = keys_file
        sources["auth.keys_file"] = f"credential {secrets.CREDENTIAL_RELAY_KEYS}"
    env_keys = env.get("RELAYD_KEYS") or None
    values["auth"]["keys"] = secrets.collect_keys(
        env_keys, keys_file, auth.get("keys", []), warnings
    )
    sources["auth.keys"] = (
        ", ".join(
            origin
            for origin, present in (
                ("env RELAYD_KEYS", bool(env_keys)),
                (sources["auth.keys_file"], bool(keys_file)),
                ("file", bool(auth.get("keys"))),
            )
            if present
        )
        or "default"
    )
    if (
        path
        and secrets.holds_secrets(upstream, auth)
        and (too_open := secrets.too_open(Path(path), "config file holding a key"))
    ):
        warnings.append(too_open)

    spend = tables["spend"]  # its nested tables, read deliberately (spend_limits.py)
    for name, parse in (("default", _default_limits), ("keys", parse_keys_table)):
        if name in spend:
            values["spend"][name] = parse(spend[name])
        sources[f"spend.{name}"] = "file" if name in spend else "default"

    settings = updated(Settings(), **values)
    validate(settings, require_upstream_key=require_upstream_key, route_groups=route_groups)
    warnings += warnings_for(settings)
    return dataclasses.replace(settings, warnings=tuple(warnings), sources=sources)


def _default_limits(raw: Any) -> Any:
    return parse_key_limits(raw, "[spend.default]")


def updated(settings: Settings, **tables: Mapping[str, Any]) -> Settings:
    """``settings`` with some fields of some sections replaced, by section and field
    name: ``updated(settings, limits={"max_json_bytes": 1024})``."""
    changes = {
        name: dataclasses.replace(getattr(settings, name), **fields)
        for name, fields in tables.items()
        if fields
    }
    return dataclasses.replace(settings, **changes)


def _value(
    record: Declared, table: Mapping[str, Any], name: str, env: Mapping[str, str], base: Path
) -> tuple[Any, str | None]:
    """One setting's value and its origin ("env NAME", "file"), or (None, None): unset."""
    text = env.get(record.env) if record.env else None
    if text:  # an empty variable is unset, as in the shell's ${VAR:-default}
        return cast_env(record, text), f"env {record.env}"
    raw = table.get(record.key)
    if raw is None:
        return None, None
    if record.off is not None and raw == record.off and not isinstance(raw, bool):
        return None, "file"  # "off", which is not "unset"
    value = cast_toml(record, raw, name)
    if value is None:
        return None, None  # an empty string: the default
    if record.path:
        value = str(base / value)
    return value, "file"


def _refuse_unknown(doc: Mapping[str, Any]) -> None:
    """A table or key relayd does not read is an error naming the closest known one."""
    for table, content in doc.items():
        section = SECTIONS.get(table)
        if section is None:
            raise ConfigError(f"unknown table [{table}]{_suggest(table, SECTIONS, '[', ']')}")
        if not isinstance(content, dict):
            continue  # _table says it must be a table
        known = [key for record in declared(section) for key in record.keys]
        for key in content:
            if key not in known:
                raise ConfigError(
                    f"unknown key `{key}` in [{table}]{_suggest(key, known, '`', '`')}"
                )


def _suggest(name: str, known: Collection[str], left: str, right: str) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean {left}{close[0]}{right}?" if close else ""


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None


def _table(doc: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = doc.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{name}] must be a table")
    return value
