"""What the engine asks of a step worker and what a step gives back: plain data, with no engine
imported (no torch), so a worker in another process (an OpenVINO GenAI pipeline's) can read it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tidegate.generation.params import SamplingParams, TokenLogprob

if TYPE_CHECKING:
    import torch

__all__ = ["PrefillRequest", "StepOutcome", "StepPlan"]


@dataclass(frozen=True, slots=True)
class PrefillRequest:
    seq_id: int
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    generator: torch.Generator
    max_new: int = 0
    """Tokens the sequence may generate (engines that stop sequences themselves need it)."""


@dataclass(frozen=True, slots=True)
class StepPlan:
    drop: tuple[int, ...]
    """Sequences that finished or were cancelled since the last step: their rows go first."""
    prefill: tuple[PrefillRequest, ...]


@dataclass(frozen=True, slots=True)
class StepOutcome:
    decoded: tuple[int, ...]
    """The sequences of the decode batch, in row order."""
    tokens: dict[int, int]
    """Each sequence's new token: decoded ones and newly prefilled ones."""
    failed: dict[int, str]
    """Newcomers whose prefill raised, with the error: they did not join the batch."""
    logprobs: dict[int, TokenLogprob] = field(default_factory=dict)
    """The new token's logprobs, for each sequence of ``tokens`` whose params ask for them."""
