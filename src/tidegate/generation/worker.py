"""One model step of the running batch: the only code that touches the model's tensors.

:meth:`StepWorker.step` runs in the engine's single worker thread. The engine decides what a
step does (a :class:`StepPlan`: who leaves, who is prefilled); the worker drops the leavers'
rows, decodes one token for every sequence still in the batch, prefills the newcomers (together,
in one forward over right-padded prompts, which under causal attention gives each the cache it
would have running by itself) and adds them to the batch, where they decode from the next step
on. Every step gives each sequence in it one new token.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tidegate.generation.kvbatch import KVLayers, PaddedKVBatch, cache_layers, new_cache
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
        for request, result in zip(plan.prefill, self._prefill_all(plan.prefill), strict=True):
            if isinstance(result, str):
                failed[request.seq_id] = result
                continue
            token, layers = result
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
        self._batch.advance()
        tokens = next_tokens(
            output.logits[:, -1, :], [r.params for r in rows], [r.generator for r in rows]
        )
        for row, token in zip(rows, tokens, strict=True):
            row.last_token = token
        return tokens

    def _prefill_all(
        self, requests: Sequence[PrefillRequest]
    ) -> list[tuple[int, KVLayers] | str]:
        """Each newcomer's first token and cache, or the error of its prefill.

        Newcomers are prefilled together in one forward; if that fails, each alone, so one
        bad prompt fails only its own sequence.
        """
        if len(requests) > 1:
            try:
                return list(self._prefill_together(requests))
            except Exception:
                log.debug("batched prefill of %d sequences failed; prefilling each alone",
                          len(requests), exc_info=True)
        results: list[tuple[int, KVLayers] | str] = []
        for request in requests:
            try:
                results.extend(self._prefill_together([request]))
            except Exception as exc:  # one bad prompt must not take the batch down with it
                results.append(f"{type(exc).__name__}: {exc}")
        return results

    def _prefill_together(
        self, requests: Sequence[PrefillRequest]
    ) -> list[tuple[int, KVLayers]]:
        """One forward over the prompts, right-padded to the longest.

        Under causal attention a token never sees the padding after it, so every prompt's
        cache and last-token logits are what it would get alone; positions start at 0 in
        every row, as they would alone. Each row's cache is then cut to its own tokens.
        """
        lengths = [len(request.prompt_ids) for request in requests]
        input_ids = torch.zeros((len(requests), max(lengths)), dtype=torch.long)
        for row, request in enumerate(requests):
            input_ids[row, : lengths[row]] = torch.tensor(request.prompt_ids, dtype=torch.long)
        last = torch.tensor(lengths, dtype=torch.long) - 1
        # Only each prompt's last position needs logits (sorted, as searchsorted wants).
        keep = torch.unique(last)
        cache = new_cache()
        output = self._model(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            use_cache=True,
            logits_to_keep=keep,
            **{self._cache_kwarg: cache},
        )
        logits = output.logits[torch.arange(len(requests)), torch.searchsorted(keep, last)]
        tokens = next_tokens(logits, [r.params for r in requests],
                             [r.generator for r in requests])
        layers = cache_layers(cache)
        return [
            (token, [(k[row : row + 1, :, :length], v[row : row + 1, :, :length])
                     for k, v in layers])
            for row, (token, length) in enumerate(zip(tokens, lengths, strict=True))
        ]
