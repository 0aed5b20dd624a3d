"""Token usage read without parsing whole answers: it must agree with a full parse.

``read_usage`` decodes only the last ``"usage"`` object and the first ``"model"``
string. hypothesis builds answers in OpenAI's shapes (Responses objects and their
events, chat completions and chunks, embeddings) whose free text, metadata and
schemas say "usage" and "model" in every way a user could make them, and checks
that the shortcut reads what parsing the whole document reads.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.usage import Usage, UsageTap, read_usage

_TRICKY_TEXT = st.one_of(
    st.text(max_size=20),
    st.sampled_from(
        [
            '"usage": {"input_tokens": 999, "output_tokens": 999}',
            '{"model": "fake-model"}',
            'model": "x',
            "usage",
            '\\"usage\\": {}',
            '"model":',
        ]
    ),
)
_TOKENS = st.integers(min_value=0, max_value=10**6)
_KEYS = st.one_of(st.sampled_from(["usage", "model", 'x"usage']), st.text(max_size=8))
_METADATA = st.dictionaries(_KEYS, _TRICKY_TEXT, max_size=4)
_SCHEMA = st.one_of(
    st.none(),
    st.just(
        {"format": {"type": "json_schema", "schema": {"properties": {"usage": {"type": "object"}}}}}
    ),
)
_MODEL = st.one_of(st.sampled_from(["gpt-5", "text-embedding-3-small"]), _TRICKY_TEXT)


@st.composite
def _response(draw: st.DrawFn) -> dict[str, Any]:
    """A Responses object, keys in the API's order."""
    usage = draw(
        st.one_of(
            st.none(),
            st.fixed_dictionaries({}, optional={"input_tokens": _TOKENS, "output_tokens": _TOKENS}),
        )
    )
    return {
        "id": "resp_1",
        "object": "response",
        "status": "completed",
        "error": None,
        "instructions": draw(st.one_of(st.none(), _TRICKY_TEXT)),
        "model": draw(_MODEL),
        "output": [
            {"type": "message", "content": [{"type": "output_text", "text": draw(_TRICKY_TEXT)}]}
        ],
        "text": draw(_SCHEMA),
        "tools": draw(st.sampled_from([[], [{"type": "image_generation", "model": "gpt-img"}]])),
        "usage": usage,
        "user": draw(st.one_of(st.none(), _TRICKY_TEXT)),
        "metadata": draw(_METADATA),
    }


@st.composite
def _chat(draw: st.DrawFn) -> dict[str, Any]:
    """A chat completion (or its final chunk), or an embeddings list."""
    counts = st.fixed_dictionaries(
        {}, optional={"prompt_tokens": _TOKENS, "completion_tokens": _TOKENS}
    )
    if draw(st.booleans()):
        return {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": draw(_MODEL),
            "choices": [{"message": {"role": "assistant", "content": draw(_TRICKY_TEXT)}}],
            "usage": draw(st.one_of(st.none(), counts)),
        }
    return {
        "object": "list",
        "data": [{"object": "embedding", "embedding": [0.1, -0.2]}],
        "model": draw(_MODEL),
        "usage": {"prompt_tokens": draw(_TOKENS), "total_tokens": draw(_TOKENS)},
    }


_ANSWERS = st.one_of(
    _response(),
    _response().map(lambda r: {"type": "response.completed", "sequence_number": 9, "response": r}),
    _chat(),
)


def _parsed_whole(document: bytes) -> Usage | None:
    """What a full parse reads: the meaning read_usage must keep."""
    obj = json.loads(document)
    if isinstance(obj.get("response"), dict):
        obj = obj["response"]
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        return None
    model = str(obj.get("model") or "unknown")
    if "input_tokens" in usage or "output_tokens" in usage:
        return Usage(model, usage.get("input_tokens") or 0, usage.get("output_tokens") or 0)
    return Usage(model, usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0)


@given(_ANSWERS, st.sampled_from([None, 2]), st.booleans())
@settings(max_examples=500, deadline=None, database=None)
def test_reading_usage_agrees_with_parsing_the_whole_answer(
    answer: dict[str, Any], indent: int | None, ascii_only: bool
) -> None:
    document = json.dumps(answer, indent=indent, ensure_ascii=ascii_only).encode()
    assert read_usage(document) == _parsed_whole(document)


def test_a_tap_reads_a_stream_of_chunks_and_a_small_answer_in_one_piece() -> None:
    event = {
        "type": "response.completed",
        "response": {"model": "gpt-5", "usage": {"input_tokens": 7, "output_tokens": 5}},
    }
    stream = f"event: response.completed\ndata: {json.dumps(event)}\n\n".encode()
    tap = UsageTap(event_stream=True)
    for at in range(0, len(stream), 7):  # split anywhere, even inside the JSON
        tap(stream[at : at + 7])
    assert tap.usage() == Usage("gpt-5", 7, 5)
    whole = UsageTap(event_stream=False)
    whole(json.dumps({"model": "gpt-5", "usage": {"input_tokens": 1, "output_tokens": 2}}).encode())
    assert whole.usage() == Usage("gpt-5", 1, 2)


def test_a_body_too_big_to_be_an_answer_is_not_read() -> None:
    tap = UsageTap(event_stream=False)
    tap(b'{"model": "gpt-5", "filler": "' + b"x" * (600 * 1024) + b'"')
    tap(b', "usage": {"input_tokens": 1, "output_tokens": 2}}')
    assert tap.usage() is None
