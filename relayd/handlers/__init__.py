"""The OpenAI face: pass-through relay, realtime and the relay's own meta routes."""

from __future__ import annotations

__all__: list[str] = []
