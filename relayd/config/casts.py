"""Turning TOML values and environment text into typed settings, by the field's type.

TOML values keep their type (a string is never read as a number); environment
values are text and are parsed. Durations are positive seconds; sizes and counts
whole numbers (their ranges are checked in :mod:`relayd.config.checks`).
"""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, get_args

from relayd.config.fields import Declared

__all__ = [
    "ConfigError",
    "Listen",
    "cast_env",
    "cast_toml",
    "parse_listen",
    "parse_trusted_proxies",
    "parse_workers",
]


class ConfigError(ValueError):
    """The configuration cannot be used; the message says why and what to change."""


@dataclass(frozen=True, slots=True)
class Listen:
    """Where relayd listens: ``host:port`` or ``unix:/path``."""

    host: str | None = "127.0.0.1"
    port: int | None = 8080
    path: str | None = None

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    @property
    def is_loopback(self) -> bool:
        if self.path is not None:
            return True  # a Unix socket is only reachable from this machine
        assert self.host is not None
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_listen(text: Any, where: str = "listen") -> Listen:
    """``host:port`` (``[v6]:port``) or ``unix:/path``."""
    if not isinstance(text, str):
        raise ConfigError(f"{where} must be a string")
    if text.startswith("unix:"):
        path = text.removeprefix("unix:")
        if not path:
            raise ConfigError("listen unix: needs a socket path")
        return Listen(host=None, port=None, path=path)
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ConfigError(f"listen {text!r} must be host:port or unix:/path")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ConfigError(f"listen port {port} is out of range")
    host = host.strip("[]") or "0.0.0.0"
    return Listen(host=host, port=port)


def parse_workers(value: Any, where: str) -> int:
    """A worker count: a whole number, or ``"auto"`` for one per CPU."""
    if value == "auto":
        return os.cpu_count() or 1
    if isinstance(value, str):
        return _int_text(value, where, "or 'auto'")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where} must be a whole number or 'auto'")
    return value


def parse_trusted_proxies(value: Any, where: str) -> tuple[str, ...]:
    """Addresses and CIDRs (and ``unix`` for Unix-socket peers): a TOML list, or
    comma-separated text in the environment."""
    if isinstance(value, str):
        entries = [e.strip() for e in value.split(",") if e.strip()]
    elif isinstance(value, list) and all(isinstance(e, str) for e in value):
        entries = [e.strip() for e in value]
    else:
        raise ConfigError(f"{where} must be a list of addresses or CIDRs")
    for entry in entries:
        if entry == "unix":
            continue
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ConfigError(
                f"{where}: {entry!r} is not an address or CIDR (e.g. 127.0.0.1, 10.0.0.0/8, "
                "::1, or unix for a proxy on a Unix socket)"
            ) from None
    return tuple(entries)


def _base(hint: Any) -> Any:
    """``X | None`` → ``X``; anything else unchanged."""
    args = [a for a in get_args(hint) if a is not type(None)]
    return args[0] if type(None) in get_args(hint) and len(args) == 1 else hint


def cast_toml(record: Declared, value: Any, table: str) -> Any:
    """A TOML value as the setting's type; ConfigError naming ``[table] key`` if it is not."""
    where = f"[{table}] {record.key}"
    if record.parse is not None:
        return record.parse(value, where)
    kind = _base(record.hint)
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string")
        return value or None  # an empty string leaves the default
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be a whole number")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number")
        return positive(value, where)
    if kind == tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{table}.{record.key} must be a list of strings")
        return tuple(value)
    if kind == tuple[int, ...]:
        if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise ConfigError(f"{where} must be a list of whole numbers")
        return tuple(value)
    if kind == Mapping[str, Any]:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table")
        return value
    raise TypeError(f"no TOML cast for {record.name}: {record.hint!r}")  # a declaration bug


def cast_env(record: Declared, text: str) -> Any:
    """An environment value (text) as the setting's type."""
    assert record.env is not None
    if record.parse is not None:
        return record.parse(text, record.env)
    kind = _base(record.hint)
    if kind is str:
        return text
    if kind is int:
        return _int_text(text, record.env)
    if kind is float:
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"{record.env} must be a number of seconds, got {text!r}") from None
        return positive(value, record.env)
    raise TypeError(f"no environment cast for {record.name}: {record.hint!r}")


def positive(value: Any, where: str) -> float:
    # TOML and float() both accept nan and inf; neither is a usable duration.
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"{where} must be a positive number")
    return float(value)


def _int_text(text: str, name: str, alternative: str = "") -> int:
    try:
        return int(text)
    except ValueError:
        also = f" {alternative}" if alternative else ""
        raise ConfigError(f"{name} must be a whole number{also}, got {text!r}") from None
