"""Per-key spend limits: ``[spend.default]`` and ``[spend.keys.<key name>]``.

The generic loader reads one flat table per section; these two are nested tables of
``[spend]`` whose keys are relay key names, so they are read here, deliberately,
with the same rule as every other table: an unknown limit is refused with the
closest known name. Dollars are written as USD (``usd_per_day = 5.0``) and kept as
integer micro-dollars (docs/spend.md#money).
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, fields
from decimal import Decimal, InvalidOperation
from typing import Any, Final

from relayd.config.casts import ConfigError

__all__ = ["BUDGET_PERIODS", "KeyLimits", "parse_key_limits", "parse_keys_table"]

MICRO_PER_USD: Final = 1_000_000
# The calendar budgets a key may have, by the name of their period.
BUDGET_PERIODS: Final = ("day", "month", "total")


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """What one relay key may do; None: no limit of that kind.

    ``models`` are glob patterns (``gpt-5*``); None allows every model. Budgets are
    micro-dollars per calendar day and month (in ``[spend] timezone``) and in total.
    """

    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None
    models: tuple[str, ...] | None = None
    usd_per_day: int | None = None
    usd_per_month: int | None = None
    usd_total: int | None = None

    @property
    def budgets(self) -> dict[str, int]:
        """The budgets set, by period (``day``, ``month``, ``total``)."""
        found = {
            "day": self.usd_per_day,
            "month": self.usd_per_month,
            "total": self.usd_total,
        }
        return {period: limit for period, limit in found.items() if limit is not None}

    @property
    def unlimited(self) -> bool:
        # Field by field: comparing with a fresh KeyLimits() builds one per request.
        return (
            self.rpm is None
            and self.tpm is None
            and self.max_parallel is None
            and self.models is None
            and self.usd_per_day is None
            and self.usd_per_month is None
            and self.usd_total is None
        )

    def allows(self, model: str) -> bool:
        if self.models is None:
            return True
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)


_NAMES: Final = tuple(item.name for item in fields(KeyLimits))


def parse_key_limits(raw: Any, where: str) -> KeyLimits:
    """One limits table (``where`` names it in errors, e.g. ``[spend.keys.alice]``)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a table")
    values: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in _NAMES:
            close = difflib.get_close_matches(name, _NAMES, n=1)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            raise ConfigError(f"unknown key `{name}` in {where}{hint}")
        if name == "models":
            if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
                raise ConfigError(f"{where} models must be a list of model name patterns")
            values[name] = tuple(value)
        elif name.startswith("usd_"):
            values[name] = _micro_usd(value, f"{where} {name}")
        else:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{where} {name} must be a whole number of at least 1")
            values[name] = value
    return KeyLimits(**values)


def parse_keys_table(raw: Any) -> dict[str, KeyLimits]:
    """``[spend.keys]``: one limits table per relay key name."""
    if not isinstance(raw, Mapping):
        raise ConfigError("[spend.keys] must hold one table per relay key name")
    return {
        str(name): parse_key_limits(table, f"[spend.keys.{name}]") for name, table in raw.items()
    }


def _micro_usd(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where} must be a number of US dollars")
    try:
        micro = Decimal(str(value)).scaleb(6)
    except InvalidOperation:
        raise ConfigError(f"{where}: {value!r} is not an amount of dollars") from None
    if not micro.is_finite() or micro < 0:
        raise ConfigError(f"{where} must be zero or more US dollars")
    return int(micro.to_integral_value(rounding="ROUND_FLOOR"))
