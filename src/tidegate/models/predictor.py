"""Predict the next model from the request history: first-order transitions, falling back to
overall frequency. Pure bookkeeping; the manager decides what to preload with it."""

from __future__ import annotations

from collections import Counter, defaultdict

__all__ = ["TransitionPredictor"]


class TransitionPredictor:
    """Counts ``previous -> next`` model transitions in the request sequence.

    Consecutive requests for the same model are one visit: the transition that matters for
    preloading is to a *different* model.
    """

    def __init__(self) -> None:
        self._transitions: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self._frequency: Counter[str] = Counter()
        self._last: str | None = None

    @property
    def last(self) -> str | None:
        return self._last

    def observe(self, model: str) -> None:
        self._frequency[model] += 1
        if self._last is not None and self._last != model:
            self._transitions[self._last][model] += 1
        self._last = model

    def probability(self, model: str, current: str | None = None) -> float:
        """Estimated P(next = ``model`` | ``current``), from the same counts as :meth:`predict`."""
        current = self._last if current is None else current
        following = self._transitions.get(current) if current is not None else None
        if following:
            return following[model] / sum(following.values())
        total = sum(self._frequency.values())
        return self._frequency[model] / total if total else 0.0

    def predict(self, current: str | None = None, k: int = 2) -> list[tuple[str, float]]:
        """The ``k`` likeliest next models after ``current`` (default: the last observed), with
        their estimated probabilities."""
        current = self._last if current is None else current
        following = self._transitions.get(current) if current is not None else None
        if following:
            total = sum(following.values())
            return [(m, n / total) for m, n in following.most_common(k)]
        total = sum(self._frequency.values())
        if not total:
            return []
        ranked = ((m, n / total) for m, n in self._frequency.most_common(k + 1) if m != current)
        return list(ranked)[:k]
