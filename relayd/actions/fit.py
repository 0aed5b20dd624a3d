"""Answers that fit ChatGPT's limit: under 100,000 characters, and saying so when cut.

GPT Actions refuse a response of 100,000 characters or more
(docs/chatgpt.md#answer-size). ChatGPT
counts characters, so sizes here are ``len()`` of the JSON text as relayd sends it
(``ensure_ascii=False``: an "é" is one character, not the six of ``\\u00e9``).
Cutting always leaves a note in the answer itself, so the model can tell the user.
"""

from __future__ import annotations

import json
from typing import Any, Final

__all__ = ["dumps", "fit_json"]

MARK: Final = " …[cut by the relay]"
NOTE_KEY: Final = "relay_note"
_ROUNDS: Final = 64


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def fit_json(answer: dict[str, Any], limit: int) -> dict[str, Any]:
    """``answer`` (a JSON object) shrunk until its JSON text is at most ``limit`` long.

    The largest thing is cut first, again and again: a long string is shortened, a
    long list loses items from its end. An answer that had to shrink gains a
    ``relay_note`` saying how long it was and that the full one is upstream.
    """
    original = len(dumps(answer))
    if original <= limit:
        return answer
    note = (
        f"This answer was {original} characters long; the relay cut it to fit ChatGPT's "
        f"limit of {limit}. Ask for less (a page, a filter) or fetch the rest elsewhere."
    )
    fitted: dict[str, Any] = json.loads(dumps(answer))  # a private copy to cut
    fitted[NOTE_KEY] = note
    for _ in range(_ROUNDS):
        excess = len(dumps(fitted)) - limit
        if excess <= 0:
            return fitted
        if not _shrink_largest(fitted, excess):
            break
    return {NOTE_KEY: note}  # nothing left to cut that would help


def _shrink_largest(root: dict[str, Any], excess: int) -> bool:
    best: tuple[int, Any, Any] | None = None  # (size, container, key)
    stack: list[Any] = [root]
    while stack:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            if node is root and key == NOTE_KEY:
                continue
            if isinstance(value, str):
                size = len(value)
            elif isinstance(value, list | dict):
                stack.append(value)
                if not isinstance(value, list) or len(value) < 2:
                    continue
                size = len(dumps(value))
            else:
                continue
            if best is None or size > best[0]:
                best = (size, node, key)
    if best is None:
        return False
    size, container, key = best
    value = container[key]
    if isinstance(value, str):
        keep = size - excess - len(MARK)
        container[key] = value[:keep] + MARK if keep > 0 else ""
        return True
    # A list: drop items from the end until the cut covers the excess (at least one).
    while len(value) > 1 and excess > 0:
        excess -= len(dumps(value.pop())) + 1
    return True
