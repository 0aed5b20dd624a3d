"""What a model costs: the price table, and token counts read from any ``usage``.

The table ships inside the package (``prices.toml`` here is ``conf/prices.toml``) and
the operator's own file (``[spend] prices_file``) is read after it; relayd never
fetches prices. A row of the operator's file replaces the shipped row of the same
model whole, except its ``aliases``, which add up.

Money is integer micro-dollars. A price of 1 USD per million tokens is 1 micro-dollar
per token, so rates are kept as integer pico-dollars per token (USD per million × 10⁶,
at most six decimals) and a cost is summed exactly, then rounded up once to the next
micro-dollar: many tiny requests never add up to free.

Pricing each token once (the peers' bugs: cached tokens charged at the full rate or
twice, reasoning tokens charged on top of output): ``input`` counts every input
token, of which ``cached_input`` were served from cache and ``audio_input`` /
``image_input`` were audio or image; ``output`` counts every output token, of which
``reasoning`` was reasoning (priced as output), ``audio_output`` / ``image_output``
audio or image. Each input token falls in exactly one bucket (cached audio, other
cached, audio, image, text) and each output token in one (audio, image, text).
"""

from __future__ import annotations

import functools
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from datetime import date
from decimal import Decimal, InvalidOperation
from importlib import resources
from pathlib import Path
from typing import Any, Final

from relayd.config import ConfigError, Settings

__all__ = [
    "DEFAULT_OUTPUT_ESTIMATE",
    "ModelPrice",
    "PriceBook",
    "RATE_KEYS",
    "PriceTableError",
    "Rates",
    "Tokens",
    "flat_unit",
    "parse_table",
    "tokens_from_usage",
]

# Output tokens assumed when a request names no cap and its row no estimate: the
# notes' starting point (LiteLLM's 16384 pinned whole budgets, its PR #27509).
DEFAULT_OUTPUT_ESTIMATE: Final = 4096

SHIPPED: Final = "prices.toml"
_PICO_PER_MICRO: Final = 1_000_000
_DATED_SNAPSHOT: Final = re.compile(r"-\d{4}-\d{2}-\d{2}$")
# The token rates a row may name, in USD per million tokens.
RATE_KEYS: Final = (
    "input",
    "cached_input",
    "output",
    "audio_input",
    "cached_audio_input",
    "audio_output",
    "image_input",
    "image_output",
)
_ROW_KEYS: Final = frozenset(
    (*RATE_KEYS, "aliases", "flat", "long_context", "output_estimate", "source", "checked")
)


class PriceTableError(ConfigError):
    """A price file cannot be used; the message names the file, the row and why."""


# Built once or twice per request and never changed: not frozen (a frozen dataclass
# costs several times as much to build).
@dataclass(slots=True)
class Tokens:
    """Token counts of one answer; each ``*_input`` and ``reasoning``/``*_output`` field
    is a part of ``input`` or ``output``, never added to it."""

    input: int = 0  # all input tokens, cached, audio and image included
    cached_input: int = 0  # the part of input served from cache
    output: int = 0  # all output tokens, reasoning, audio and image included
    reasoning: int = 0  # the part of output that was reasoning (priced as output)
    audio_input: int = 0  # the part of input that was audio
    audio_output: int = 0  # the part of output that was audio
    # Beyond the contract in SPEND.md, appended with defaults: priced where a row
    # names their own rate (realtime cached audio, GPT image models).
    cached_audio_input: int = 0  # the part of cached_input that was audio
    image_input: int = 0  # the part of input that was images
    image_output: int = 0  # the part of output that was images


