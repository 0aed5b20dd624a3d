"""Prometheus metrics and usage accounting."""

from __future__ import annotations

import asyncio
import hashlib
import json

import openai
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from relayd.config import RelayKey
from relayd.metrics import _DURATION_BUCKETS, _OVERHEAD_BUCKETS, Metrics
from relayd.usage import UsageTap
from tests.conftest import RELAY_KEY, RelayFactory

SCRAPER_KEY = "rk-canary-scraper-key-000000000"


def _scraper() -> RelayKey:
    return RelayKey(
        "scraper", hashlib.sha256(SCRAPER_KEY.encode()).digest(), frozenset({"metrics"})
    )


async def scrape(
    relay: TestClient, key: str = RELAY_KEY
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await relay.get("/metrics", headers={"Authorization": f"Bearer {key}"})
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_need_a_key_and_a_metrics_only_key_sees_nothing_else(
    relay_factory: RelayFactory,
) -> None:
    relay = await relay_factory(auth={"keys": (_scraper(),)})
    assert (await relay.get("/metrics")).status == 401
    await scrape(relay, SCRAPER_KEY)
    response = await relay.get("/v1/models", headers={"Authorization": f"Bearer {SCRAPER_KEY}"})
    assert response.status == 403


async def test_json_answers_count_requests_overhead_and_tokens(
    relay: TestClient, sdk: openai.AsyncOpenAI
) -> None:
    await sdk.responses.create(model="gpt-5", input="hi")
    await sdk.embeddings.create(model="text-embedding-3-small", input="hi")
    samples = await scrape(relay)
    assert value(samples, "relayd_requests_total", group="responses", status="200") == 1
    assert value(samples, "relayd_relay_overhead_seconds_count", group="responses") == 1
    assert value(samples, "relayd_tokens_total", key="team", model="gpt-5", direction="input") == 11
    assert value(samples, "relayd_tokens_total", key="team", model="gpt-5", direction="output") == 3
    embedding = {"key": "team", "model": "text-embedding-3-small"}
    assert value(samples, "relayd_tokens_total", **embedding, direction="input") == 3


async def test_streams_count_tokens_from_the_final_event_and_close_their_gauge(
    relay: TestClient, sdk: openai.AsyncOpenAI
) -> None:
    stream = await sdk.responses.create(model="gpt-5", input="hi", stream=True)
    async for _ in stream:
        pass
    samples = await scrape(relay)
    assert value(samples, "relayd_tokens_total", key="team", model="gpt-5", direction="input") == 11
    assert value(samples, "relayd_open_streams") == 0
    assert value(samples, "relayd_requests_total", group="responses", status="200") == 1


async def test_upstream_failures_are_counted_by_kind(
    relay: TestClient, sdk: openai.AsyncOpenAI
) -> None:
    stream = await sdk.responses.create(model="break", input="hi", stream=True)
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass
    with pytest.raises(openai.InternalServerError):
        await sdk.responses.create(model="error-500", input="hi")
    samples = await scrape(relay)
    assert value(samples, "relayd_upstream_errors_total", kind="broken_stream") == 1
    assert value(samples, "relayd_upstream_errors_total", kind="status_5xx") == 1


async def test_unreachable_upstream_is_counted(
    relay_factory: RelayFactory, unused_tcp_port: int
) -> None:
    relay = await relay_factory(upstream={"url": f"http://127.0.0.1:{unused_tcp_port}"})
    response = await relay.get("/v1/models", headers={"Authorization": f"Bearer {RELAY_KEY}"})
    assert response.status == 502
    samples = await scrape(relay)
    assert value(samples, "relayd_upstream_errors_total", kind="unreachable") == 1


def test_usage_tap_reads_chat_usage_chunks_and_ignores_garbage() -> None:
    tap = UsageTap(event_stream=True)
    chunk = {"model": "gpt-5", "choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2}}
    tap(f"data: {json.dumps(chunk)}\n\n".encode())
    tap(b"data: [DONE]\n\n")
    usage = tap.usage()
    assert usage is not None and (usage.input_tokens, usage.output_tokens) == (4, 2)
    broken = UsageTap(event_stream=False)
    broken(b'{"usage": {"input_tokens": "x"')
    assert broken.usage() is None


async def test_open_websockets_gauge_follows_bridges(relay: TestClient) -> None:
    url = "/v1/realtime?model=gpt-realtime"
    headers = {"Authorization": f"Bearer {RELAY_KEY}"}
    async with asyncio.timeout(5):
        async with relay.ws_connect(url, headers=headers) as ws:
            assert value(await scrape(relay), "relayd_open_websockets") == 1
            await ws.close()
        while value(await scrape(relay), "relayd_open_websockets") != 0:
            await asyncio.sleep(0.01)
    samples = await scrape(relay)
    assert value(samples, "relayd_requests_total", group="realtime", status="101") == 1


def _histogram(family: Metric, **labels: str) -> list[tuple[str, str, float]]:
    return [
        (s.name.removeprefix(family.name), s.labels.get("le", ""), s.value)
        for s in family.samples
        if not s.name.endswith("_created") and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def test_request_histograms_count_each_value_where_prometheus_client_would() -> None:
    metrics = Metrics()
    durations = Histogram("d", "", buckets=_DURATION_BUCKETS, registry=CollectorRegistry())
    overheads = Histogram("o", "", buckets=_OVERHEAD_BUCKETS, registry=CollectorRegistry())
    # Every bound itself (le counts it), just past it, nothing, and past the last one.
    bounds = (*_DURATION_BUCKETS, *_OVERHEAD_BUCKETS)
    for value in (0.0, *bounds, *(b * 1.001 for b in bounds), 1e6):
        metrics.observe_request("responses", 200, value, value)
        durations.observe(value)
        overheads.observe(value)
    metrics.observe_request("responses", 200, 0.5, None)  # never went upstream
    durations.observe(0.5)
    [mine] = metrics.duration.collect()
    [theirs] = durations.collect()
    assert _histogram(mine, group="responses") == _histogram(theirs)
    [mine] = metrics.overhead.collect()
    [theirs] = overheads.collect()
    assert _histogram(mine, group="responses") == _histogram(theirs)
    [requests] = metrics.requests.collect()
    assert [(s.name, s.value) for s in requests.samples if s.name.endswith("_total")] == [
        ("relayd_requests_total", 2 * len(bounds) + 3)
    ]
