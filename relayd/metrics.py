"""Prometheus metrics (prometheus-client), one registry per application.

With several workers, prometheus-client's multiprocess mode keeps every value in
files under ``$PROMETHEUS_MULTIPROC_DIR`` (the supervisor creates it) and any
worker's ``/metrics`` aggregates all of them; gauges use ``livesum`` so a dead
worker's open streams do not linger.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from typing import Any, Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

_DURATION_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_OVERHEAD_BUCKETS: Final = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)


def _histogram_values(child: Histogram) -> tuple[Any, list[Any], list[float]]:
    """A labelled histogram's sum, its buckets' counts and their upper bounds (the
    last +Inf), to observe a value as Histogram.observe does."""
    return child._sum, child._buckets, child._upper_bounds


class Metrics:
    def __init__(self) -> None:
        self._request_series: dict[tuple[str, int], tuple[Any, ...]] = {}
        self._token_values: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._spend_children: dict[tuple[str, str], Any] = {}
        self._multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        # In multiprocess mode values live in files; registering them would double count.
        self._registry = CollectorRegistry(auto_describe=True)
        registry = None if self._multiprocess else self._registry
        self.requests = Counter(
            "relayd_requests",
            "Requests answered, by route group and status.",
            ("group", "status"),
            registry=registry,
        )
        self.duration = Histogram(
            "relayd_request_duration_seconds",
            "Time from request to the end of the response, by route group.",
            ("group",),
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        self.overhead = Histogram(
            "relayd_relay_overhead_seconds",
            "Time relayd spent on a relayed request other than waiting on upstream or the client.",
            ("group",),
            buckets=_OVERHEAD_BUCKETS,
            registry=registry,
        )
        self.open_streams = Gauge(
            "relayd_open_streams",
            "Event streams currently open.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.open_websockets = Gauge(
            "relayd_open_websockets",
            "Realtime WebSocket bridges currently open.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.upstream_errors = Counter(
            "relayd_upstream_errors",
            "Upstream failures by kind (unreachable, timeout, broken_stream, status_5xx).",
            ("kind",),
            registry=registry,
        )
        # relayd's own TLS only; an alert fires on it (docs/security.md#own-tls).
        self.tls_expiry = Gauge(
            "relayd_tls_certificate_expiry_timestamp_seconds",
            "When the certificate relayd serves expires (Unix time).",
            registry=registry,
            multiprocess_mode="livemin",
        )
        self.tokens = Counter(
            "relayd_tokens",
            "Tokens used, from upstream usage reports, by relay key, model and direction.",
            ("key", "model", "direction"),
            registry=registry,
        )
        # MCP tool calls (relayd/mcp/calls.py): ok, error (isError) or in_progress
        # (a handle: the answer budget ran out first).
        self.tool_calls = Counter(
            "relayd_mcp_tool_calls",
            "MCP tool calls by tool and outcome (ok, error, in_progress).",
            ("tool", "outcome"),
            registry=registry,
        )

        # Spend control (relayd/spend/): money by key and model, refusals by reason,
        # and how long each ledger operation takes.
        self.spend = Counter(
            "relayd_spend_usd",
            "US dollars settled, by relay key and model.",
            ("key", "model"),
            registry=registry,
        )
        self.spend_refusals = Counter(
            "relayd_spend_refusals",
            "Requests refused by spend control, by reason.",
            ("reason",),
            registry=registry,
        )
        self.spend_open_passes = Counter(
            "relayd_spend_open_passes",
            "Requests let through unchecked while the ledger was unavailable (open mode).",
            registry=registry,
        )
        self.ledger_seconds = Histogram(
            "relayd_ledger_operation_seconds",
            "Time one spend-ledger operation took, by operation.",
            ("operation",),
            buckets=_OVERHEAD_BUCKETS,
            registry=registry,
        )

    # Labelled children are resolved once per label set: labels() takes a lock and
    # builds a key on every call. The per-request series go further and keep the
    # children's values themselves: inc() and observe() re-check on every call that
    # the child has its labels, and observe() walks the buckets in Python, while the
    # value objects (per process, or the multiprocess files) are what they update.
    def observe_request(
        self, group: str, status: int, duration: float, overhead: float | None
    ) -> None:
        series = self._request_series.get((group, status))
        if series is None:
            series = self._request_series[(group, status)] = (
                self.requests.labels(group, str(status))._value,
                *_histogram_values(self.duration.labels(group)),
                *_histogram_values(self.overhead.labels(group)),
            )
        count, total, buckets, bounds, overhead_total, overhead_buckets, overhead_bounds = series
        count.inc(1)
        total.inc(duration)
        buckets[bisect_left(bounds, duration)].inc(1)  # the first bucket with le >= duration
        if overhead is not None:
            overhead_total.inc(overhead)
            overhead_buckets[bisect_left(overhead_bounds, overhead)].inc(1)

    def count_tokens(self, key: str, model: str, input_tokens: int, output_tokens: int) -> None:
        values = self._token_values.get((key, model))
        if values is None:
            values = self._token_values[(key, model)] = (
                self.tokens.labels(key, model, "input")._value,
                self.tokens.labels(key, model, "output")._value,
            )
        if input_tokens < 0 or output_tokens < 0:  # Counter.inc refuses these
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        values[0].inc(input_tokens)
        values[1].inc(output_tokens)

    def count_spend(self, key: str, model: str, micro_usd: int) -> None:
        if micro_usd:
            child = self._spend_children.get((key, model))
            if child is None:
                child = self._spend_children[(key, model)] = self.spend.labels(
                    key, model or "unknown"
                )
            child.inc(micro_usd / 1_000_000)

    def exposition(self) -> bytes:
        if self._multiprocess:
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self._registry)
