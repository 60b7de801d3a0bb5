"""Per-request sampling parameters, validated where they are made.

Every bad value raises :class:`~tidegate.errors.InvalidRequest` naming the OpenAI parameter, so
the API layer can build a ``SamplingParams`` straight from the request body and map the error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from tidegate.errors import InvalidRequest

__all__ = [
    "GREEDY_BELOW",
    "MAX_LOGPROBS",
    "MAX_STOP_STRINGS",
    "MIN_TOP_P",
    "PENALTY_RANGE",
    "SEED_RANGE",
    "FinishReason",
    "SamplingParams",
    "TokenLogprob",
]

FinishReason = Literal["stop", "length", "abort"]
"""``stop``: end-of-sequence token or a stop string; ``length``: ``max_tokens`` or the context
ran out; ``abort``: cancelled by the client, or dropped because its reader fell behind."""

MAX_STOP_STRINGS = 16
GREEDY_BELOW = 1e-5
"""Temperatures below this decode greedily."""
MIN_TOP_P = 1e-6
"""Smaller ``top_p`` values act as this one: only the most likely token is kept."""
SEED_RANGE = (-(2**63), 2**64 - 1)
"""The seeds a ``torch.Generator`` takes."""
MAX_LOGPROBS = 20
"""Most alternatives reported per token (OpenAI's ``top_logprobs`` limit)."""
PENALTY_RANGE = (-2.0, 2.0)


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One generated token's log-probability under the model's raw distribution (before
    temperature, penalties and masks), and the ``k`` most likely tokens with theirs, most
    likely first."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    """``(token id, logprob)`` pairs; empty when no alternatives were asked for."""


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"'{name}' must be a number, got {value!r}", param=name)
    return float(value)


def _integer(name: str, value: object) -> int:
    """An integer, also when JSON spells it ``16.0`` (JSON Schema's integers include those)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"'{name}' must be an integer, got {value!r}", param=name)
    return value


@dataclass(frozen=True, kw_only=True, slots=True)
class SamplingParams:
    """How one sequence is generated.

    ``stop`` may be given as one string or a sequence of strings; it is kept as a tuple.
    ``seed`` makes sampling reproducible: the same seed, prompt and parameters give the same
    tokens, whatever else is in the batch.
    """

    max_tokens: int | None = None
    """Most tokens to generate; ``None`` means until the model's context is full."""
    temperature: float = 1.0
    """0 is greedy decoding; above 0 samples from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling: sample among the most likely tokens holding this much probability."""
    stop: tuple[str, ...] = ()
    """Generation ends when the text contains one of these; the stop string is not returned."""
    seed: int | None = None
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token already generated (OpenAI's)."""
    frequency_penalty: float = 0.0
    """Subtracted from each token's logit once per time it was generated (OpenAI's)."""
    min_tokens: int = 0
    """End-of-sequence tokens cannot be chosen before this many tokens were generated (they are
    masked); stop strings still end the sequence."""
    ignore_eos: bool = False
    """End-of-sequence tokens neither end the sequence nor are masked (``min_tokens``
    included): generation runs to ``max_tokens``, a stop string or the context."""
    logprobs: int | None = None
    """``None``: none reported. ``k``: each token's logprob and the ``k`` most likely ones."""

    def __post_init__(self) -> None:
        if self.max_tokens is not None:
            max_tokens = _integer("max_tokens", self.max_tokens)
            if max_tokens < 1:
                raise InvalidRequest(f"'max_tokens' must be >= 1, got {max_tokens}",
                                     param="max_tokens")
            object.__setattr__(self, "max_tokens", max_tokens)
        temperature = _number("temperature", self.temperature)
        if not 0.0 <= temperature <= 2.0:
            raise InvalidRequest(
                f"'temperature' must be between 0 and 2, got {temperature:g}", param="temperature"
            )
        top_p = _number("top_p", self.top_p)
        if not 0.0 < top_p <= 1.0:
            raise InvalidRequest(
                f"'top_p' must be greater than 0 and at most 1, got {top_p:g}", param="top_p"
            )
        # Both engines compute in float32, where 5e-324 is 0: a top_p that small keeps only
        # the most likely token, which MIN_TOP_P does too.
        object.__setattr__(self, "top_p", max(top_p, MIN_TOP_P))
        object.__setattr__(self, "stop", _stop_tuple(self.stop))
        if self.seed is not None:
            seed = _integer("seed", self.seed)
            if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
                raise InvalidRequest(f"'seed' must be between {SEED_RANGE[0]} and "
                                     f"{SEED_RANGE[1]}, got {seed}", param="seed")
            object.__setattr__(self, "seed", seed)
        for name in ("presence_penalty", "frequency_penalty"):
            penalty = _number(name, getattr(self, name))
            if not PENALTY_RANGE[0] <= penalty <= PENALTY_RANGE[1]:
                raise InvalidRequest(f"'{name}' must be between -2 and 2, got {penalty:g}",
                                     param=name)
            object.__setattr__(self, name, penalty)
        self._check_counts()

    def _check_counts(self) -> None:
        min_tokens = _integer("min_tokens", self.min_tokens)
        if min_tokens < 0:
            raise InvalidRequest(f"'min_tokens' must be >= 0, got {min_tokens}",
                                 param="min_tokens")
        if self.max_tokens is not None and min_tokens > self.max_tokens:
            raise InvalidRequest(f"'min_tokens' ({min_tokens}) must be at most 'max_tokens' "
                                 f"({self.max_tokens})", param="min_tokens")
        object.__setattr__(self, "min_tokens", min_tokens)
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequest(f"'ignore_eos' must be a boolean, got {self.ignore_eos!r}",
                                 param="ignore_eos")
        if self.logprobs is not None:
            logprobs = _integer("logprobs", self.logprobs)
            if not 0 <= logprobs <= MAX_LOGPROBS:
                raise InvalidRequest(f"'logprobs' must be between 0 and {MAX_LOGPROBS}, got "
                                     f"{logprobs}", param="logprobs")
            object.__setattr__(self, "logprobs", logprobs)

    @property
    def greedy(self) -> bool:
        """Temperature 0, or so close to it (below :data:`GREEDY_BELOW`) that sampling would
        pick the most likely token anyway: dividing logits by it would overflow."""
        return self.temperature < GREEDY_BELOW

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def changes_logits(self) -> bool:
        """Penalties or masked end-of-sequence tokens: logits are adjusted before choosing."""
        return (self.min_tokens > 0 and not self.ignore_eos) or self.penalized


def _stop_tuple(stop: object) -> tuple[str, ...]:
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, Sequence):
        raise InvalidRequest(
            f"'stop' must be a string or a list of strings, got {type(stop).__name__}",
            param="stop",
        )
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidRequest(
            f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(stop)}", param="stop"
        )
    for item in stop:
        if not isinstance(item, str) or not item:
            raise InvalidRequest(f"'stop' strings must be non-empty, got {item!r}", param="stop")
    return tuple(stop)
