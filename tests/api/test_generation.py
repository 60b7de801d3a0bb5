"""Parsing completion and chat bodies: each parameter has the type the OpenAPI document gives it
(null means the default); a value of another type is a 400 naming it, never read for its
truthiness. What only a local model refuses is checked apart (``check_local``): a remote model
gets the body as it was sent."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from tidegate.api.generation import parse_generation_request
from tidegate.api.generation_params import UNSUPPORTED_LOCALLY, check_local
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
    ({"n": 0}, "n"),
    ({"n": "2"}, "n"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"frequency_penalty": "x"}, "frequency_penalty"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 1.5}, "min_tokens"),
    ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
    ({"ignore_eos": 1}, "ignore_eos"),
    ({"logprobs": True}, "logprobs"),  # completions: an integer
    ({"logprobs": 6}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
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


def chat(**fields: Any) -> Any:
    return parse_generation_request(
        orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}),
        "chat")


@pytest.mark.parametrize(("fields", "param"), [
    ({"logprobs": 1}, "logprobs"),  # chat: a boolean
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": True}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
    ({"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
])
def test_chat_logprobs_are_checked(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        chat(**fields)
    assert caught.value.param == param


def test_new_parameters_reach_the_sampling_params() -> None:
    params = parse(presence_penalty=0.5, frequency_penalty=-1, min_tokens=3, ignore_eos=True,
                   logprobs=2).params
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -1.0)
    assert (params.min_tokens, params.ignore_eos, params.logprobs) == (3, True, 2)
    assert parse(logprobs=0).params.logprobs == 0
    assert chat(logprobs=True).params.logprobs == 0
    assert chat(logprobs=True, top_logprobs=20).params.logprobs == 20
    assert chat(logprobs=False).params.logprobs is None
    nulls = parse(presence_penalty=None, frequency_penalty=None, min_tokens=None,
                  ignore_eos=None, logprobs=None).params
    assert (nulls.presence_penalty, nulls.frequency_penalty, nulls.min_tokens,
            nulls.ignore_eos, nulls.logprobs) == (0.0, 0.0, 0, False, None)
    assert chat(logprobs=None, top_logprobs=None).params.logprobs is None


def local(request: Any, max_top_logprobs: int | None = None) -> None:
    check_local(request.body, request.endpoint, request.params, model="m",
                max_top_logprobs=max_top_logprobs)


@pytest.mark.parametrize(("fields", "param"), [
    ({"n": 2}, "n"),
    ({"best_of": 2}, "best_of"),
    ({"echo": True}, "echo"),
    ({"suffix": "end"}, "suffix"),
    ({"logit_bias": {"50256": -100}}, "logit_bias"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"function_call": {"name": "f"}}, "function_call"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"top_k": 5}, "top_k"),
    ({"repetition_penalty": 1.2}, "repetition_penalty"),
    ({"min_p": 0.1}, "min_p"),
    ({"guided_json": {}}, "guided_json"),
])
def test_local_models_refuse_what_they_would_ignore(fields: dict[str, Any], param: str) -> None:
    for request in (parse(**fields), chat(**fields)):  # parsing accepts them: remote relays
        with pytest.raises(InvalidRequest) as caught:
            local(request)
        assert caught.value.param == param
        assert param in str(caught.value)


def test_local_models_accept_values_that_change_nothing() -> None:
    neutral = {"n": 1, "best_of": 1, "echo": False, "suffix": "", "logit_bias": {},
               "tools": [], "tool_choice": "none", "functions": [], "function_call": "auto",
               "response_format": {"type": "text"}, "top_k": -1, "repetition_penalty": 1,
               "min_p": 0, "user": "u", "stream_options": None, "modalities": ["text"],
               "parallel_tool_calls": True}
    local(parse(**neutral))
    local(chat(**neutral))
    local(parse(**dict.fromkeys(UNSUPPORTED_LOCALLY)))  # null is the default


def test_a_runtime_limit_on_alternatives_is_a_400_naming_the_parameter() -> None:
    local(chat(logprobs=True, top_logprobs=0), max_top_logprobs=0)
    local(parse(logprobs=0), max_top_logprobs=0)
    with pytest.raises(InvalidRequest) as caught:
        local(chat(logprobs=True, top_logprobs=1), max_top_logprobs=0)
    assert caught.value.param == "top_logprobs"
    with pytest.raises(InvalidRequest) as caught:
        local(parse(logprobs=3), max_top_logprobs=2)
    assert caught.value.param == "logprobs"
    local(chat(logprobs=True, top_logprobs=20), max_top_logprobs=None)
