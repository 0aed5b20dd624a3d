"""ChatGPT apps and spend control together: a linked app spends as its relay key.

A tool call runs its route's own handler and reaches upstream through the same
metered floor as REST (relayd/metering.py), and an OAuth token acts as its key, so
an app linked with a relay key is counted, limited and refused as that key.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from aiohttp.test_utils import TestClient

from relayd.config import KeyLimits
from relayd.state import SETTINGS, SPEND
from relayd.store import state_dir
from relayd.store.ledger import LEDGER_FILE
from tests.conftest import RELAY_KEY, RelayFactory
from tests.fakes.openai import FakeOpenAI
from tests.oauthflow import bearer, login, register, tokens

PUBLIC_URL = "http://127.0.0.1:8999"
ACCEPT = "application/json, text/event-stream"


async def tool_call(relay: TestClient, token: str, name: str, arguments: dict[str, Any]) -> Any:
    body = {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {"name": name, "arguments": arguments},
    }
    response = await relay.post("/mcp", json=body, headers={**bearer(token), "Accept": ACCEPT})
    assert response.status == 200, await response.text()
    return (await response.json())["result"]


async def linked_token(relay: TestClient) -> str:
    """An access token of an app linked with the relay key "team"."""
    done = await login(relay, await register(relay), RELAY_KEY)
    status, granted = await tokens(relay, done)
    assert status == 200
    return str(granted["access_token"])


async def ledger(relay: TestClient) -> list[tuple[Any, ...]]:
    await relay.app[SPEND].drain()
    db = sqlite3.connect(state_dir(relay.app[SETTINGS]) / LEDGER_FILE)
    try:
        return db.execute(
            "SELECT key, operation, outcome, reason, micro_usd > 0 FROM events ORDER BY id"
        ).fetchall()
    finally:
        db.close()


def upstream_posts(fake: FakeOpenAI) -> int:
    return sum(1 for seen in fake.seen if (seen.method, seen.path) == ("POST", "/v1/responses"))


async def test_a_linked_apps_tool_call_is_booked_under_its_relay_key(
    relay_factory: RelayFactory, fake: FakeOpenAI
) -> None:
    relay = await relay_factory(
        server={"public_url": PUBLIC_URL},
        spend={"keys": {"team": KeyLimits(usd_total=1_000_000)}},
    )
    token = await linked_token(relay)
    result = await tool_call(relay, token, "createActionResponse", {"input": "hi"})
    assert not result.get("isError"), result
    assert upstream_posts(fake) == 1
    assert await ledger(relay) == [("team", "createResponse", "ok", "", 1)]


async def test_an_exhausted_budget_reaches_the_model_as_a_tool_error_and_nothing_goes_upstream(
    relay_factory: RelayFactory, fake: FakeOpenAI
) -> None:
    relay = await relay_factory(
        server={"public_url": PUBLIC_URL},
        spend={"keys": {"team": KeyLimits(usd_total=1)}},  # one micro-dollar
    )
    token = await linked_token(relay)
    first = await tool_call(relay, token, "createActionResponse", {"input": "hi"})
    assert first.get("isError"), "the estimate alone is over a one micro-dollar budget"
    text = " ".join(part.get("text", "") for part in first["content"])
    assert "insufficient_quota" in text or "budget" in text.lower(), text
    assert RELAY_KEY not in text
    assert upstream_posts(fake) == 0
    assert await ledger(relay) == [("team", "createResponse", "refused", "insufficient_quota", 0)]
