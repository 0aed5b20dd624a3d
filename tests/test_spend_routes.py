"""Every route is classified for spend control, and nothing reaches upstream unmetered.

Metering sits where calls go upstream (relay.exchange, the realtime bridge) and
judges each call by the OpenAI route it reaches (relayd/spend/costs.py). Two
things could let money through: an OpenAI route nobody classified, and code that
talks to upstream without passing the metering floor. These tests fail on both.
"""

from __future__ import annotations

import re
from pathlib import Path

from relayd.routes import TABLE
from relayd.spend.costs import COSTS, RELAYING_GROUPS, Cost, cost_of

PACKAGE = Path(__file__).resolve().parent.parent / "relayd"
# The metering floor: the only places that may open an upstream request or WebSocket.
METERED_CALLERS = {"relay.py": "open", "handlers/realtime.py": "ws_connect"}


def test_every_openai_route_is_classified_for_spend() -> None:
    unclassified = [
        route.operation_id
        for route in TABLE
        if route.group not in RELAYING_GROUPS and route.operation_id not in COSTS
    ]
    assert unclassified == [], (
        "classify these routes in relayd/spend/costs.py (free, or how they are metered): "
        f"{unclassified}"
    )
    stale = set(COSTS) - {route.operation_id for route in TABLE}
    assert stale == set(), f"relayd/spend/costs.py names routes the table lacks: {stale}"


def test_model_calls_are_metered_and_reads_are_free() -> None:
    paid = {op for op, cost in COSTS.items() if cost is not Cost.FREE}
    assert {
        "createResponse",
        "createResponseStream",
        "createChatCompletion",
        "createEmbedding",
        "createImage",
        "createSpeech",
        "createVideo",
        "connectRealtime",
        "getResponse",  # a poll settles a background response
    } <= paid
    for route in TABLE:
        if route.group not in RELAYING_GROUPS and route.method in ("GET", "DELETE"):
            assert cost_of(route.operation_id, route.method) in (
                Cost.FREE,
                Cost.POLL,
                Cost.REALTIME,
            ), route.operation_id


def test_an_unknown_upstream_post_is_metered_by_its_usage() -> None:
    assert cost_of(None, "POST") is Cost.TOKENS  # a catch-all path the policy allows
    assert cost_of(None, "GET") is Cost.FREE


def test_only_the_metering_floor_talks_to_upstream() -> None:
    calls = re.compile(r"\[UPSTREAM\]\.(open|ws_connect)\(")
    found = {}
    for path in PACKAGE.rglob("*.py"):
        for match in calls.finditer(path.read_text()):
            found[str(path.relative_to(PACKAGE))] = match.group(1)
    assert found == METERED_CALLERS
