"""One model step of the running batch: the only code that touches the model's tensors.

:meth:`StepWorker.step` runs in the engine's single worker thread. The engine decides what a
step does (a :class:`StepPlan`: who leaves, who is prefilled); the worker drops the leavers'
rows and runs **one forward** over a packed row of tokens (:mod:`tidegate.generation.kvlayout`):
the last token of every sequence in the batch, which decodes one token each, followed by the
newcomers' prompts, which are prefilled and join the batch, decoding from the next step on.
Every step gives each sequence in it one new token.

Before choosing, rows with penalties or ``min_tokens`` get adjusted logits (a copy: the raw
logits stay for the log-probabilities, which OpenAI reports before any adjustment). A step in
which no row asks for either, nor for logprobs, pays one ``any()`` over its rows for them.

If a forward with newcomers fails, the step is redone without them and each newcomer is then
prefilled alone, so one bad prompt fails only its own sequence. Models whose rotary scaling
depends on the forward's largest position (dynamic, longrope) prefill newcomers in a forward of
their own, after the decode, so that a prompt gets exactly the embedding it gets alone.
:func:`check_packed_steps` is run at load: a model whose attention cannot be packed is refused.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tidegate.generation.attention import PackedAttention, TransformedCache
from tidegate.generation.kvbatch import PaddedKVBatch
from tidegate.generation.params import SamplingParams, TokenLogprob
from tidegate.generation.sampling import (
    apply_penalties,
    mask_tokens,
    next_tokens,
    token_logprobs,
)
from tidegate.generation.steps import PrefillRequest, StepOutcome, StepPlan

__all__ = [
    "PrefillRequest",
    "StepOutcome",
    "StepPlan",
    "StepWorker",
    "check_packed_steps",
    "packs_prefill",
]

log = logging.getLogger("tidegate.generation")


@dataclass(slots=True)
class _Row:
    params: SamplingParams
    generator: torch.Generator
    last_token: int = -1
    generated: int = 0
    mask_until: int = 0
    """End-of-sequence tokens are masked while fewer tokens were generated (``min_tokens``)."""
    counts: torch.Tensor | None = None
    """How often each token was generated (float, one per vocabulary entry): penalties only."""
    extra: bool = False
    """Penalties, ``min_tokens`` or logprobs: the step has more to do than choose a token."""


class StepWorker:
    """Owns the padded KV batch of one model. Not thread-safe: one step at a time."""

    def __init__(self, model: Any, *, materialized: bool = False,
                 eos_token_ids: Collection[int] = ()) -> None:
        self._model = model
        self._eos = sorted(eos_token_ids)
        """Masked for a sequence until it has generated its ``min_tokens``."""
        # transformers 5 renamed ``past_key_values`` to ``cache`` (the old name warns).
        parameters = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in parameters else "past_key_values"
        self._batch = PaddedKVBatch(materialized=materialized)
        self._attention = PackedAttention(model)
        self.packs_prefill = packs_prefill(model)
        """Newcomers join the running rows' forward; else they get a forward of their own."""
        self._rows: dict[int, _Row] = {}

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
        failed: dict[int, str] = {}
        done: list[tuple[Sequence[int], Sequence[PrefillRequest], torch.Tensor]] = []
        running: Sequence[int] = decoded
        if running and plan.prefill and not self.packs_prefill:
            done.append((running, (), self._forward(running, ())))
            running = ()
        if running or plan.prefill:
            try:
                done.append((running, plan.prefill, self._forward(running, plan.prefill)))
            except Exception:
                if not plan.prefill:
                    raise  # the engine fails the batch
                log.debug("step with %d newcomers failed; redoing it without them, then "
                          "prefilling each alone", len(plan.prefill), exc_info=True)
                if running:
                    done.append((running, (), self._forward(running, ())))
                for request in plan.prefill:
                    try:
                        done.append(((), (request,), self._forward((), (request,))))
                    except Exception as exc:  # one bad prompt must not take the batch down
                        failed[request.seq_id] = f"{type(exc).__name__}: {exc}"
        tokens: dict[int, int] = {}
        logprobs: dict[int, TokenLogprob] = {}
        for seq_ids, requests, logits in done:
            self._sample(seq_ids, requests, logits, tokens, logprobs)
        return StepOutcome(decoded=decoded, tokens=tokens, failed=failed, logprobs=logprobs)

    def _forward(
        self, decoded: Sequence[int], requests: Sequence[PrefillRequest]
    ) -> torch.Tensor:
        """One forward in which the ``decoded`` rows (all of the batch, or none) decode and
        ``requests`` join: the logits of each one's next token, in that order."""
        return self._packed(
            [self._rows[seq_id].last_token for seq_id in decoded],
            [(request.seq_id, request.prompt_ids) for request in requests],
        )

    def _packed(
        self, last_tokens: Sequence[int], prompts: Sequence[tuple[int, Sequence[int]]]
    ) -> torch.Tensor:
        """The forward over one packed row; the batch commits it, or forgets it if it raises."""
        inputs = self._batch.begin(
            decode=bool(last_tokens),
            prompts=[(seq_id, len(prompt)) for seq_id, prompt in prompts],
        )
        packed = list(last_tokens)
        for _, prompt in prompts:
            packed.extend(prompt)
        input_ids = torch.tensor([packed], dtype=torch.long)
        arguments = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "position_ids": inputs.position_ids,
            "use_cache": True,
            "logits_to_keep": inputs.logits_index,
            self._cache_kwarg: inputs.cache,
        }
        try:
            output = self._attention.run(inputs.scratch, lambda: self._model(**arguments))
        except BaseException:
            self._batch.abort()
            raise
        self._batch.commit()
        logits: torch.Tensor = output.logits[0]
        return logits

    def _sample(
        self, decoded: Sequence[int], requests: Sequence[PrefillRequest], logits: torch.Tensor,
        tokens: dict[int, int], logprobs: dict[int, TokenLogprob],
    ) -> None:
        """Choose each row's next token into ``tokens`` (and ``logprobs``, for rows that ask)."""
        for request in requests:
            self._rows[request.seq_id] = self._new_row(request, vocab=logits.shape[-1])
        ids = [*decoded, *(request.seq_id for request in requests)]
        rows = [self._rows[seq_id] for seq_id in ids]
        params = [row.params for row in rows]
        extra = any(row.extra for row in rows)
        chosen = logits
        if extra and any(row.counts is not None or row.generated < row.mask_until
                         for row in rows):
            chosen = self._adjusted(logits, rows)
        new = next_tokens(chosen, params, [row.generator for row in rows])
        for seq_id, row, token in zip(ids, rows, new, strict=True):
            tokens[seq_id] = row.last_token = token
            row.generated += 1
            if row.counts is not None:
                row.counts[token] += 1
        if extra:
            asking = [i for i, p in enumerate(params) if p.logprobs is not None]
            if asking:
                found = token_logprobs(logits, asking, [new[i] for i in asking],
                                       [params[i].logprobs or 0 for i in asking])
                logprobs.update(zip((ids[i] for i in asking), found, strict=True))

    @staticmethod
    def _new_row(request: PrefillRequest, *, vocab: int) -> _Row:
        params = request.params
        counts = torch.zeros(vocab) if params.penalized else None
        extra = params.changes_logits or params.logprobs is not None
        mask_until = 0 if params.ignore_eos else params.min_tokens
        return _Row(params, request.generator, mask_until=mask_until, counts=counts,
                    extra=extra)

    def _adjusted(self, logits: torch.Tensor, rows: Sequence[_Row]) -> torch.Tensor:
        """A float32 copy of ``logits`` with each row's penalties applied and, for rows short
        of their ``min_tokens`` (and not ignoring them), the end-of-sequence tokens masked."""
        adjusted = logits.to(torch.float32, copy=True)
        penalized = [(i, row.counts) for i, row in enumerate(rows) if row.counts is not None]
        if penalized:
            at = [i for i, _ in penalized]
            counts = torch.stack([counts for _, counts in penalized])
            apply_penalties(adjusted, at, counts, [rows[i].params for i in at])
        short = [i for i, row in enumerate(rows) if row.generated < row.mask_until]
        eos = [token for token in self._eos if token < adjusted.shape[-1]]
        if short and eos:
            mask_tokens(adjusted, short, eos)
        return adjusted


