"""One configured model's cache state (plain data plus its state transitions) and the typed
snapshot of it that the API, the health check and the metrics read."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from tidegate.config import ModelConfig
from tidegate.kinds import ModelKind
from tidegate.models.policy import EntryView, decayed
from tidegate.models.served import RemoteModel, RerankModel, ServedModel, TextGenerationModel
from tidegate.runtimes.base import EngineInfo

__all__ = ["Entry", "ModelSnapshot", "ModelState"]


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
    ever_loaded: bool = False

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

    def touch(self, now: float, wall: float) -> None:
        self.last_used = now
        self.last_used_wall = wall

    def requested(self, now: float, wall: float, *, half_life: float) -> None:
        """A request got it: count the request and mark it used. (The lease's end only
        touches it, so each request counts once.)"""
        self.frequency = decayed(self.frequency, self.frequency_at, now, half_life) + 1
        self.frequency_at = now
        self.touch(now, wall)

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
        self.ever_loaded = True
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

    def snapshot(self) -> ModelSnapshot:
        served = self.served
        loaded = self.state is ModelState.LOADED
        return ModelSnapshot(
            id=self.config.id,
            runtime=self.config.runtime,
            status=self.state,
            created=self.created,
            memory_bytes=self.measured_bytes if loaded else None,
            last_used=self.last_used_wall,
            depends_on=self.config.depends_on,
            leases=self.leases,
            ever_loaded=self.ever_loaded,
            error=self.error,
            skipped=self.skipped,
            kind=None if served is None else served.kind,
            load_seconds=None if served is None else self.load_seconds or 0.0,
            details={} if served is None else _served_details(served),
        )


def _served_details(served: ServedModel) -> dict[str, object]:
    """The model object's fields that depend on what the loaded model serves."""
    if isinstance(served, TextGenerationModel):
        runtime = served.runtime
        return {"context_length": runtime.context_length, "backend": runtime.backend.value,
                "precision": runtime.precision.value, "weights": runtime.weights.value}
    details: dict[str, object] = {"max_input_tokens": served.max_input_tokens}
    if isinstance(served, RerankModel):
        details["num_labels"] = served.runtime.num_labels
    else:
        details["dimensions"] = served.dimensions
    engine = getattr(served.runtime, "engine_info", None)
    if isinstance(engine, EngineInfo):
        details.update(backend=engine.backend, precision=engine.precision)
        details[engine.probe_key] = round(engine.probe, 8)
    if isinstance(served, RemoteModel):
        details["upstream"] = served.upstream.describe()
    return details


@dataclass(frozen=True, slots=True)
class ModelSnapshot:
    """One model's cache state at one moment: what ``GET /v1/models``, ``/health/ready`` and
    the cache metrics show."""

    id: str
    runtime: str
    status: ModelState
    created: int
    """When the server started knowing it (seconds since the epoch)."""
    memory_bytes: int | None
    """Measured size while loaded, else None."""
    last_used: float | None
    """When a request last used it (seconds since the epoch), None if never."""
    depends_on: tuple[str, ...]
    leases: int
    """Requests holding it (or waiting for its load) now."""
    ever_loaded: bool
    """Loaded at least once since start (eager models: what readiness needs)."""
    error: str | None = None
    skipped: str | None = None
    kind: ModelKind | None = None
    """What the loaded model serves (``embedding``, ``generation``, ``remote``); None unless
    loaded."""
    load_seconds: float | None = None
    details: Mapping[str, object] = field(default_factory=dict)
    """Kind-specific fields of the model object (``dimensions``, ``context_length``, ...)."""

    @property
    def loaded(self) -> bool:
        return self.status is ModelState.LOADED

    def model_object(self) -> dict[str, object]:
        """The OpenAI model object, with tidegate's status fields added."""
        card: dict[str, object] = {
            "id": self.id,
            "object": "model",
            "created": self.created,
            "owned_by": "tidegate",
            "runtime": self.runtime,
            "status": self.status.value,
            "memory_bytes": self.memory_bytes,
            "last_used": self.last_used,
            "depends_on": list(self.depends_on),
        }
        if self.error:
            card["error"] = self.error
        if self.skipped:
            card["skipped"] = self.skipped
        if self.kind is not None:
            card["kind"] = self.kind
            card["load_seconds"] = round(self.load_seconds or 0.0, 3)
            card.update(self.details)
        return card
