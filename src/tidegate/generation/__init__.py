"""Text generation: continuous batching of a causal LM with per-sequence token streams.

``GenerationEngine(runtime, model=...)`` (in :mod:`tidegate.generation.engine`, which imports
torch) batches sequences at every decode step; ``engine.submit(prompt_ids, SamplingParams(...))``
returns a :class:`GenerationStream` of text deltas whose :attr:`~GenerationStream.result` holds
the finish reason and token counts (a sequence that asks for logprobs streams :class:`Delta`
objects, read with :meth:`~GenerationStream.deltas`). This package's top level stays free of
torch, so the HTTP layer can import it without loading a deep-learning framework.
"""

from __future__ import annotations

from tidegate.generation.params import FinishReason, SamplingParams, TokenLogprob
from tidegate.generation.stats import EngineStatistics, GenerationMetrics, HistogramSnapshot
from tidegate.generation.stream import Delta, GenerationResult, GenerationStream

__all__ = [
    "Delta",
    "EngineStatistics",
    "FinishReason",
    "GenerationMetrics",
    "GenerationResult",
    "GenerationStream",
    "HistogramSnapshot",
    "SamplingParams",
    "TokenLogprob",
]
