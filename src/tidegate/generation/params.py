"""Per-request sampling parameters, validated where they are made.

Every bad value raises :class:`~tidegate.errors.InvalidRequest` naming the OpenAI parameter, so
the API layer can build a ``SamplingParams`` straight from the request body and map the error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from tidegate.errors import InvalidRequest

__all__ = ["MAX_STOP_STRINGS", "FinishReason", "SamplingParams"]

FinishReason = Literal["stop", "length", "abort"]
"""``stop``: end-of-sequence token or a stop string; ``length``: ``max_tokens`` or the context
ran out; ``abort``: cancelled by the client, or dropped because its reader fell behind."""

MAX_STOP_STRINGS = 16


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"'{name}' must be a number, got {value!r}", param=name)
    return float(value)


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

    def __post_init__(self) -> None:
        if self.max_tokens is not None:
            if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
                raise InvalidRequest(
                    f"'max_tokens' must be an integer, got {self.max_tokens!r}", param="max_tokens"
                )
            if self.max_tokens < 1:
                raise InvalidRequest(
                    f"'max_tokens' must be >= 1, got {self.max_tokens}", param="max_tokens"
                )
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
        object.__setattr__(self, "stop", _stop_tuple(self.stop))
        seed = self.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise InvalidRequest(f"'seed' must be an integer, got {self.seed!r}", param="seed")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


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
