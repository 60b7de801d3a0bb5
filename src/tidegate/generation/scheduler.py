"""Which waiting sequences join the running batch at the next step. Pure: no I/O, no awaits.

The engine asks :func:`admit` before every model step. Rules:

1. First come, first served: sequences are admitted in arrival order and none is skipped, so a
   long prompt cannot be starved by a stream of short ones behind it.
2. At most ``max_num_seqs`` sequences run at once (decoding or being prefilled).
3. The prompts prefilled in one step hold at most ``max_prefill_tokens`` tokens together, so a
   burst of arrivals does not stall the running sequences' next token for long. A prompt larger
   than the whole budget is admitted alone, as the first of its step: it must be served somehow.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["Admission", "admit", "expected_steps", "retry_after_s"]


@dataclass(frozen=True, slots=True)
class Admission:
    """Admit the first ``count`` waiting sequences, ``prefill_tokens`` prompt tokens in all."""

    count: int
    prefill_tokens: int
    budget_bound: bool
    """True when the token budget (not the free slots) is what stopped admission."""


def admit(
    *,
    waiting_prompt_tokens: Iterable[int],
    running: int,
    max_num_seqs: int,
    max_prefill_tokens: int,
) -> Admission:
    """Apply the rules above. ``waiting_prompt_tokens`` lists prompt lengths, oldest first."""
    free = max_num_seqs - running
    count = 0
    tokens = 0
    for prompt_tokens in waiting_prompt_tokens:
        if count >= free:
            break
        if count and tokens + prompt_tokens > max_prefill_tokens:
            return Admission(count, tokens, budget_bound=True)
        count += 1
        tokens += prompt_tokens
    return Admission(count, tokens, budget_bound=False)


def expected_steps(
    *,
    waiting: int,
    running_left: Sequence[float],
    max_num_seqs: int,
    mean_completion_tokens: float,
    own_tokens: float,
) -> float:
    """Model steps until a sequence submitted now would end, generating ``own_tokens``.

    Each running sequence frees its slot after the steps it has left (``running_left``); a
    free slot is free now. The ``waiting`` sequences ahead take slots first, in order, each
    holding one for ``mean_completion_tokens`` steps (one token per step, its prefill giving
    the first); the new sequence takes the slot that frees after theirs.
    """
    slots = max(1, max_num_seqs)
    frees = [0.0] * (slots - len(running_left)) + sorted(running_left)[:slots]
    # the j-th waiting sequence takes slot j % slots, after j // slots rounds of others
    start = frees[waiting % slots] + (waiting // slots) * max(1.0, mean_completion_tokens)
    return start + max(1.0, own_tokens)


def retry_after_s(*, waiting: int, mean_completion_tokens: float, tokens_per_s: float) -> int:
    """Seconds until a refused request would likely be admitted: the queue's expected work over
    the observed generation rate. At least 1; 1 before anything was measured."""
    if tokens_per_s <= 0 or mean_completion_tokens <= 0:
        return 1
    return max(1, math.ceil(waiting * mean_completion_tokens / tokens_per_s))
