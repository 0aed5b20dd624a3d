from __future__ import annotations

import openai

from tests.conftest import RELAY_KEY
from tests.fakes.openai import UPSTREAM_KEY, FakeOpenAI


async def test_sdk_responses_create_goes_upstream_with_the_upstream_key(
    sdk: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    response = await sdk.responses.create(model="gpt-5", input="hi")
    assert response.output_text == "Hello there!"
    seen = fake.last("/v1/responses")
    assert seen.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert RELAY_KEY not in str(seen.headers)
