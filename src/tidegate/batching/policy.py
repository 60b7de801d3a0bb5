"""When to dispatch a batch, and how many queued inputs it takes. Pure: no I/O, no awaits.

The batcher calls :func:`decide` whenever something changed (an input arrived, a batch finished,
a wait ran out) and does what the returned :class:`Decision` says. Rules, in order:

1. Nothing queued, or ``max_concurrent_batches`` batches already computing: wait.
2. The head of the queue fills a batch by count (``full``) or by tokens (``tokens``): dispatch.
3. No batch is computing (``idle``): dispatch what is queued at once, so a lone request at low
   load never sits out the wait.
4. The oldest queued input has waited ``max_wait`` (``timeout``): dispatch.
5. Otherwise wait until rule 4 would fire, or until something changes.

:func:`batch_ends_s` predicts when a queued batch would be done, for ``max_queue_wait_ms``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["Decision", "DispatchReason", "batch_ends_s", "decide", "fill_batch"]


class DispatchReason(enum.StrEnum):
    FULL = "full"
    TOKENS = "tokens"
    TIMEOUT = "timeout"
    IDLE = "idle"


@dataclass(frozen=True, slots=True)
class Decision:
    """``reason`` is None to wait; then ``wake_after_s`` (None: until the next event)."""

    reason: DispatchReason | None
    count: int = 0
    wake_after_s: float | None = None


_WAIT = Decision(None)


def fill_batch(token_counts: Iterable[int], max_items: int, max_tokens: int) -> tuple[int, bool]:
    """How many head inputs fit in one batch, and whether the token budget is what stopped it.

    The first input always fits, even above ``max_tokens``: inputs are truncated to the model's
    limit, so a lone long one must still be served.
    """
    count = 0
    total = 0
    for tokens in token_counts:
        if count >= max_items:
            break
        if count and total + tokens > max_tokens:
            return count, True
        total += tokens
        count += 1
    return count, total >= max_tokens


def decide(
    *,
    now: float,
    oldest_enqueued_at: float | None,
    head_tokens: Iterable[int],
    inflight: int,
    max_inflight: int,
    batch_size: int,
    max_batch_tokens: int,
    max_wait_s: float,
) -> Decision:
    """Apply the rules above. ``head_tokens`` lists queued inputs' token counts, oldest first."""
    if oldest_enqueued_at is None or inflight >= max_inflight:
        return _WAIT
    count, token_bound = fill_batch(head_tokens, batch_size, max_batch_tokens)
    if count == 0:
        return _WAIT
    if count >= batch_size:
        return Decision(DispatchReason.FULL, count)
    if token_bound:
        return Decision(DispatchReason.TOKENS, count)
    if inflight == 0:
        return Decision(DispatchReason.IDLE, count)
    waited = now - oldest_enqueued_at
    if waited >= max_wait_s:
        return Decision(DispatchReason.TIMEOUT, count)
    return Decision(None, wake_after_s=max_wait_s - waited)


def batch_ends_s(
    *,
    batch: int,
    items: int,
    batch_size: int,
    max_inflight: int,
    fixed_s: float,
    item_s: float,
    inflight: Sequence[tuple[int, float]],
) -> float:
    """Seconds until the ``batch``-th batch to be dispatched from the queue (0: the next one),
    holding ``items`` inputs, would have its results.

    A batch of ``n`` inputs takes ``fixed_s + n * item_s``; the batches ahead of it are full
    (``batch_size``). Each starts on the first of ``max_inflight`` slots to come free; a batch
    computing now, ``inflight`` as (inputs, seconds it has run), frees its slot after what it
    has left. So an input behind a batch that has just started waits for all of it, and for
    whole batches ahead, where inputs over a rate would count a fraction of each.
    """
    slots = max(1, max_inflight)
    frees = sorted(max(0.0, fixed_s + n * item_s - ran) for n, ran in inflight)[:slots]
    frees = [0.0] * (slots - len(frees)) + frees  # an idle slot is free now
    full_s = fixed_s + max(1, batch_size) * item_s
    # the j-th batch starts on slot j % slots, after j // slots full rounds
    return frees[batch % slots] + (batch // slots) * full_s + fixed_s + items * item_s
