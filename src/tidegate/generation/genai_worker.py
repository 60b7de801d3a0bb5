"""The engine's steps on OpenVINO GenAI's continuous-batching pipeline.

tidegate's :class:`~tidegate.generation.engine.GenerationEngine` keeps every decision (admission,
detokenization, stop strings, finishing, cancelling, streams, metrics); this worker only turns
its :class:`StepPlan` into pipeline calls, in the engine's single worker thread:

* a dropped sequence's request is cancelled (the pipeline frees its KV blocks at this step);
* a newcomer is added with its token ids and a ``GenerationConfig`` from its sampling
  parameters (greedy, or temperature / top-p with its own seed; penalties; ``min_tokens``);
* one ``pipeline.step()`` runs, then each request's new token is read from its handle.

The pipeline is told to ignore end-of-sequence tokens (``ignore_eos``) but knows them
(``stop_token_ids``, so ``min_new_tokens`` masks them): the engine sees the token, ends the
sequence and drops it before the next step, exactly as with the torch worker. A pipeline step
without a token for a sequence (a long prompt prefilled in chunks) just reports none for it.
"""

from __future__ import annotations

import logging
import secrets
from collections import deque
from collections.abc import Collection
from typing import Any

import numpy as np

from tidegate.generation.params import SamplingParams, TokenLogprob
from tidegate.generation.steps import PrefillRequest, StepOutcome, StepPlan

__all__ = ["GenaiWorker", "generation_config"]

log = logging.getLogger("tidegate.generation")

_U64 = 1 << 64


def generation_config(params: SamplingParams, *, max_new: int,
                      eos_token_ids: Collection[int], vocab_size: int) -> Any:
    """The pipeline's ``GenerationConfig`` for one sequence."""
    import openvino_genai

    config = openvino_genai.GenerationConfig()
    config.max_new_tokens = max(1, max_new)
    config.ignore_eos = True  # the engine ends sequences (see the module docstring)
    if eos_token_ids:
        config.stop_token_ids = set(eos_token_ids)
        config.eos_token_id = min(eos_token_ids)
        # With ignore_eos the request's end tokens are ordinary tokens: nothing to mask.
        config.min_new_tokens = 0 if params.ignore_eos else params.min_tokens
    else:
        # The pipeline insists on an end token; a model without one gets an id past its
        # vocabulary, which no step can produce (and nothing masks: min_tokens needs no mask).
        config.eos_token_id = vocab_size
        config.stop_token_ids = {vocab_size}
    config.presence_penalty = float(getattr(params, "presence_penalty", 0.0) or 0.0)
    config.frequency_penalty = float(getattr(params, "frequency_penalty", 0.0) or 0.0)
    if getattr(params, "logprobs", None) is not None:
        config.logprobs = 1
    if params.greedy:
        config.do_sample = False
    else:
        config.do_sample = True
        config.temperature = params.temperature
        config.top_p = params.top_p
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        config.rng_seed = seed % _U64
    return config


class GenaiWorker:
    """Owns the requests of one pipeline. Not thread-safe: one step at a time."""

    def __init__(self, pipeline: Any, *, eos_token_ids: Collection[int],
                 vocab_size: int) -> None:
        import openvino
        import openvino_genai

        self._pipeline = pipeline
        self._tensor = openvino.Tensor
        self._running = openvino_genai.GenerationStatus.RUNNING
        self._ignored = openvino_genai.GenerationStatus.IGNORED
        self._eos = frozenset(eos_token_ids)
        self._vocab_size = vocab_size
        self._handles: dict[int, Any] = {}
        self._reports_logprobs: set[int] = set()
        self._backlog: dict[int, deque[tuple[int, float | None]]] = {}

    def reset(self) -> None:
        """Cancel every request (after a failed step, or at shutdown)."""
        for handle in self._handles.values():
            handle.cancel()
        self._handles.clear()
        self._reports_logprobs.clear()
        self._backlog.clear()

    def step(self, plan: StepPlan) -> StepOutcome:
        for seq_id in plan.drop:
            handle = self._handles.pop(seq_id, None)
            self._backlog.pop(seq_id, None)
            self._reports_logprobs.discard(seq_id)
            if handle is not None:
                handle.cancel()
        decoded = tuple(self._handles)
        failed: dict[int, str] = {}
        for request in plan.prefill:
            try:
                self._handles[request.seq_id] = self._pipeline.add_request(
                    request.seq_id, self._tensor(np.array([request.prompt_ids], dtype=np.int64)),
                    self._config(request))
                if request.params.logprobs is not None:
                    self._reports_logprobs.add(request.seq_id)
            except Exception as exc:  # one bad request must not take the batch down
                failed[request.seq_id] = f"{type(exc).__name__}: {exc}"
        if self._pipeline.has_non_finished_requests():
            self._pipeline.step()
        tokens: dict[int, int] = {}
        logprobs: dict[int, TokenLogprob] = {}
        for seq_id, handle in self._handles.items():
            backlog = self._backlog.get(seq_id)
            if handle.can_read():
                backlog = self._read(seq_id, handle)
            if backlog:
                token, logprob = backlog.popleft()
                tokens[seq_id] = token
                if logprob is not None and seq_id in self._reports_logprobs:
                    logprobs[seq_id] = TokenLogprob(logprob)
            elif (status := handle.get_status()) != self._running:
                failed[seq_id] = _ended_reason(status, ignored=status == self._ignored)
        for seq_id in failed:
            self._handles.pop(seq_id, None)
            self._backlog.pop(seq_id, None)
            self._reports_logprobs.discard(seq_id)
        return StepOutcome(decoded=decoded, tokens=tokens, failed=failed, logprobs=logprobs)

    def _config(self, request: PrefillRequest) -> Any:
        return generation_config(request.params, max_new=request.max_new,
                                 eos_token_ids=self._eos, vocab_size=self._vocab_size)

    def _read(self, seq_id: int, handle: Any) -> deque[tuple[int, float | None]]:
        backlog = self._backlog.setdefault(seq_id, deque())
        for output in handle.read().values():
            values: list[float | None] = [float(v) for v in output.generated_log_probs]
            ids = [int(t) for t in output.generated_ids]
            values += [None] * (len(ids) - len(values))
            backlog.extend(zip(ids, values, strict=False))
        return backlog


def _ended_reason(status: Any, *, ignored: bool) -> str:
    """Why the pipeline ended a request the engine still runs: it never does on its own
    (lengths and end-of-sequence tokens are the engine's), except for a prompt that cannot fit
    the KV cache (``IGNORED``)."""
    if ignored:
        return ("the prompt does not fit the model's KV cache (kv_cache_bytes); shorten it or "
                "raise kv_cache_bytes")
    return f"the OpenVINO pipeline ended the request ({status})"