@dataclass(frozen=True, slots=True)
class Rates:
    """Pico-dollars per token, every rate filled (a rate a row omits takes its
    text counterpart's: never free by omission)."""

    input: int
    cached_input: int
    output: int
    audio_input: int
    cached_audio_input: int
    audio_output: int
    image_input: int
    image_output: int

    def pico(self, tokens: Tokens) -> int:
        total_in = max(tokens.input, 0)
        cached = _part(tokens.cached_input, total_in)
        audio = _part(tokens.audio_input, total_in)
        cached_audio = _part(tokens.cached_audio_input, min(cached, audio))
        audio_fresh = min(audio - cached_audio, total_in - cached)
        image = _part(tokens.image_input, total_in - cached - audio_fresh)
        text_in = total_in - cached - audio_fresh - image
        total_out = max(tokens.output, 0)
        audio_out = _part(tokens.audio_output, total_out)
        image_out = _part(tokens.image_output, total_out - audio_out)
        return (
            text_in * self.input
            + (cached - cached_audio) * self.cached_input
            + cached_audio * self.cached_audio_input
            + audio_fresh * self.audio_input
            + image * self.image_input
            + (total_out - audio_out - image_out) * self.output
            + audio_out * self.audio_output
            + image_out * self.image_output
        )


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """One row of the table: a model's prices, where they came from and when."""

    model: str
    rates: Rates | None  # None: a row with flat prices only
    long_context_above: int | None  # more input tokens than this: long_context rates
    long_context: Rates | None
    flat: Mapping[str, int]  # unit -> pico-dollars per unit
    aliases: tuple[str, ...]
    output_estimate: int | None
    source: str  # as written: a key of [sources] or free text
    checked: date
    origin: str  # "shipped", or the operator file's path


def flat_unit(kind: str, size: str | None = None, quality: str | None = None) -> str:
    """The unit :meth:`PriceBook.flat_cost` looks up: ``image``, ``image:1024x1024``,
    ``image:1024x1024:hd``, ``video_second:1792x1024``. A unit the row lacks falls
    back to a shorter one (``image:1024x1024:standard`` → ``image:1024x1024``)."""
    parts = [kind]
    if size:
        parts.append(size)
        if quality:
            parts.append(quality)
    return ":".join(parts)


_UNKNOWN: Final = object()
_COSTS_KEPT: Final = 4096


