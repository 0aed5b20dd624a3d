"""What a refused admission answers: OpenAI's error shape, relayd's own headers.

Rate limits (rpm, tpm, parallel slots, a budget full only with what is in flight)
are 429 ``rate_limit_exceeded`` with ``retry-after`` and ``x-relay-ratelimit-*``
headers; a spent budget is 429 ``insufficient_quota`` with ``x-should-retry:
false`` and the reset time. The ``x-relay-`` prefix keeps them apart from
upstream's own ``x-ratelimit-*`` (README "Spend control").
"""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

from relayd.errors import QuotaExceededError, RelaydError, SpendLimitError
from relayd.spend.windows import windows_at
from relayd.store.ledger import Refusal

__all__ = ["refusal_error"]


def refusal_error(key: str, refusal: Refusal, now: float, timezone: str) -> RelaydError:
    """The error a refused admission answers with (the message names the key's
    name, the limit, the usage and the reset; never the key)."""
    retry = max(1, round(refusal.retry_after_s))
    if refusal.limit_name in ("rpm", "tpm", "max_parallel"):
        what = {
            "rpm": "requests per minute (rpm)",
            "tpm": "tokens per minute (tpm)",
            "max_parallel": "requests in flight (max_parallel)",
        }[refusal.limit_name]
        kind = {"rpm": "requests", "tpm": "tokens", "max_parallel": "parallel"}
        suffix = kind[refusal.limit_name]
        return SpendLimitError(
            f"Rate limit reached for relay key '{key}' on {what}: limit "
            f"{refusal.limit}, used {refusal.used}. Retry in {retry}s.",
            headers={
                "retry-after": str(retry),
                "retry-after-ms": str(retry * 1000),
                f"x-relay-ratelimit-limit-{suffix}": str(refusal.limit),
                f"x-relay-ratelimit-remaining-{suffix}": "0",
                f"x-relay-ratelimit-reset-{suffix}": f"{retry}s",
            },
        )
    period = refusal.window.split(":")[0]
    name = {"day": "usd_per_day", "month": "usd_per_month", "total": "usd_total"}[period]
    resets = _resets_at(period, now, timezone)
    spent, limit = refusal.used / 1e6, refusal.limit / 1e6
    headers = {
        "x-relay-budget-limit-usd": f"{limit:.6f}",
        "x-relay-budget-remaining-usd": f"{max(0.0, limit - spent):.6f}",
    }
    if resets is not None:
        headers["x-relay-budget-reset"] = str(int(resets))
    if refusal.reason == "rate_limit_exceeded":  # in-flight reservations fill it
        return SpendLimitError(
            f"Relay key '{key}' has ${spent:.6f} spent or reserved against its budget "
            f"{name} of ${limit:.6g}; requests in flight may settle for less. Retry in "
            f"{retry}s.",
            headers={"retry-after": str(retry), **headers},
        )
    when = (
        "It never resets; ask the operator to raise it."
        if resets is None
        else f"It resets at {_local(resets, timezone)}."
    )
    if resets is not None:
        headers["retry-after"] = str(max(1, int(resets - now)))
    short = (
        ""
        if refusal.used >= refusal.limit
        else f" This request's estimated cost does not fit in the ${limit - spent:.6f} left: "
        "ask for fewer output tokens (max_output_tokens, max_tokens) or wait."
    )
    return QuotaExceededError(
        f"Relay key '{key}' has spent ${spent:.6f} of its budget {name} of "
        f"${limit:.6g} ({refusal.window}).{short} {when}",
        headers={"x-should-retry": "false", **headers},
    )


def _resets_at(period: str, now: float, timezone: str) -> float | None:
    day, month, _ = windows_at(now, timezone)
    return {"day": day.resets_at, "month": month.resets_at}.get(period)


def _local(at: float, zone: str) -> str:
    return f"{datetime.fromtimestamp(at, ZoneInfo(zone)).isoformat()} ({zone})"
