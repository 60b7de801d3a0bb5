from __future__ import annotations

from typing import Any

import pytest

from tidegate.errors import InvalidRequest
from tidegate.generation import SamplingParams


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.01}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"stop": [""]}, "stop"),
        ({"stop": [3]}, "stop"),
        ({"stop": 3}, "stop"),
        ({"stop": ["x"] * 17}, "stop"),
        ({"seed": 1.5}, "seed"),
        # torch.Generator takes no seed outside [-2**63, 2**64): that was a 500.
        ({"seed": 2**64}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"presence_penalty": 2.01}, "presence_penalty"),
        ({"presence_penalty": None}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"frequency_penalty": True}, "frequency_penalty"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 0.5}, "min_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
        ({"ignore_eos": 1}, "ignore_eos"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": True}, "logprobs"),
    ],
)
def test_invalid_values_name_the_parameter(kwargs: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param
    assert param in str(info.value)


def test_valid_edges_and_normalization() -> None:
    # JSON bodies send `stop` as a string or a list: both are kept as a tuple.
    params = SamplingParams(max_tokens=1, temperature=0, top_p=1, stop="###",  # type: ignore[arg-type]
                            seed=0)
    assert params.stop == ("###",)
    assert params.greedy
    assert not SamplingParams(temperature=2).greedy
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")  # type: ignore[arg-type]
    assert SamplingParams().max_tokens is None


def test_integers_spelled_as_floats_are_integers() -> None:
    """JSON Schema's integers (hence the OpenAPI document's) include ``16.0``."""
    params = SamplingParams(max_tokens=16.0, seed=7.0)  # type: ignore[arg-type]
    assert params.max_tokens == 16 and isinstance(params.max_tokens, int)
    assert params.seed == 7 and isinstance(params.seed, int)
    assert SamplingParams(seed=2**64 - 1).seed == 2**64 - 1


def test_new_fields_edges() -> None:
    params = SamplingParams(presence_penalty=-2, frequency_penalty=2, min_tokens=4.0,  # type: ignore[arg-type]
                            max_tokens=4, ignore_eos=True, logprobs=20)
    assert params.presence_penalty == -2.0 and isinstance(params.presence_penalty, float)
    assert params.min_tokens == 4 and isinstance(params.min_tokens, int)
    assert params.penalized and params.changes_logits
    assert SamplingParams(logprobs=0).logprobs == 0
    plain = SamplingParams()
    assert not plain.penalized and not plain.changes_logits and plain.logprobs is None
    assert SamplingParams(min_tokens=1).changes_logits
    assert not SamplingParams(min_tokens=1, ignore_eos=True).changes_logits  # nothing masked
    assert not SamplingParams(min_tokens=1).penalized
