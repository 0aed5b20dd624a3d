"""What a request may cost before it runs, and what its answer cost after.

The estimate reserved at admission is the request's input (its JSON body's bytes
over four, a generous count of tokens for text) plus its own output cap
(``max_output_tokens``, ``max_completion_tokens``, ``max_tokens``) or, when it names
none, the model's default estimate ([spend] default_output_tokens). Images and
videos without token usage are priced per image and per video second.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from relayd.spend.costs import Cost
from relayd.spend.prices import PriceBook, Tokens, flat_unit, tokens_from_usage

__all__ = ["Estimate", "charge", "estimate"]

_OUTPUT_CAPS: Final = ("max_output_tokens", "max_completion_tokens", "max_tokens")
_BYTES_PER_TOKEN: Final = 4
_VIDEO_SECONDS: Final = 4  # OpenAI's default length of a video
_NOTHING: Final[Mapping[str, Any]] = {}
_NO_TOKENS: Final = Tokens()


@dataclass(slots=True)  # built once per request, never changed: not frozen, cheaper
class Estimate:
    model: str
    input_tokens: int
    output_tokens: int
    micro_usd: int | None  # None: the model has no price


def _whole(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return None
    return int(value)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def estimate(
    prices: PriceBook, cost: Cost, body: Mapping[str, Any] | None, body_bytes: int
) -> Estimate:
    """The reservation for one request; ``body`` is its JSON object, if it has one."""
    body = body or _NOTHING
    model = body.get("model")
    if not isinstance(model, str):
        model = ""
    input_tokens = -(-body_bytes // _BYTES_PER_TOKEN)  # rounded up
    if cost is Cost.IMAGES or cost is Cost.VIDEOS:
        micro = _flat(prices, cost, model, body)
        if micro is not None:
            return Estimate(model, input_tokens, 0, micro)
    if cost is Cost.GATE:
        return Estimate(model, 0, 0, 0 if not model or prices.knows(model) else None)
    cap = None
    for name in _OUTPUT_CAPS:
        if (value := body.get(name)) is not None and (cap := _whole(value)) is not None:
            break
    if "embedding" in model and body.get("input") is not None:
        cap = 0  # embeddings answer no tokens
    output_tokens = cap if cap is not None else (prices.estimate_output(model) if model else 0)
    micro = prices.text_cost(model, input_tokens, output_tokens)
    return Estimate(model, input_tokens, output_tokens, micro)


def _flat(prices: PriceBook, cost: Cost, model: str, body: Mapping[str, Any]) -> int | None:
    if cost is Cost.IMAGES:
        count = _whole(body.get("n")) or 1
        unit = flat_unit("image", _text(body.get("size")), _text(body.get("quality")))
        return prices.flat_cost(model, unit, count)
    seconds = _whole(body.get("seconds")) or _whole(_number(body.get("seconds"))) or _VIDEO_SECONDS
    return prices.flat_cost(model, flat_unit("video_second", _text(body.get("size"))), seconds)


def _number(value: Any) -> float | None:
    try:
        return float(value) if isinstance(value, str) else None
    except ValueError:
        return None


def charge(
    prices: PriceBook,
    cost: Cost,
    model: str,
    usage: Mapping[str, Any] | None,
    request: Mapping[str, Any] | None,
) -> tuple[Tokens, int | None]:
    """The tokens and micro-dollars of a finished answer: its usage priced, or for
    images and videos without usage the flat price of what was asked. None: no
    price is known (the caller falls back to the estimate, flagged)."""
    tokens = tokens_from_usage(usage) if usage is not None else _NO_TOKENS
    if usage is not None:
        micro = prices.token_cost(model, tokens)
        if micro is not None:
            return tokens, micro
    if cost is Cost.IMAGES or cost is Cost.VIDEOS:
        return tokens, _flat(prices, cost, model, request or {})
    return tokens, None
