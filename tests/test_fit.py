"""The answer fitter: what relayd hands a GPT Action stays under ChatGPT's limit.

ChatGPT refuses an action answer of 100,000 characters or more, and counts
characters of the JSON text (``docs/chatgpt.md#answer-size``). ``fit_json`` must
leave a small answer alone, shrink a large one to at most the limit, keep it a JSON
object that survives a round trip, and say in the answer itself that it was cut.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relayd.actions.fit import MARK, NOTE_KEY, dumps, fit_json

# relayd refuses a max_answer_chars below 1000 (config), so limits start there.
LIMITS = st.integers(min_value=1000, max_value=6000)

# Long strings cheaply: a short piece repeated, with any characters (non-ASCII,
# quotes, control characters, whose JSON escapes are longer than they are).
_STRINGS = st.builds(
    lambda piece, times: piece * times,
    st.text(max_size=8),
    st.integers(min_value=0, max_value=400),
)
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _STRINGS
)
_KEYS = st.text(max_size=6).filter(lambda k: k != NOTE_KEY)
_JSON = st.recursive(
    _SCALARS,
    lambda children: st.lists(children, max_size=8) | st.dictionaries(_KEYS, children, max_size=4),
    max_leaves=16,
)
ANSWERS = st.dictionaries(_KEYS, _JSON, max_size=6)

_PROPERTY = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _size(value: Any) -> int:
    return len(dumps(value))


@_PROPERTY
@given(answer=ANSWERS, limit=LIMITS)
def test_any_answer_comes_back_within_the_limit_as_json_and_says_whether_it_was_cut(
    answer: dict[str, Any], limit: int
) -> None:
    # One generated answer checks every rule, so the property costs one generation.
    before = copy.deepcopy(answer)
    original = _size(answer)
    fitted = fit_json(answer, limit)

    assert _size(fitted) <= limit
    assert isinstance(fitted, dict)
    assert json.loads(dumps(fitted)) == fitted, "not a JSON object that round-trips"
    assert answer == before, "the caller's answer was modified"
    if original <= limit:
        assert fitted is answer, "an answer under the limit must come back as it is"
    else:
        note = fitted[NOTE_KEY]
        assert f"was {original} characters long" in note
        assert f"limit of {limit}" in note


def test_characters_are_counted_as_chatgpt_counts_them_not_as_ascii_escapes() -> None:
    # ensure_ascii=False: "é" is one character of the limit, not the six of \u00e9.
    answer = {"text": "é" * 990}
    assert _size(answer) == 1001
    assert fit_json(answer, 1001) is answer


def test_a_long_text_is_cut_at_its_end_and_the_small_fields_survive() -> None:
    answer = {"id": "resp_1", "model": "gpt-5", "output_text": "abc" * 40_000}
    fitted = fit_json(answer, 90_000)

    assert (fitted["id"], fitted["model"]) == ("resp_1", "gpt-5")
    text = fitted["output_text"]
    assert text.endswith(MARK)
    assert answer["output_text"].startswith(text.removesuffix(MARK))
    # Cut to fit, not to nothing: the answer uses the room the limit leaves.
    assert 90_000 - len(MARK) <= _size(fitted) <= 90_000


def test_a_long_list_keeps_its_first_items_in_order() -> None:
    items = [{"id": f"file_{i}", "filename": "x" * 80} for i in range(1000)]
    fitted = fit_json({"object": "list", "data": items}, 5000)

    kept = fitted["data"]
    assert 1 <= len(kept) < len(items)
    assert kept == items[: len(kept)]
    assert fitted["object"] == "list"
    assert _size(fitted) <= 5000


def test_an_answer_with_nothing_to_cut_becomes_the_note_alone() -> None:
    # Thousands of small numbers: no string or list whose cutting would help enough.
    answer = {f"k{i}": i for i in range(2000)}
    fitted = fit_json(answer, 1000)
    assert list(fitted) == [NOTE_KEY]
    assert _size(fitted) <= 1000
