"""Split a batch of token sequences into padded sub-batches of similar lengths.

An encoder's cost grows with the padded tokens it sees (batch size x the longest sequence):
a batch of short queries and ~200-token passages padded together costs the passages' length for
every query. :func:`plan_groups` sorts the sequences by length and cuts the sorted run where
the padding saved outweighs the fixed cost of one more forward call, choosing the cuts by dynamic
programming over the distinct lengths; :func:`run_in_groups` runs a batch that way and puts the
rows back in order, :func:`pad_batch` builds one sub-batch's arrays. Pure arithmetic: no model,
no clock.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

__all__ = ["CALL_OVERHEAD_TOKENS", "pad_batch", "plan_groups", "run_in_groups"]

IntArray = npt.NDArray[np.int64]
Rows = npt.NDArray[np.float32]

CALL_OVERHEAD_TOKENS = 64
"""The fixed cost of one forward call, in padded tokens (one call's setup and thread hand-offs
cost about what a few dozen tokens of compute do for MiniLM-sized encoders on a CPU)."""


def plan_groups(
    lengths: Sequence[int], overhead_tokens: int = CALL_OVERHEAD_TOKENS
) -> list[list[int]]:
    """Indices of ``lengths`` grouped into sub-batches, each sorted by length, minimising
    ``sum(len(group) * longest(group)) + overhead_tokens * number of groups``."""
    count = len(lengths)
    if count <= 1:
        return [list(range(count))]
    order = sorted(range(count), key=lengths.__getitem__)
    ordered = np.fromiter((lengths[i] for i in order), dtype=np.int64, count=count)
    # Cut only between distinct lengths: ends[k] is one past the last sequence of length k.
    ends = np.flatnonzero(np.diff(ordered)) + 1
    ends = np.append(ends, count)
    if len(ends) == 1:
        return [order]
    starts = np.concatenate(([0], ends))  # possible group starts, in sequence positions
    best = np.zeros(len(ends) + 1, dtype=np.float64)  # best[j]: cost of the first ends[j-1]
    cut = np.zeros(len(ends) + 1, dtype=np.int64)
    for j, end in enumerate(ends, start=1):
        longest = ordered[end - 1]
        costs = best[:j] + (end - starts[:j]) * longest + overhead_tokens
        cut[j] = int(np.argmin(costs))
        best[j] = costs[cut[j]]
    groups: list[list[int]] = []
    j = len(ends)
    while j > 0:
        i = int(cut[j])
        groups.append(order[starts[i] : ends[j - 1]])
        j = i
    groups.reverse()
    return groups


def run_in_groups(lengths: Sequence[int], run: Callable[[Sequence[int]], Rows]) -> Rows:
    """``run`` each group of :func:`plan_groups` (it gets the items' indices and returns their
    rows), the rows back in the items' order. A batch of similar lengths stays one call."""
    groups = plan_groups(lengths)
    if len(groups) == 1:
        return run(range(len(lengths)))
    first = run(groups[0])
    rows = np.empty((len(lengths), first.shape[1]), dtype=np.float32)
    rows[groups[0]] = first
    for group in groups[1:]:
        rows[group] = run(group)
    return rows


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_id: int,
    type_ids: Sequence[Sequence[int]] | None = None,
) -> tuple[IntArray, ...]:
    """Token ids and attention mask (and token types, when given) padded to the longest."""
    longest = max(len(ids) for ids in sequences)
    input_ids = np.full((len(sequences), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), longest), dtype=np.int64)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = ids
        mask[row, : len(ids)] = 1
    if type_ids is None:
        return input_ids, mask
    types = np.zeros((len(sequences), longest), dtype=np.int64)
    for row, ids in enumerate(type_ids):
        types[row, : len(ids)] = ids
    return input_ids, mask, types
