"""Replay request traces against the model cache's eviction policies and predictor.

``python -m bench.trace_replay`` (part of ``make bench``). N equal-sized models, room for K.
Two traces: a Zipf-distributed one and a patterned one (recurring sequences such as
A -> B -> C). For each: the hit rate of plain LRU and of decayed LFU (tidegate's
``plan_eviction`` with ``cache.eviction = "lru"`` / ``"lfu"``), of each plus predictive
preloading (tidegate's ``TransitionPredictor`` and ``hotter_than`` rule: a preload may only
evict models less likely to be next than itself), and of Belady's optimal offline policy for
reference. A preload "hits" when the preloaded model is requested before it is evicted;
"wasted" when it is evicted unused. Two sweeps over cache sizes and Zipf skews follow: LRU /
Belady and LFU / Belady.

Logical time is the request index, so LFU's half-life (``cache.frequency_half_life_s`` in the
server) is counted in requests here: ``HALF_LIFE`` = 600, the server's default value.

The same pure functions decide in the server (``tidegate.models``); only loading is instant
here, so this measures the policies, not load latency.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from dataclasses import dataclass

from tidegate.models.policy import (
    LRU,
    EntryView,
    EvictionPolicy,
    decayed,
    hotter_than,
    plan_eviction,
)
from tidegate.models.predictor import TransitionPredictor

__all__ = ["ReplayResult", "belady", "patterned_trace", "replay", "zipf_trace"]

THRESHOLD = 0.3  # tidegate's default cache.predictive_threshold
HALF_LIFE = 600.0  # requests; the value of tidegate's default cache.frequency_half_life_s
LFU = EvictionPolicy(mode="lfu", half_life=HALF_LIFE)


@dataclass(frozen=True, slots=True)
class ReplayResult:
    requests: int
    hits: int
    preloads: int = 0
    preload_hits: int = 0
    preload_wasted: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests

    @property
    def preload_hit_rate(self) -> float | None:
        settled = self.preload_hits + self.preload_wasted
        return self.preload_hits / settled if settled else None


def zipf_trace(models: int, length: int, *, s: float = 1.0, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    weights = [1 / (rank + 1) ** s for rank in range(models)]
    names = [f"m{i}" for i in range(models)]
    return rng.choices(names, weights=weights, k=length)


def patterned_trace(models: int, length: int, *, seed: int = 2) -> list[str]:
    """Recurring sequences of 3-4 distinct models (workflows), picked at random."""
    rng = random.Random(seed)
    names = [f"m{i}" for i in range(models)]
    rng.shuffle(names)
    sequences = []
    while names:
        size = min(len(names), rng.choice((3, 4)))
        sequences.append(names[:size])
        names = names[size:]
    trace: list[str] = []
    while len(trace) < length:
        trace.extend(rng.choice(sequences))
    return trace[:length]


def replay(trace: Sequence[str], capacity: int, *, predictive: bool,
           policy: EvictionPolicy = LRU) -> ReplayResult:
    resident: dict[str, float] = {}  # model -> last use (logical time)
    # model -> (decayed request count, as of when); kept after eviction, as the server does
    frequency: dict[str, tuple[float, float]] = {}
    preloaded: set[str] = set()
    predictor = TransitionPredictor()
    hits = preloads = preload_hits = wasted = 0

    def view(model: str, last_used: float) -> EntryView:
        count, at = frequency.get(model, (0.0, 0.0))
        return EntryView(id=model, size=1, last_used=last_used, frequency=count, frequency_at=at)

    def views() -> list[EntryView]:
        return [view(m, t) for m, t in resident.items()]

    def evict(victims: list[str]) -> None:
        nonlocal wasted
        for victim in victims:
            del resident[victim]
            if victim in preloaded:
                preloaded.discard(victim)
                wasted += 1

    for now, model in enumerate(trace):
        if model in resident:
            hits += 1
            if model in preloaded:
                preloaded.discard(model)
                preload_hits += 1
        else:
            plan = plan_eviction(views(), need_bytes=1, max_bytes=None, max_models=capacity,
                                 now=now, policy=policy)
            evict(plan.victims)
        resident[model] = now
        count, at = frequency.get(model, (0.0, 0.0))
        frequency[model] = (decayed(count, at, now, policy.half_life) + 1, now)
        predictor.observe(model)
        if not predictive:
            continue
        for candidate, probability in predictor.predict(k=1):
            if probability < THRESHOLD or candidate in resident:
                continue
            current = views()
            protect = hotter_than(current, predictor.probability, probability) | {model}
            plan = plan_eviction(current, need_bytes=1, max_bytes=None, max_models=capacity,
                                 now=now, protect=protect, policy=policy)
            if plan.fits:
                evict(plan.victims)
                resident[candidate] = now - 0.5  # loaded, not yet used
                preloaded.add(candidate)
                preloads += 1
    return ReplayResult(len(trace), hits, preloads, preload_hits, wasted)


def belady(trace: Sequence[str], capacity: int) -> ReplayResult:
    """Optimal offline: evict the resident model used furthest in the future."""
    next_use: list[int] = [0] * len(trace)
    seen: dict[str, int] = {}
    for index in range(len(trace) - 1, -1, -1):
        next_use[index] = seen.get(trace[index], len(trace) + 1)
        seen[trace[index]] = index
    resident: dict[str, int] = {}  # model -> its next use
    hits = 0
    for index, model in enumerate(trace):
        if model in resident:
            hits += 1
        elif len(resident) >= capacity:
            victim = max(resident, key=resident.__getitem__)
            del resident[victim]
        resident[model] = next_use[index]
    return ReplayResult(len(trace), hits)


def run(models: int, capacity: int, length: int) -> dict[str, dict[str, ReplayResult]]:
    traces = {"zipf": zipf_trace(models, length), "patterned": patterned_trace(models, length)}
    return {
        name: {
            "lru": replay(trace, capacity, predictive=False),
            "lru+predictive": replay(trace, capacity, predictive=True),
            "lfu": replay(trace, capacity, predictive=False, policy=LFU),
            "lfu+predictive": replay(trace, capacity, predictive=True, policy=LFU),
            "belady": belady(trace, capacity),
        }
        for name, trace in traces.items()
    }


def render(results: dict[str, dict[str, ReplayResult]], models: int, capacity: int) -> str:
    lines = [f"N = {models} models, room for K = {capacity}",
             f"lfu: request counts decayed with a half-life of {HALF_LIFE:g} requests",
             "", "| trace | policy | hit rate | preloads | preload hit rate |",
             "| --- | --- | --- | --- | --- |"]
    for trace, by_policy in results.items():
        for policy, result in by_policy.items():
            rate = result.preload_hit_rate
            lines.append(f"| {trace} | {policy} | {result.hit_rate:.3f} | {result.preloads} | "
                         f"{'-' if rate is None else f'{rate:.3f}'} |")
    zipf = results["zipf"]
    pattern = results["patterned"]["lru+predictive"].preload_hit_rate or 0.0
    ratio = zipf["lru"].hit_rate / zipf["belady"].hit_rate
    lfu_ratio = zipf["lfu"].hit_rate / zipf["belady"].hit_rate
    lines += ["",
              f"- {'PASS' if pattern >= 0.9 else 'MISS'}: predictive preload hit rate on the "
              f"patterned trace {pattern:.3f} (target >= 0.90)",
              f"- {'PASS' if ratio >= 0.9 else 'MISS'}: LRU / Belady hit rate on the Zipf trace "
              f"{ratio:.3f} (target >= 0.90)",
              f"- {'PASS' if lfu_ratio >= 0.9 else 'MISS'}: LFU / Belady hit rate on the Zipf "
              f"trace {lfu_ratio:.3f} (target >= 0.90)"]
    return "\n".join(lines)


def sweep(models: int, length: int, policy: EvictionPolicy = LRU) -> str:
    """``policy`` / Belady on Zipf traces across cache sizes and skews: where the 90% target
    holds."""
    capacities = (4, 6, 8, 10, 12)
    lines = ["| Zipf s | " + " | ".join(f"K={k}" for k in capacities) + " |",
             "| --- |" + " --- |" * len(capacities)]
    for s in (0.8, 1.0, 1.2):
        trace = zipf_trace(models, length, s=s)
        cells = []
        for k in capacities:
            ours, best = replay(trace, k, predictive=False, policy=policy), belady(trace, k)
            cells.append(f"{ours.hit_rate:.2f} / {best.hit_rate:.2f} = "
                         f"{ours.hit_rate / best.hit_rate:.2f}")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(models: int = 16, capacity: int = 6, length: int = 20_000) -> str:
    return (render(run(models, capacity, length), models, capacity)
            + f"\n\nLRU / Belady hit rate on Zipf traces, N = {models}:\n\n"
            + sweep(models, length)
            + f"\n\nLFU (half-life {HALF_LIFE:g} requests) / Belady hit rate on Zipf traces, "
            f"N = {models}:\n\n"
            + sweep(models, length, LFU))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.trace_replay", description=__doc__)
    parser.add_argument("--models", type=int, default=16)
    parser.add_argument("--capacity", type=int, default=6)
    parser.add_argument("--length", type=int, default=20_000)
    args = parser.parse_args(argv)
    print(report(args.models, args.capacity, args.length))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
