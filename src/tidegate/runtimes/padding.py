"""Split a batch of token sequences into padded sub-batches of similar lengths.

An encoder's cost grows with the padded tokens it sees (batch size x the longest sequence):
a batch of short queries and ~200-token passages padded together costs the passages' length for
every query. :func:`plan_groups` sorts the sequences by length and cuts the sorted run where
the padding saved outweighs the fixed cost of one more forward call, choosing the cuts by dynamic
programming over the distinct lengths. Pure arithmetic: no model, no clock.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["CALL_OVERHEAD_TOKENS", "plan_groups"]

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
