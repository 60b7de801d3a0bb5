from __future__ import annotations

import base64

import numpy as np
import orjson
import pytest

from tidegate.api.schemas import encode_embedding_response, parse_embedding_request
from tidegate.errors import InvalidRequest, PayloadTooLarge


def parse(body: object, max_inputs: int = 10) -> object:
    return parse_embedding_request(orjson.dumps(body), max_inputs=max_inputs)


def test_string_and_list_inputs() -> None:
    assert parse({"model": "m", "input": "a"}).inputs == ["a"]  # type: ignore[attr-defined]
    request = parse({"model": "m", "input": ["a", "b"], "encoding_format": "base64"})
    assert request.inputs == ["a", "b"]  # type: ignore[attr-defined]
    assert request.encoding_format == "base64"  # type: ignore[attr-defined]


def test_null_encoding_format_means_float() -> None:
    request = parse({"model": "m", "input": "a", "encoding_format": None})
    assert request.encoding_format == "float"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "a"}, "model"),
        ({"model": "m"}, "input"),
        ({"model": None, "input": "a"}, "model"),
        ({"model": "m", "input": {"a": 1}}, "input"),
        ({"model": "m", "input": [1, 2]}, "input"),
        ({"model": "m", "input": [True]}, "input"),
        ({"model": "m", "input": "a", "dimensions": 0}, "dimensions"),
        ({"model": "m", "input": "a", "dimensions": True}, "dimensions"),
        ({"model": "m", "input": "a", "dimensions": 2.5}, "dimensions"),
        ({"model": "m", "input": "a", "encoding_format": {}}, "encoding_format"),
        ({"model": "m", "input": "a", "encoding_format": ""}, "encoding_format"),
    ],
)
def test_invalid_requests_name_the_parameter(body: object, param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse(body)
    assert caught.value.param == param


def test_dimensions_spelled_as_a_float_is_an_integer() -> None:
    """JSON Schema's integers (hence the OpenAPI document's) include ``384.0``."""
    request = parse({"model": "m", "input": "a", "dimensions": 384.0})
    assert request.dimensions == 384 and isinstance(request.dimensions, int)  # type: ignore[attr-defined]


def test_too_many_inputs() -> None:
    with pytest.raises(PayloadTooLarge) as caught:
        parse({"model": "m", "input": ["a"] * 11})
    assert caught.value.limit == 10 and caught.value.actual == 11


@pytest.mark.parametrize("body", [b"", b"{", b"[1]", b"null", b'"x"'])
def test_not_a_json_object(body: bytes) -> None:
    with pytest.raises(InvalidRequest):
        parse_embedding_request(body, max_inputs=10)


def test_response_shapes() -> None:
    vectors = [np.array([1.0, -0.5], dtype=np.float32), np.array([0.25, 2.0], dtype=np.float32)]
    floats = orjson.loads(encode_embedding_response(
        model="m", vectors=vectors, prompt_tokens=7, encoding_format="float"))
    assert floats == {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [1.0, -0.5]},
                 {"object": "embedding", "index": 1, "embedding": [0.25, 2.0]}],
        "model": "m",
        "usage": {"prompt_tokens": 7, "total_tokens": 7},
    }
    b64 = orjson.loads(encode_embedding_response(
        model="m", vectors=vectors, prompt_tokens=7, encoding_format="base64"))
    raw = base64.b64decode(b64["data"][1]["embedding"])
    assert raw == np.array([0.25, 2.0], dtype="<f4").tobytes()
