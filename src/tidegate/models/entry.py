"""One configured model's cache state. Plain data plus its state transitions."""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass

from tidegate.config import ModelConfig
from tidegate.models.policy import EntryView, decayed
from tidegate.models.served import RemoteModel, ServedModel, TextGenerationModel

__all__ = ["Entry", "ModelState"]


class ModelState(enum.StrEnum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    FAILED = "failed"


@dataclass(slots=True, eq=False)
class Entry:
    config: ModelConfig
    created: int
    state: ModelState = ModelState.UNLOADED
    served: ServedModel | None = None
    load_future: asyncio.Future[ServedModel] | None = None
    resident: bool = False
    """Counted against the budget: loaded, or loading with room reserved."""
    reserved_bytes: int = 0
    measured_bytes: int = 0
    leases: int = 0
    last_used: float = 0.0
    last_used_wall: float | None = None
    frequency: float = 0.0
    """Requests for it, decayed exponentially (:func:`~tidegate.models.policy.decayed`), as of
    ``frequency_at``. Kept across unloads: ``lfu`` eviction ranks a reloaded model by its
    history, not as new."""
    frequency_at: float = 0.0
    error: str | None = None
    failures: int = 0
    retry_at: float = 0.0
    load_seconds: float | None = None
    preloaded: bool = False
    """Loaded by predictive preloading and not used since."""
    skipped: str | None = None
    """Why eager preloading passed over it."""

    def view(self) -> EntryView:
        return EntryView(
            id=self.config.id,
            size=self.measured_bytes if self.state is ModelState.LOADED else self.reserved_bytes,
            last_used=self.last_used,
            leases=self.leases,
            keep_alive_s=self.config.keep_alive_s,
            depends_on=self.config.depends_on,
            loading=self.state is not ModelState.LOADED,
            frequency=self.frequency,
            frequency_at=self.frequency_at,
        )

    def touch(self, now: float) -> None:
        self.last_used = now
        self.last_used_wall = time.time()

    def requested(self, now: float, *, half_life: float) -> None:
        """A request got it: count the request and mark it used. (The lease's end only
        touches it, so each request counts once.)"""
        self.frequency = decayed(self.frequency, self.frequency_at, now, half_life) + 1
        self.frequency_at = now
        self.touch(now)

    def loaded(self, served: ServedModel, *, measured: int, seconds: float, preloaded: bool,
               now: float) -> None:
        self.served = served
        self.state = ModelState.LOADED
        self.resident = True
        self.measured_bytes = measured or self.config.memory_bytes or 0
        self.load_seconds = seconds
        self.error = None
        self.failures = 0
        self.preloaded = preloaded
        self.skipped = None
        self.last_used = now

    def failed(self, detail: str, *, retry_at: float) -> None:
        self.state = ModelState.FAILED
        self.error = detail
        self.retry_at = retry_at
        self.resident = False
        self.reserved_bytes = 0
        self.load_future = None

    def unloaded(self) -> ServedModel | None:
        served, self.served = self.served, None
        self.state = ModelState.UNLOADED
        self.resident = False
        self.reserved_bytes = 0
        self.load_future = None
        self.preloaded = False
        return served

    def card(self, *, now: float) -> dict[str, object]:
        card: dict[str, object] = {
            "id": self.config.id,
            "object": "model",
            "created": self.created,
            "owned_by": "tidegate",
            "runtime": self.config.runtime,
            "status": self.state.value,
            "memory_bytes": self.measured_bytes if self.state is ModelState.LOADED else None,
            "last_used": self.last_used_wall,
            "depends_on": list(self.config.depends_on),
        }
        if self.error:
            card["error"] = self.error
        if self.skipped:
            card["skipped"] = self.skipped
        served = self.served
        if served is not None:
            card["kind"] = served.kind
            card["load_seconds"] = round(self.load_seconds or 0.0, 3)
            if isinstance(served, TextGenerationModel):
                card["context_length"] = served.runtime.context_length
            else:
                card["dimensions"] = served.dimensions
                card["max_input_tokens"] = served.max_input_tokens
            if isinstance(served, RemoteModel):
                card["upstream"] = served.upstream.describe()
        return card