class PriceBook:
    """The merged price table. Immutable once built; a reload builds a new one."""

    __slots__ = (
        "_by_name",
        "_costs",
        "allow_unpriced",
        "default_output_estimate",
        "rows",
        "sources",
    )

    def __init__(
        self,
        rows: Iterable[ModelPrice],
        *,
        sources: Mapping[str, str] | None = None,
        allow_unpriced: bool = False,
        default_output_estimate: int = DEFAULT_OUTPUT_ESTIMATE,
    ) -> None:
        self.rows: tuple[ModelPrice, ...] = tuple(sorted(rows, key=lambda row: row.model))
        self.sources: Mapping[str, str] = dict(sources or {})
        self.allow_unpriced = allow_unpriced
        self.default_output_estimate = default_output_estimate
        self._by_name: dict[str, ModelPrice] = {}
        # token_cost's answers: requests of one kind repeat the same few counts.
        self._costs: dict[tuple[str | int, ...], int | None] = {}
        for row in self.rows:
            for name in (row.model, *row.aliases):
                self._by_name[name] = row

    @classmethod
    def load(cls, settings: Settings, overrides: str | Path | None = None) -> PriceBook:
        """The shipped table merged with the operator's file: ``overrides`` if given,
        else ``[spend] prices_file``. Reads two small files and touches nothing else,
        so a reload (SIGHUP) may call it again; a bad file raises
        :class:`PriceTableError` and the caller keeps its current book."""
        spend = settings.spend
        if overrides is None:
            overrides = spend.prices_file
        rows, sources = _shipped()
        merged = {row.model: row for row in rows}
        all_sources = dict(sources)
        if overrides:
            path = Path(overrides)
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as exc:
                raise PriceTableError(
                    f"cannot read the price file {path}: {exc.strerror}"
                ) from None
            extra, extra_sources = parse_table(text, origin=str(path))
            all_sources.update(extra_sources)
            _merge(merged, extra, str(path))
        return cls(
            merged.values(),
            sources=all_sources,
            allow_unpriced=spend.allow_unpriced,
            default_output_estimate=spend.default_output_tokens,
        )

    def price(self, model: str) -> ModelPrice | None:
        """The row for ``model``: its own name or alias, else (a dated snapshot such
        as ``gpt-5-mini-2025-08-07``) its family's row."""
        row = self._by_name.get(model)
        if row is None and _DATED_SNAPSHOT.search(model):
            row = self._by_name.get(_DATED_SNAPSHOT.sub("", model))
        return row

    def knows(self, model: str) -> bool:
        return self.price(model) is not None

    def token_cost(self, model: str, tokens: Tokens) -> int | None:
        """Micro-dollars for ``tokens`` on ``model``, rounded up; None: unpriced."""
        # Keyed by the counts themselves: a plain tuple hashes and compares in C.
        key = (
            model,
            tokens.input,
            tokens.cached_input,
            tokens.output,
            tokens.reasoning,
            tokens.audio_input,
            tokens.audio_output,
            tokens.cached_audio_input,
            tokens.image_input,
            tokens.image_output,
        )
        known = self._costs.get(key, _UNKNOWN)
        if known is not _UNKNOWN:
            return known  # type: ignore[return-value]
        if len(self._costs) >= _COSTS_KEPT:
            self._costs.clear()
        cost = self._costs[key] = self._token_cost(model, tokens)
        return cost

    def text_cost(self, model: str, input_tokens: int, output_tokens: int) -> int | None:
        """:meth:`token_cost` of ``Tokens(input=input_tokens, output=output_tokens)``
        (an estimate: no cached, audio or image part), without building them."""
        rates = self._rates(model, input_tokens)
        if rates is None:
            return None
        return _micro(max(input_tokens, 0) * rates.input + max(output_tokens, 0) * rates.output)

    def _token_cost(self, model: str, tokens: Tokens) -> int | None:
        rates = self._rates(model, tokens.input)
        return None if rates is None else _micro(rates.pico(tokens))

    def _rates(self, model: str, input_tokens: int) -> Rates | None:
        """The per-token rates for a request of ``input_tokens`` on ``model`` (the
        long-context ones past their threshold); None: unpriced."""
        row = self.price(model)
        if row is None or row.rates is None:
            return None
        if (
            row.long_context is not None
            and row.long_context_above is not None
            and input_tokens > row.long_context_above
        ):
            return row.long_context
        return row.rates

    def flat_cost(self, model: str, unit: str, quantity: float) -> int | None:
        """Micro-dollars for ``quantity`` of ``unit`` (see :func:`flat_unit`), rounded
        up; None when the model has no flat price for that unit or any shorter one."""
        row = self.price(model)
        if row is None:
            return None
        while True:
            per_unit = row.flat.get(unit)
            if per_unit is not None:
                break
            if ":" not in unit:
                return None
            unit = unit.rsplit(":", 1)[0]
        amount = Decimal(str(max(quantity, 0))) * per_unit
        return _micro(int(amount.to_integral_value(rounding="ROUND_CEILING")))

    def estimate_output(self, model: str) -> int:
        """Output tokens to reserve for a request that names no cap."""
        row = self.price(model)
        if row is not None and row.output_estimate is not None:
            return row.output_estimate
        return self.default_output_estimate

    def source_of(self, row: ModelPrice) -> str:
        return self.sources.get(row.source, row.source)