_POSITION_DEPENDENT_ROPE = frozenset({"dynamic", "longrope"})
"""Rotary scalings chosen per forward from its largest position: a prompt packed with a long
running sequence would get another scaling than when prefilled alone."""


def _rope_types(config: Any) -> set[str]:
    found: set[str] = set()
    for name in ("rope_parameters", "rope_scaling"):
        value = getattr(config, name, None)
        if not isinstance(value, dict):
            continue
        per_layer_type = value and all(isinstance(v, dict) for v in value.values())
        for entry in value.values() if per_layer_type else (value,):
            kind = entry.get("rope_type") or entry.get("type")
            if isinstance(kind, str):
                found.add(kind)
    return found


def packs_prefill(model: Any) -> bool:
    """Whether newcomers' prompts can share a forward with the running rows' tokens and still
    get exactly their own results (see :data:`_POSITION_DEPENDENT_ROPE`)."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return not (_rope_types(config) | _rope_types(text)) & _POSITION_DEPENDENT_ROPE


def check_packed_steps(model: Any, vocab_size: int) -> bool:
    """Run two packed steps on a throwaway batch (a prompt alone, then its decode step with a
    newcomer joining) and compare every logit with the model's own forward over each sequence.

    Returns whether the model needs materialized caches (it transforms what it reads from the
    cache before attending: latent attention, repeated key heads); those are probed again that
    way. Raises ``ValueError`` naming the problem when the model's attention cannot be packed at
    all: it bypasses transformers' attention interface or needs something the packed attention
    does not do (sinks, position biases). Run at load, so such a model is refused before it
    takes a request.
    """
    try:
        _probe(model, vocab_size, materialized=False)
    except TransformedCache:
        _probe(model, vocab_size, materialized=True)
        return True
    return False


def _probe(model: Any, vocab_size: int, *, materialized: bool) -> None:
    worker = StepWorker(model, materialized=materialized)
    first = [token % vocab_size for token in (1, 2, 3)]
    second = [token % vocab_size for token in (4, 5)]
    try:
        with torch.inference_mode():
            alone = worker._packed((), [(0, first)])
            token = int(alone[0].argmax())
            joined = worker._packed([token], [(1, second)])
            expected = [model(input_ids=torch.tensor([ids])).logits[0, -1]
                        for ids in (first, [*first, token], second)]
    except TransformedCache:
        raise  # not wrapped: the caller probes again with materialized caches
    except Exception as exc:
        raise ValueError(
            f"{type(model).__name__} cannot run the generation engine's packed steps "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    finally:
        worker.reset()
    loose = next(model.parameters()).dtype != torch.float32
    for got, want in zip((alone[0], joined[0], joined[1]), expected, strict=True):
        scale = max(1.0, float(want.abs().max()))
        error = float((got.float() - want.float()).abs().max())
        if error > (5e-2 if loose else 1e-3) * scale:
            raise ValueError(
                f"{type(model).__name__}: the generation engine's packed steps give logits "
                f"that differ from the model's own by {error:.3g}; its attention computes "
                "something the packed attention does not reproduce"
            )
