"""Which loaded models to evict to make room. Pure: the cache decides with this synchronously,
on the event loop, then unloads the victims after the decision."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from tidegate.config import EvictionMode

__all__ = [
    "LRU",
    "EntryView",
    "EvictionPlan",
    "EvictionPolicy",
    "decayed",
    "hotter_than",
    "plan_eviction",
]


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
    frequency: float = 0.0
    """Decayed request count as of ``frequency_at`` (see :func:`decayed`)."""
    frequency_at: float = 0.0


def decayed(count: float, at: float, now: float, half_life: float) -> float:
    """``count``, recorded at time ``at``, decayed to ``now``: it halves every ``half_life``.

    A model's request frequency is ``decayed(frequency, frequency_at, now, half_life) + 1`` after
    each request; the same function ranks models for ``lfu`` eviction.
    """
    return count * math.exp2(-(now - at) / half_life)


@dataclass(frozen=True, slots=True)
class EvictionPolicy:
    """How victims are ordered: ``lru`` by last use; ``lfu`` by request count decayed with
    ``half_life`` (in the clock's units), ties broken by last use."""

    mode: EvictionMode = "lru"
    half_life: float = 600.0

    def __post_init__(self) -> None:
        if not self.half_life > 0:
            raise ValueError(f"half_life must be > 0, got {self.half_life!r}")

    def order(self, resident: Sequence[EntryView], now: float) -> list[EntryView]:
        """``resident``, the first to evict first."""
        if self.mode == "lru":
            return sorted(resident, key=lambda e: e.last_used)
        return sorted(resident, key=lambda e: (
            decayed(e.frequency, e.frequency_at, now, self.half_life), e.last_used))


LRU = EvictionPolicy()


@dataclass(frozen=True, slots=True)
class EvictionPlan:
    fits: bool
    victims: list[str] = field(default_factory=list)
    """In eviction order (the policy's order; dependents before their dependencies)."""
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
    policy: EvictionPolicy = LRU,
) -> EvictionPlan:
    """Evict models in ``policy`` order (default: least recently used first) until
    ``need_bytes`` and one more model slot fit.

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
    remaining = policy.order(resident, now)
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
