"""Length-aware sub-batches: the pure plan, and the runtime's vectors unchanged by it."""

from __future__ import annotations

import itertools
import random
from typing import Any

import numpy as np
import pytest

from tidegate.runtimes.padding import plan_groups


def padded_cost(lengths: list[int], groups: list[list[int]], overhead: int) -> int:
    return sum(len(g) * max(lengths[i] for i in g) + overhead for g in groups)


def brute_force_best(lengths: list[int], overhead: int) -> int:
    ordered = sorted(lengths)
    best = None
    for cuts in range(len(ordered)):
        for points in itertools.combinations(range(1, len(ordered)), cuts):
            bounds = (0, *points, len(ordered))
            cost = sum((b - a) * ordered[b - 1] + overhead for a, b in itertools.pairwise(bounds))
            best = cost if best is None else min(best, cost)
    assert best is not None
    return best


@pytest.mark.parametrize("seed", range(30))
def test_plan_is_optimal_and_covers_every_index_once(seed: int) -> None:
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(5, 20), rng.randint(100, 256)]) for _ in range(9)]
    overhead = rng.choice([0, 16, 64, 1000])
    groups = plan_groups(lengths, overhead)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert padded_cost(lengths, groups, overhead) == brute_force_best(lengths, overhead)


def test_similar_lengths_stay_one_call_and_mixed_ones_split() -> None:
    assert plan_groups([]) == [[]]
    assert plan_groups([7]) == [[0]]
    assert len(plan_groups([12, 14, 13, 15, 16] * 8)) == 1
    groups = plan_groups([12, 250] * 32)
    assert len(groups) == 2
    assert {len(g) for g in groups} == {32}


def test_split_batches_give_the_vectors_of_one_padded_batch(minilm: Any) -> None:
    texts = ["a short query", "passage " * 200, "x", "another query about tides",
             "long " * 180 + "end", "mid length sentence " * 10]
    payloads = [p.payload for p in minilm.prepare(texts)]
    assert len(plan_groups([len(p) for p in payloads])) > 1
    split = minilm.run_batch(payloads)
    alone = np.stack([minilm.run_batch([p])[0] for p in payloads])
    assert np.allclose(split, alone, atol=1e-5)
