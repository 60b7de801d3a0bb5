"""Parsing completion and chat bodies: each parameter has the type the OpenAPI document gives it
(null means the default); a value of another type is a 400 naming it, never read for its
truthiness."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from tidegate.api.generation import parse_generation_request
from tidegate.errors import InvalidRequest


def parse(**fields: Any) -> Any:
    return parse_generation_request(orjson.dumps({"model": "m", "prompt": "p", **fields}),
                                    "completion")


@pytest.mark.parametrize(("fields", "param"), [
    ({"stream": 0}, "stream"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": []}, "stream_options"),
    ({"stream_options": {"include_usage": 1}}, "stream_options"),
    ({"user": {}}, "user"),
    ({"stop": False}, "stop"),
    ({"stop": 0}, "stop"),
    ({"n": True}, "n"),
    ({"n": 2}, "n"),
])
def test_mistyped_parameters_are_refused(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse(**fields)
    assert caught.value.param == param


def test_null_means_the_default() -> None:
    request = parse(stream=None, stream_options=None, user=None, stop=None, n=None, seed=None,
                    temperature=None, top_p=None, max_tokens=None)
    assert request.stream is False and request.include_usage is False
    assert request.params.stop == () and request.params.max_tokens == 16


def test_valid_values() -> None:
    request = parse(stream=True, stream_options={"include_usage": True}, user="u", stop="",
                    n=1, max_tokens=4.0)
    assert request.stream and request.include_usage
    assert request.params.stop == () and request.params.max_tokens == 4


@pytest.mark.parametrize(
    ("fields", "expected"),
    [({"max_tokens": 5, "max_completion_tokens": None}, 5),
     ({"max_tokens": 5, "max_completion_tokens": 7}, 7),
     ({"max_completion_tokens": None}, 16),
     ({"max_tokens": None, "max_completion_tokens": 3}, 3)],
)
def test_max_completion_tokens_null_falls_back_to_max_tokens(
    fields: dict[str, Any], expected: int
) -> None:
    body = orjson.dumps({"model": "m", "prompt": "x", **fields})
    assert parse_generation_request(body, "completion").params.max_tokens == expected


def test_an_empty_prompt_is_refused_as_the_document_says() -> None:
    for prompt in ("", [""]):
        with pytest.raises(InvalidRequest) as caught:
            parse_generation_request(orjson.dumps({"model": "m", "prompt": prompt}), "completion")
        assert caught.value.param == "prompt"
