"""Moving bytes, events and frames between two peers.

Nothing here knows about OpenAI, routes or configuration: these are plain
transports with backpressure, cancellation and honest endings.
"""

from __future__ import annotations

from relayd.streams.pump import (
    BrokenStreamError,
    LimitExceededError,
    Pumped,
    Tap,
    abort,
    pump,
    pump_request_body,
)
from relayd.streams.sse import KEEPALIVE, SSEPump, is_event_stream
from relayd.streams.websocket import BridgeStats, Leg, WebSocketBridge

__all__ = [
    "KEEPALIVE",
    "BridgeStats",
    "BrokenStreamError",
    "Leg",
    "LimitExceededError",
    "Pumped",
    "SSEPump",
    "Tap",
    "WebSocketBridge",
    "abort",
    "is_event_stream",
    "pump",
    "pump_request_body",
]
