"""The generation engine's instruments: plain counters and histograms, and their snapshot.

Like :class:`tidegate.batching.stats.BatchMetrics`, :class:`GenerationMetrics` is written only
from the event loop thread, needs no lock, and outlives an engine so counters survive a reload.
:mod:`tidegate.metrics` reads it (and :class:`EngineStatistics`, a frozen snapshot) when
``/metrics`` is scraped; this module imports nothing from the exporter.
"""

from __future__ import annotations

from dataclasses import dataclass

# HistogramSnapshot is re-exported: the engine builds its statistics from it.
from tidegate.histogram import (
    SIZE_BUCKETS,
    TIME_BUCKETS,
    TOKEN_BUCKETS,
    Histogram,
    HistogramSnapshot,
)

__all__ = ["EngineStatistics", "GenerationMetrics", "HistogramSnapshot"]

FINISH_REASONS = ("stop", "length", "abort", "error")


class GenerationMetrics:
    """One model's generation instruments."""

    __slots__ = ("aborted_slow_readers", "batch_size", "finished", "generated_tokens",
                 "inter_token_latency", "prefill_tokens_per_step", "prompt_tokens",
                 "rejected", "step_seconds", "time_to_first_token")

    def __init__(self) -> None:
        self.time_to_first_token = Histogram(TIME_BUCKETS)
        """Submit to first token out, queueing and prefill included."""
        self.inter_token_latency = Histogram(TIME_BUCKETS)
        self.step_seconds = Histogram(TIME_BUCKETS)
        self.batch_size = Histogram(SIZE_BUCKETS)
        """Sequences decoded per step."""
        self.prefill_tokens_per_step = Histogram(TOKEN_BUCKETS)
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.finished = dict.fromkeys(FINISH_REASONS, 0)
        self.rejected = 0
        self.aborted_slow_readers = 0


@dataclass(frozen=True, slots=True)
class EngineStatistics:
    running: int
    """Sequences holding a slot: being prefilled or decoding."""
    waiting: int
    """Sequences admitted to the queue, not yet prefilled."""
    steps: int
    """Steps completed by this engine (``index`` of the last :class:`StepReport`)."""
    steps_started: int
    """Steps handed to the worker; one more than ``steps`` while a step computes."""
    prompt_tokens: int
    generated_tokens: int
    tokens_per_second: float
    """Generated tokens per second of step time, smoothed over recent steps."""
    finished: dict[str, int]
    """Ended sequences by reason: stop, length, abort (cancel or slow reader), error."""
    rejected: int
    """Submissions refused because the waiting queue was full."""
    aborted_slow_readers: int
    time_to_first_token: HistogramSnapshot
    inter_token_latency: HistogramSnapshot
    step_seconds: HistogramSnapshot
    batch_size: HistogramSnapshot
    prefill_tokens_per_step: HistogramSnapshot
    last_decode_batch: tuple[str, ...]
    """Request ids decoded by the last completed step, in row order."""
