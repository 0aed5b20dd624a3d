"""relayd: a streaming-first relay between OpenAI's API and one team's clients."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