def tokens_from_usage(usage: Mapping[str, Any]) -> Tokens:
    """Token counts from any OpenAI ``usage`` object: Chat Completions and legacy
    completions (``prompt_tokens``), Responses, images and transcriptions
    (``input_tokens``), embeddings (no output), realtime ``response.done``
    (``input_token_details`` with ``cached_tokens_details``). Missing or malformed
    counts are 0, and a part never exceeds its whole."""
    total_in = _count(usage, "input_tokens", "prompt_tokens")
    total_out = _count(usage, "output_tokens", "completion_tokens")
    if "output_tokens" not in usage and "completion_tokens" not in usage:
        total_out = max(_count(usage, "total_tokens") - total_in, 0)
    details_in = _details(
        usage, "input_tokens_details", "prompt_tokens_details", "input_token_details"
    )
    details_out = _details(
        usage, "output_tokens_details", "completion_tokens_details", "output_token_details"
    )
    cached = audio_in = cached_audio = image_in = reasoning = audio_out = image_out = 0
    if details_in:
        cached = min(_count(details_in, "cached_tokens"), total_in)
        audio_in = min(_count(details_in, "audio_tokens"), total_in)
        image_in = min(_count(details_in, "image_tokens"), total_in)
        cached_details = _details(details_in, "cached_tokens_details")
        if cached_details:
            cached_audio = min(_count(cached_details, "audio_tokens"), cached, audio_in)
    if details_out:
        reasoning = min(_count(details_out, "reasoning_tokens"), total_out)
        audio_out = min(_count(details_out, "audio_tokens"), total_out)
        image_out = min(_count(details_out, "image_tokens"), total_out)
    return Tokens(
        total_in,
        cached,
        total_out,
        reasoning,
        audio_in,
        audio_out,
        cached_audio,
        image_in,
        image_out,
    )


