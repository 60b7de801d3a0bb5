"""The generation parameters of a completion or chat body: what every model gets checked for,
and what only a local model refuses.

:func:`sampling_params` checks OpenAI's types and ranges (``null`` is the default) for every
model; a remote model's body is then relayed to its upstream unchanged, so whatever its server
honours (``n``, ``logit_bias``, tools, ...) still works. :func:`check_local` refuses, with a 400
naming the parameter, what the local engine would otherwise silently ignore; a value that
changes nothing (``n: 1``, ``logit_bias: {}``, ``echo: false``) is accepted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, TypeVar

from tidegate.errors import InvalidRequest
from tidegate.generation.params import MAX_LOGPROBS, SamplingParams

__all__ = [
    "MAX_COMPLETION_LOGPROBS",
    "UNSUPPORTED_LOCALLY",
    "Endpoint",
    "check_local",
    "optional",
    "sampling_params",
]

T = TypeVar("T")
Endpoint = Literal["completion", "chat"]
_DEFAULT_MAX_TOKENS = {"completion": 16, "chat": 256}  # OpenAI's completions default is 16
MAX_COMPLETION_LOGPROBS = 5
"""The legacy completions endpoint's limit (OpenAI's)."""


def optional(data: dict[str, Any], name: str, kind: type[T], what: str,
             within: str | None = None) -> T | None:
    """``data[name]`` if it is of ``kind``; None if absent or null; else a 400 naming it."""
    value = data.get(name)
    if value is None or isinstance(value, kind):
        return value
    where = f"{within}.{name}" if within else name
    raise InvalidRequest(f"'{where}' must be {what}.", param=within or name)


def _count(data: dict[str, Any], name: str, low: int, high: int | None = None) -> int | None:
    """An integer parameter within [low, high], also when JSON spells it ``2.0``."""
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"'{name}' must be an integer, got {value!r}.", param=name)
    if value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f">= {low}"
        raise InvalidRequest(f"'{name}' must be {bounds}, got {value}.", param=name)
    return value


def _logprobs(data: dict[str, Any], endpoint: Endpoint) -> int | None:
    """How many alternatives per token to report; None for no logprobs at all."""
    if endpoint == "completion":  # legacy: an integer, the number of alternatives
        return _count(data, "logprobs", 0, MAX_COMPLETION_LOGPROBS)
    wanted = optional(data, "logprobs", bool, "a boolean")
    top = _count(data, "top_logprobs", 0, MAX_LOGPROBS)
    if top is not None and not wanted:
        raise InvalidRequest("'top_logprobs' needs 'logprobs': true.", param="top_logprobs")
    return (top or 0) if wanted else None


def _or(data: dict[str, Any], name: str, default: Any) -> Any:
    value = data.get(name)
    return default if value is None else value


def sampling_params(data: dict[str, Any], endpoint: Endpoint) -> SamplingParams:
    """The body's sampling parameters, checked (400 naming the first bad one)."""
    _count(data, "n", 1)  # any n >= 1 is relayed to a remote model; check_local wants 1
    max_tokens = data.get("max_completion_tokens")
    if max_tokens is None:  # absent or null: the older name, then the default
        max_tokens = data.get("max_tokens")
    stop = data.get("stop")
    return SamplingParams(
        max_tokens=_DEFAULT_MAX_TOKENS[endpoint] if max_tokens is None else max_tokens,
        temperature=_or(data, "temperature", 1.0),
        top_p=_or(data, "top_p", 1.0),
        stop=() if stop is None or stop == "" else stop,
        seed=data.get("seed"),
        presence_penalty=_or(data, "presence_penalty", 0.0),
        frequency_penalty=_or(data, "frequency_penalty", 0.0),
        min_tokens=_or(data, "min_tokens", 0),
        ignore_eos=_or(data, "ignore_eos", False),
        logprobs=_logprobs(data, endpoint),
    )


def _number_is(expected: float) -> Callable[[object], bool]:
    return lambda value: type(value) in (int, float) and value == expected


def _equals(expected: object) -> Callable[[object], bool]:
    return lambda value: type(value) is type(expected) and value == expected


def _never(value: object) -> bool:
    return False


UNSUPPORTED_LOCALLY: dict[str, tuple[Callable[[object], bool], str]] = {
    "n": (_number_is(1), "only n = 1"),
    "best_of": (_number_is(1), "only best_of = 1"),
    "echo": (_equals(False), "only false"),
    "suffix": (_equals(""), "only an empty suffix"),
    "logit_bias": (_equals({}), "only an empty object"),
    "tools": (_equals([]), "no tools"),
    "functions": (_equals([]), "no functions"),
    "tool_choice": (lambda value: value in ("none", "auto"), "only \"none\" or \"auto\""),
    "function_call": (lambda value: value in ("none", "auto"), "only \"none\" or \"auto\""),
    "response_format": (_equals({"type": "text"}), "only {\"type\": \"text\"}"),
    "top_k": (lambda value: type(value) is int and value in (-1, 0), "only -1 or 0 (off)"),
    "min_p": (_number_is(0), "only 0 (off)"),
    "repetition_penalty": (_number_is(1), "only 1 (off)"),
    "use_beam_search": (_equals(False), "only false"),
    "stop_token_ids": (_equals([]), "only an empty list"),
    "prompt_logprobs": (_never, "no value"),
    "guided_json": (_never, "no value"),
    "guided_regex": (_never, "no value"),
    "guided_choice": (_never, "no value"),
    "guided_grammar": (_never, "no value"),
    "structured_outputs": (_never, "no value"),
    "prediction": (_never, "no value"),
    "audio": (_never, "no value"),
    "modalities": (_equals(["text"]), "only [\"text\"]"),
}
"""Parameters the local engine does not honour: (accepts this value, what it accepts). ``null``
is always accepted; anything else is a 400 rather than an answer that silently ignores it."""


def check_local(data: dict[str, Any], endpoint: Endpoint, params: SamplingParams, *,
                model: str, max_top_logprobs: int | None) -> None:
    """Refuse what a local model cannot honour. ``max_top_logprobs``: the most alternatives per
    token its runtime reports (None: up to the API's own limit)."""
    for name, (accepts, allowed) in UNSUPPORTED_LOCALLY.items():
        value = data.get(name)
        if value is not None and not accepts(value):
            raise InvalidRequest(
                f"'{name}' is not supported by local model '{model}' ({allowed}); its value "
                f"{value!r:.60} would be ignored.", param=name,
            )
    if (max_top_logprobs is not None and params.logprobs is not None
            and params.logprobs > max_top_logprobs):
        name = "top_logprobs" if endpoint == "chat" else "logprobs"
        raise InvalidRequest(
            f"Model '{model}' reports at most {max_top_logprobs} alternatives per token; "
            f"'{name}' was {params.logprobs}.", param=name,
        )
