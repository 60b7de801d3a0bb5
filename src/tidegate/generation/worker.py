"""One model step of the running batch: the only code that touches the model's tensors.

:meth:`StepWorker.step` runs in the engine's single worker thread. The engine decides what a
step does (a :class:`StepPlan`: who leaves, who is prefilled); the worker drops the leavers'
rows and runs **one forward** over a packed row of tokens (:mod:`tidegate.generation.kvbatch`):
the last token of every sequence in the batch, which decodes one token each, followed by the
newcomers' prompts, which are prefilled and join the batch, decoding from the next step on.
Every step gives each sequence in it one new token.

If a forward with newcomers fails, the step is redone without them and each newcomer is then
prefilled alone, so one bad prompt fails only its own sequence.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tidegate.generation.attention import PackedAttention
from tidegate.generation.kvbatch import PaddedKVBatch
from tidegate.generation.params import SamplingParams
from tidegate.generation.sampling import next_tokens

__all__ = ["PrefillRequest", "StepOutcome", "StepPlan", "StepWorker"]

log = logging.getLogger("tidegate.generation")


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
        self._attention = PackedAttention(model)
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
        decoded = self._batch.ids
        tokens: dict[int, int] = {}
        failed: dict[int, str] = {}
        if not decoded and not plan.prefill:
            return StepOutcome(decoded=decoded, tokens=tokens, failed=failed)
        try:
            tokens.update(self._forward(decoded, plan.prefill))
        except Exception:
            if not plan.prefill:
                raise  # the engine fails the batch
            log.debug("step with %d newcomers failed; redoing it without them, then "
                      "prefilling each alone", len(plan.prefill), exc_info=True)
            if decoded:
                tokens.update(self._forward(decoded, ()))
            for request in plan.prefill:
                try:
                    tokens.update(self._forward((), (request,)))
                except Exception as exc:  # one bad prompt must not take the batch down
                    failed[request.seq_id] = f"{type(exc).__name__}: {exc}"
        return StepOutcome(decoded=decoded, tokens=tokens, failed=failed)

    def _forward(
        self, decoded: Sequence[int], requests: Sequence[PrefillRequest]
    ) -> dict[int, int]:
        """One forward: the ``decoded`` rows (all of the batch, or none) decode a token each
        and ``requests`` join; returns every one's new token."""
        rows = [self._rows[seq_id] for seq_id in decoded]
        inputs = self._batch.begin(
            decode=bool(rows),
            prompts=[(request.seq_id, len(request.prompt_ids)) for request in requests],
        )
        packed = [row.last_token for row in rows]
        for request in requests:
            packed.extend(request.prompt_ids)
        input_ids = torch.tensor([packed], dtype=torch.long)
        try:
            with self._attention.over(inputs.step):
                output = self._model(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    position_ids=inputs.position_ids,
                    use_cache=True,
                    logits_to_keep=inputs.logits_index,
                    **{self._cache_kwarg: inputs.cache},
                )
        except BaseException:
            self._batch.abort()
            raise
        self._batch.commit()
        params = [row.params for row in rows] + [request.params for request in requests]
        generators = [row.generator for row in rows] + [r.generator for r in requests]
        new = next_tokens(output.logits[0], params, generators)
        for row, token in zip(rows, new, strict=False):
            row.last_token = token
        for request, token in zip(requests, new[len(rows):], strict=True):
            self._rows[request.seq_id] = _Row(request.params, request.generator, token)
        ids = [*decoded, *(request.seq_id for request in requests)]
        return dict(zip(ids, new, strict=True))
