"""One model step of the running batch: the only code that touches the model's tensors.

:meth:`StepWorker.step` runs in the engine's single worker thread. The engine decides what a
step does (a :class:`StepPlan`: who leaves, who is prefilled); the worker drops the leavers'
rows, decodes one token for every sequence still in the batch, prefills the newcomers (each
alone, so its cache is exactly what it would be running by itself) and adds them to the batch,
where they decode from the next step on. Every step gives each sequence in it one new token.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tidegate.generation.kvbatch import KVLayers, PaddedKVBatch, cache_layers, new_cache
from tidegate.generation.params import SamplingParams
from tidegate.generation.sampling import next_tokens

__all__ = ["PrefillRequest", "StepOutcome", "StepPlan", "StepWorker"]


@dataclass(frozen=True, slots=True)
class PrefillRequest:
    seq_id: int
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    generator: torch.Generator


@dataclass(frozen=True, slots=True)
class StepPlan:
    drop: tuple[int, ...]
    """Sequences that finished or were cancelled since the last step: their rows go first."""
    prefill: tuple[PrefillRequest, ...]


@dataclass(frozen=True, slots=True)
class StepOutcome:
    decoded: tuple[int, ...]
    """The sequences of the decode batch, in row order."""
    tokens: dict[int, int]
    """Each sequence's new token: decoded ones and newly prefilled ones."""
    failed: dict[int, str]
    """Newcomers whose prefill raised, with the error: they did not join the batch."""


@dataclass(slots=True)
class _Row:
    params: SamplingParams
    generator: torch.Generator
    last_token: int


class StepWorker:
    """Owns the padded KV batch of one model. Not thread-safe: one step at a time."""

    def __init__(self, model: Any) -> None:
        self._model = model
        # transformers 5 renamed ``past_key_values`` to ``cache`` (the old name warns).
        parameters = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in parameters else "past_key_values"
        self._batch = PaddedKVBatch()
        self._rows: dict[int, _Row] = {}

    @property
    def batch_ids(self) -> tuple[int, ...]:
        return self._batch.ids

    def reset(self) -> None:
        """Forget every sequence (after a failed step, or at shutdown)."""
        self._batch.clear()
        self._rows.clear()

    @torch.inference_mode()
    def step(self, plan: StepPlan) -> StepOutcome:
        if plan.drop:
            self._batch.remove(set(plan.drop))
            for seq_id in plan.drop:
                self._rows.pop(seq_id, None)
        tokens: dict[int, int] = {}
        decoded = self._batch.ids
        if decoded:
            tokens.update(zip(decoded, self._decode(decoded), strict=True))
        joined = []
        failed: dict[int, str] = {}
        for request in plan.prefill:
            try:
                token, layers = self._prefill(request)
            except Exception as exc:  # one bad prompt must not take the batch down with it
                failed[request.seq_id] = f"{type(exc).__name__}: {exc}"
                continue
            tokens[request.seq_id] = token
            self._rows[request.seq_id] = _Row(request.params, request.generator, token)
            joined.append((request.seq_id, layers))
        self._batch.extend(joined)
        return StepOutcome(decoded=decoded, tokens=tokens, failed=failed)

    def _decode(self, seq_ids: Sequence[int]) -> list[int]:
        rows = [self._rows[seq_id] for seq_id in seq_ids]
        cache, mask, positions = self._batch.step_inputs()
        input_ids = torch.tensor([[row.last_token] for row in rows], dtype=torch.long)
        output = self._model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self._cache_kwarg: cache},
        )
        self._batch.advance(mask)
        tokens = next_tokens(
            output.logits[:, -1, :], [r.params for r in rows], [r.generator for r in rows]
        )
        for row, token in zip(rows, tokens, strict=True):
            row.last_token = token
        return tokens

    def _prefill(self, request: PrefillRequest) -> tuple[int, KVLayers]:
        input_ids = torch.tensor([request.prompt_ids], dtype=torch.long)
        cache = new_cache()
        output = self._model(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kwarg: cache},
        )
        token = next_tokens(output.logits[:, -1, :], [request.params], [request.generator])[0]
        return token, cache_layers(cache)
