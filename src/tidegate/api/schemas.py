"""Request parsing/validation and response encoding for the OpenAI-compatible API.

Hand-written over orjson rather than a model library: it is the hot path, and each check names
the OpenAI parameter it concerns.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import orjson

from tidegate.errors import InvalidRequest, PayloadTooLarge

__all__ = [
    "EmbeddingRequest",
    "encode_embedding_response",
    "parse_embedding_request",
    "parse_json_object",
]

EncodingFormat = Literal["float", "base64"]


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    model: str
    inputs: list[str]
    encoding_format: EncodingFormat
    dimensions: int | None


def parse_json_object(body: bytes) -> dict[str, Any]:
    if not body:
        raise InvalidRequest("The request body is empty; send a JSON object.")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return data


def _require_str(data: dict[str, Any], name: str) -> str:
    if name not in data:
        raise InvalidRequest(f"Missing required parameter: '{name}'.", param=name)
    value = data[name]
    if not isinstance(value, str):
        raise InvalidRequest(
            f"Invalid type for '{name}': expected a string, got {_type_name(value)}.", param=name
        )
    return value


def _type_name(value: object) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "null"}.get(type(value), "a value")


def _parse_inputs(value: object, max_inputs: int) -> list[str]:
    if isinstance(value, str):
        inputs = [value]
    elif isinstance(value, list):
        if not value:
            raise InvalidRequest("'input' must not be an empty array.", param="input")
        if len(value) > max_inputs:
            raise PayloadTooLarge(
                f"'input' has {len(value)} items; at most {max_inputs} are allowed per request.",
                limit=max_inputs, actual=len(value),
            )
        for index, item in enumerate(value):
            if not isinstance(item, str):
                if isinstance(item, int | list) and not isinstance(item, bool):
                    raise InvalidRequest(
                        "Token-array input is not supported by this server; send strings.",
                        param="input",
                    )
                raise InvalidRequest(
                    f"Invalid type for 'input[{index}]': expected a string, "
                    f"got {_type_name(item)}.", param="input",
                )
        inputs = value
    else:
        raise InvalidRequest(
            f"Invalid type for 'input': expected a string or an array of strings, "
            f"got {_type_name(value)}.", param="input",
        )
    for index, text in enumerate(inputs):
        if not text:
            where = "'input'" if isinstance(value, str) else f"'input[{index}]'"
            raise InvalidRequest(f"{where} must not be an empty string.", param="input")
    return inputs


def parse_embedding_request(body: bytes, *, max_inputs: int) -> EmbeddingRequest:
    data = parse_json_object(body)
    model = _require_str(data, "model")
    if "input" not in data:
        raise InvalidRequest("Missing required parameter: 'input'.", param="input")
    inputs = _parse_inputs(data["input"], max_inputs)
    requested = data.get("encoding_format")
    if requested is None or requested == "float":
        encoding_format: EncodingFormat = "float"
    elif requested == "base64":
        encoding_format = "base64"
    else:
        raise InvalidRequest(
            f"Invalid value for 'encoding_format': {requested!r}; "
            "supported values are 'float' and 'base64'.", param="encoding_format",
        )
    dimensions = data.get("dimensions")
    if isinstance(dimensions, float) and dimensions.is_integer():
        dimensions = int(dimensions)  # JSON Schema's integers include 384.0
    if dimensions is not None and (
        isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1
    ):
        raise InvalidRequest("'dimensions' must be a positive integer.", param="dimensions")
    user = data.get("user")
    if user is not None and not isinstance(user, str):
        raise InvalidRequest("Invalid type for 'user': expected a string.", param="user")
    return EmbeddingRequest(model, inputs, encoding_format, dimensions)


def _b64(vector: npt.NDArray[np.float32]) -> str:
    return base64.b64encode(vector.astype("<f4", copy=False).tobytes()).decode("ascii")


def encode_embedding_response(
    *,
    model: str,
    vectors: Sequence[npt.NDArray[np.float32]],
    prompt_tokens: int,
    encoding_format: EncodingFormat,
) -> bytes:
    if encoding_format == "base64":
        data = [{"object": "embedding", "index": i, "embedding": _b64(v)}
                for i, v in enumerate(vectors)]
    else:
        data = [{"object": "embedding", "index": i, "embedding": v}
                for i, v in enumerate(vectors)]
    return orjson.dumps(
        {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        },
        option=orjson.OPT_SERIALIZE_NUMPY,
    )
