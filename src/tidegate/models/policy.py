"""Which loaded models to evict to make room. Pure: the manager decides under its lock with
this, then unloads outside it."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

__all__ = ["EntryView", "EvictionPlan", "hotter_than", "plan_eviction"]


@dataclass(frozen=True, slots=True)
class EntryView:
    """What the policy needs to know of one resident (loaded or loading) model."""

    id: str
    size: int
    last_used: float
    leases: int = 0
    keep_alive_s: float = 0.0
    depends_on: tuple[str, ...] = ()
    loading: bool = False


@dataclass(frozen=True, slots=True)
class EvictionPlan:
    fits: bool
    victims: list[str] = field(default_factory=list)
    """In eviction order (least recently used first; dependents before their dependencies)."""
    holders: list[str] = field(default_factory=list)
    """When it does not fit: the resident models and why each cannot go, for the error."""


def _evictable(entry: EntryView, now: float, dependents: dict[str, int],
               protect: Collection[str]) -> bool:
    if entry.loading or entry.leases or entry.id in protect or dependents.get(entry.id, 0):
        return False
    if entry.keep_alive_s < 0:
        return False
    return now - entry.last_used >= entry.keep_alive_s


def _why_not(entry: EntryView, now: float, dependents: dict[str, int],
             protect: Collection[str]) -> str:
    if entry.loading:
        return "loading"
    if entry.leases:
        return f"{entry.leases} request(s) in flight"
    if entry.id in protect:
        return "needed by this load"
    if dependents.get(entry.id, 0):
        return "a loaded model depends on it"
    if entry.keep_alive_s < 0:
        return "keep_alive -1"
    return f"kept alive for {entry.keep_alive_s - (now - entry.last_used):.0f}s more"


def plan_eviction(
    resident: Sequence[EntryView],
    *,
    need_bytes: int,
    max_bytes: int | None,
    max_models: int | None,
    now: float,
    protect: Collection[str] = (),
) -> EvictionPlan:
    """Evict least-recently-used models until ``need_bytes`` and one more model slot fit.

    Never evicts a leased (in-use) model, one still loading, one inside its keep-alive, one in
    ``protect``, or a dependency of a resident model (its dependents go first). If the room
    cannot be made, nothing is evicted and ``holders`` explains what holds it.
    """
    budget = math.inf if max_bytes is None else max_bytes
    slots = math.inf if max_models is None else max_models
    used = sum(e.size for e in resident)
    count = len(resident)
    if used + need_bytes <= budget and count + 1 <= slots:
        return EvictionPlan(fits=True)
    dependents: dict[str, int] = {}
    for entry in resident:
        for dep in entry.depends_on:
            dependents[dep] = dependents.get(dep, 0) + 1
    remaining = sorted(resident, key=lambda e: e.last_used)
    victims: list[str] = []
    while used + need_bytes > budget or count + 1 > slots:
        victim = next((e for e in remaining if _evictable(e, now, dependents, protect)), None)
        if victim is None:
            holders = [f"{e.id} ({e.size} bytes: {_why_not(e, now, dependents, protect)})"
                       for e in remaining]
            return EvictionPlan(fits=False, holders=holders)
        remaining.remove(victim)
        victims.append(victim.id)
        used -= victim.size
        count -= 1
        for dep in victim.depends_on:
            dependents[dep] -= 1
    return EvictionPlan(fits=True, victims=victims)


def hotter_than(
    resident: Sequence[EntryView], probability: Callable[[str], float], threshold: float
) -> set[str]:
    """The resident models at least as likely to be used next as a preload candidate of
    probability ``threshold``: a predictive preload may not evict these."""
    return {e.id for e in resident if probability(e.id) >= threshold}