def parse_table(text: str, *, origin: str) -> tuple[list[ModelPrice], dict[str, str]]:
    """Rows and ``[sources]`` of one price file (``origin`` names it in errors)."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PriceTableError(f"{origin}: not valid TOML: {exc}") from None
    unknown = set(document) - {"sources", "models"}
    if unknown:
        raise PriceTableError(
            f"{origin}: unknown table {sorted(unknown)[0]!r}; a price file holds "
            '[sources] and [models."<model>"] tables'
        )
    sources = document.get("sources", {})
    if not isinstance(sources, dict) or not all(isinstance(v, str) for v in sources.values()):
        raise PriceTableError(f"{origin}: [sources] maps names to text")
    models = document.get("models", {})
    if not isinstance(models, dict):
        raise PriceTableError(f'{origin}: models must be tables: [models."<model>"]')
    rows = [_row(name, body, origin) for name, body in models.items()]
    seen: dict[str, str] = {}
    for row in rows:
        for name in (row.model, *row.aliases):
            if name in seen and seen[name] != row.model:
                raise PriceTableError(
                    f"{origin}: {name!r} names both {seen[name]!r} and {row.model!r}"
                )
            seen[name] = row.model
    return rows, sources


@functools.cache
def _shipped() -> tuple[tuple[ModelPrice, ...], Mapping[str, str]]:
    text = resources.files(__package__ or "relayd.spend").joinpath(SHIPPED).read_text("utf-8")
    rows, sources = parse_table(text, origin="shipped")
    return tuple(rows), sources


def _merge(merged: dict[str, ModelPrice], extra: Iterable[ModelPrice], origin: str) -> None:
    for row in extra:
        shipped = merged.get(row.model)
        if shipped is not None:
            aliases = tuple(dict.fromkeys((*shipped.aliases, *row.aliases)))
            row = replace(row, aliases=aliases)
        merged[row.model] = row
    owner: dict[str, str] = {}
    for row in merged.values():
        for name in (row.model, *row.aliases):
            if owner.setdefault(name, row.model) != row.model:
                raise PriceTableError(
                    f"{origin}: {name!r} names both {owner[name]!r} and {row.model!r}"
                )


def _row(model: str, body: Any, origin: str) -> ModelPrice:
    where = f"{origin}: [models.{_quoted(model)}]"
    if not model or not isinstance(body, dict):
        raise PriceTableError(f"{where}: a model row is a table with a non-empty name")
    unknown = sorted(set(body) - _ROW_KEYS)
    if unknown:
        raise PriceTableError(
            f"{where}: unknown key {unknown[0]!r}; known: {', '.join(sorted(_ROW_KEYS))}"
        )
    rates = _rates(body, None, where) if any(key in body for key in RATE_KEYS) else None
    flat = body.get("flat", {})
    if not isinstance(flat, dict) or not all(isinstance(unit, str) for unit in flat):
        raise PriceTableError(f"{where}: flat maps units to USD per unit")
    if rates is None and not flat:
        raise PriceTableError(f"{where}: a row needs token prices (input, output) or flat prices")
    above, tier = None, None
    if "long_context" in body:
        if rates is None or not isinstance(body["long_context"], dict):
            raise PriceTableError(f"{where}: long_context is a table beside token prices")
        extra = dict(body["long_context"])
        above = extra.pop("above", None)
        if not isinstance(above, int) or isinstance(above, bool) or above <= 0:
            raise PriceTableError(f"{where}: long_context needs above = <input tokens>")
        tier = _rates(extra, rates, f"{where} long_context")
    checked = body.get("checked")
    if not isinstance(checked, date) or hasattr(checked, "hour"):
        raise PriceTableError(f"{where}: checked = <date, e.g. 2026-01-31> is required")
    source = body.get("source")
    if not isinstance(source, str) or not source:
        raise PriceTableError(f'{where}: source = "<where the price comes from>" is required')
    aliases = body.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
        raise PriceTableError(f"{where}: aliases is a list of model names")
    estimate = body.get("output_estimate")
    if estimate is not None and (not isinstance(estimate, int) or estimate <= 0):
        raise PriceTableError(f"{where}: output_estimate is a positive number of tokens")
    return ModelPrice(
        model=model,
        rates=rates,
        long_context_above=above,
        long_context=tier,
        flat={unit: _money(price, 12, f"{where} flat {unit!r}") for unit, price in flat.items()},
        aliases=tuple(aliases),
        output_estimate=estimate,
        source=source,
        checked=checked,
        origin=origin,
    )


def _rates(body: Mapping[str, Any], base: Rates | None, where: str) -> Rates:
    unknown = sorted(set(body) - set(RATE_KEYS) - (_ROW_KEYS if base is None else set()))
    if unknown:
        raise PriceTableError(f"{where}: unknown key {unknown[0]!r}")
    given = {key: _money(body[key], 6, f"{where} {key}") for key in RATE_KEYS if key in body}
    if base is not None:
        filled = {item.name: getattr(base, item.name) for item in fields(Rates)}
        return Rates(**{**filled, **given})
    if "input" not in given:
        raise PriceTableError(f"{where}: token prices need input = <USD per million tokens>")
    text_in = given["input"]
    text_out = given.get("output", text_in)  # embeddings name input only
    cached = given.get("cached_input", text_in)
    audio_in = given.get("audio_input", text_in)
    return Rates(
        input=text_in,
        cached_input=cached,
        output=text_out,
        audio_input=audio_in,
        cached_audio_input=given.get("cached_audio_input", cached),
        audio_output=given.get("audio_output", text_out),
        image_input=given.get("image_input", text_in),
        image_output=given.get("image_output", text_out),
    )


def _money(value: Any, places: int, where: str) -> int:
    """USD as an integer count of 10^-places USD: per million tokens with 6 places
    (pico-dollars per token), per unit with 12 (pico-dollars per unit)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PriceTableError(f"{where}: a price is a number of US dollars")
    try:
        scaled = Decimal(str(value)).scaleb(places)
    except InvalidOperation:
        raise PriceTableError(f"{where}: {value!r} is not a price") from None
    if scaled < 0 or not scaled.is_finite() or scaled != scaled.to_integral_value():
        raise PriceTableError(f"{where}: {value!r} is negative or finer than 10^-{places} USD")
    return int(scaled)


def _micro(pico: int) -> int:
    return -(-pico // _PICO_PER_MICRO)


def _part(value: int, whole: int) -> int:
    return min(max(value, 0), max(whole, 0))


def _count(mapping: Mapping[str, Any], *keys: str) -> int:
    for key in keys:
        value = mapping.get(key)
        if type(value) is int:  # the usual case, first
            return value if value > 0 else 0
        if value is None or isinstance(value, bool):
            continue
        if isinstance(value, int):
            return max(value, 0)
        if isinstance(value, float) and value.is_integer():
            return max(int(value), 0)
    return 0


def _details(mapping: Mapping[str, Any], *keys: str) -> Mapping[str, Any]:
    for key in keys:
        value = mapping.get(key)
        if isinstance(value, Mapping):
            return value
    return {}


def _quoted(name: str) -> str:
    return f'"{name}"'
