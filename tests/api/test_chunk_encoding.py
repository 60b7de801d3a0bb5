"""Streamed text chunks come from a per-request template: they must be byte-for-byte the
chunk the full encoder builds, for either endpoint and any text."""

from __future__ import annotations

import orjson
import pytest

from tidegate.api.generation import GenerationRequest, _Encoder
from tidegate.generation.params import SamplingParams

TEXTS = ["", "plain", ' "quoted" \\ back', "new\nline\ttab", "日本語 🙂", "\x00\x01", "}]},"]


@pytest.mark.parametrize("endpoint", ["completion", "chat"])
@pytest.mark.parametrize("model", ["tiny", 'odd "name" \x00'])
def test_template_chunks_equal_fully_encoded_chunks(endpoint: str, model: str) -> None:
    request = GenerationRequest(
        model=model, endpoint=endpoint,  # type: ignore[arg-type]
        prompt="hi" if endpoint == "completion" else None,
        messages=[{"role": "user", "content": "hi"}] if endpoint == "chat" else None,
        params=SamplingParams(max_tokens=4), stream=True, include_usage=False, body={},
    )
    encoder = _Encoder(request, model)
    for text in TEXTS:
        chunk = encoder.delta(text)
        assert chunk == encoder._chunk(encoder._text_choice(text))
        event = orjson.loads(chunk.removeprefix(b"data: ").removesuffix(b"\n\n"))
        choice = event["choices"][0]
        assert (choice["delta"]["content"] if endpoint == "chat" else choice["text"]) == text
        assert event["model"] == model
