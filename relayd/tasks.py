"""Named background tasks that cannot be garbage-collected while they run.

The event loop keeps only weak references to tasks (asyncio docs, "Important: save a
reference"), so a fire-and-forget task can vanish mid-flight. ``spawn`` keeps a
strong reference until the task is done and insists on a name for debugging.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["spawn"]

T = TypeVar("T")

_running: set[asyncio.Task[Any]] = set()


def spawn(coro: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
    task = asyncio.create_task(coro, name=name)
    _running.add(task)
    task.add_done_callback(_running.discard)
    return task
