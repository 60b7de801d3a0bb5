"""Attention over a packed step (see :mod:`tidegate.generation.kvlayout`), as a transformers
attention function.

transformers models call their attention through ``ALL_ATTENTION_FUNCTIONS``, keyed by the
config's ``_attn_implementation``. During a step, :class:`PackedAttention` selects
:func:`attend_packed` (registered under :data:`ATTENTION_NAME`), which receives each layer's
queries for the packed row ``[1, heads, tokens, dim]`` right after the layer's cache update
wrote the step's keys and values into the batch's buffers, and computes:

- for each running row's token, attention over its row of the buffer (the step's column
  included), with the padding mask;
- for each newcomer's prompt, causal attention over the prompt's own keys and values (a
  newcomer has no cache before its prompt).

The model builds no attention mask for this implementation (transformers skips mask creation for
a name it has no mask function for). Grouped-query attention, ``scaling`` and Gemma 2's logit
softcapping are honoured; an attention that needs anything else (sinks, position biases) fails
the step with a clear error rather than compute something else. Keys and values the model
transforms after the cache update (latent attention) raise :class:`TransformedCache` unless the
batch is materialized, in which case the attention reads them as the model passes them. A model
whose layers do not call the attention interface is caught after the forward: each cache update
must have been followed by one packed attention. Sliding windows are not applied: the runtime
caps such a model's context at its smallest window, where sliding attention is full attention,
and a longer sequence fails the step. :func:`tidegate.generation.worker.check_packed_steps` runs
all this once at load.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from tidegate.generation.kvlayout import StepScratch

__all__ = ["ATTENTION_NAME", "PackedAttention", "TransformedCache", "attend_packed"]

ATTENTION_NAME = "tidegate_packed"
_T = TypeVar("_T")
_UNSUPPORTED = frozenset({"s_aux", "sinks", "position_bias"})


class _Active(threading.local):
    """The scratch of the forward running in this thread: transformers calls
    :func:`attend_packed` with the model's arguments only."""

    scratch: StepScratch | None = None


_active = _Active()


@functools.cache
def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, attend_packed)


class PackedAttention:
    """Selects :func:`attend_packed` for one model's forward, one step at a time.

    The model's config (and its sub-configs) name the attention implementation, so during a
    step the model must not run anywhere else (the engine's worker owns it). The public
    setter walks every sub-config and costs tens of microseconds, twice a step; where the
    config keeps the name in its instance dictionary, the swap writes it there.
    """

    def __init__(self, model: Any) -> None:
        _register()
        self._model_name = type(model).__name__
        self._configs = _all_configs(model.config)

    def run(self, scratch: StepScratch, forward: Callable[[], _T]) -> _T:
        """Run the model's ``forward`` with its attention over the step ``scratch`` holds
        (:attr:`tidegate.generation.kvlayout.PackedInputs.scratch`)."""
        configs = self._configs
        previous = [self._swap(config, ATTENTION_NAME) for config in configs]
        _active.scratch = scratch
        try:
            result = forward()
        finally:
            _active.scratch = None
            for config, name in zip(configs, previous, strict=True):
                self._swap(config, name)
        if scratch.updates == 0 or scratch.attended != scratch.updates:
            raise RuntimeError(
                f"{self._model_name} does not attend through transformers' attention interface "
                f"once per cache update ({scratch.updates} cache updates, {scratch.attended} "
                "packed attention calls), which continuous batching needs"
            )
        return result

    @staticmethod
    def _swap(config: Any, name: str | None) -> str | None:
        fields = vars(config)
        if _INTERNAL in fields:
            previous: str | None = fields[_INTERNAL]
            fields[_INTERNAL] = name
            return previous
        previous = config._attn_implementation
        config._attn_implementation = name
        return previous


_INTERNAL = "_attn_implementation_internal"


def _all_configs(config: Any) -> list[Any]:
    """``config`` and its sub-configs, recursively: each names its modules' attention."""
    found = {id(config): config}
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None:
            found.update((id(c), c) for c in _all_configs(sub))
    return list(found.values())


class TransformedCache(NotImplementedError):
    """The model attends to something other than what its cache update returned: it needs
    the batch's caches materialized (see :class:`tidegate.generation.kvbatch.PaddedKVBatch`)."""


def attend_packed(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The attention of one layer over the active packed step; ``[1, tokens, heads, dim]``."""
    scratch = _active.scratch
    if scratch is None or scratch.step is None or scratch.layer is None:
        raise RuntimeError(f"{ATTENTION_NAME} attention runs only inside a tidegate step")
    step = scratch.step
    if not _UNSUPPORTED.isdisjoint(kwargs):
        for name in sorted(_UNSUPPORTED.intersection(kwargs)):
            if kwargs[name] is not None:
                raise NotImplementedError(f"attention with {name!r} is not supported")
    if dropout:
        raise NotImplementedError("attention dropout (training) is not supported")
    states = scratch.states
    if not step.materialized and (
        states is None or key is not states[0] or value is not states[1]
    ):
        raise TransformedCache(
            f"{type(module).__name__} transforms the cached keys and values before attending "
            "(latent or repeated key heads, for instance), which the packed attention cannot "
            "follow"
        )
    window = kwargs.get("sliding_window")
    if window is not None and step.end - step.start > window:  # the widest row, prompts too
        raise RuntimeError(f"a sequence is longer than the sliding window ({window} tokens)")
    softcap: float | None = kwargs.get("softcap")
    scratch.attended += 1
    _, heads, tokens, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    rows = step.decode_rows
    width = step.end - step.start
    # Materialized: ``key``/``value`` hold the running rows' caches end to end, as the model
    # transformed them, then the prompts'; else the step's own tokens (rows from the buffers).
    shift = rows * (width - 1) if step.materialized else 0
    decoded: torch.Tensor | None = None
    if rows:
        if step.materialized:
            keys, values = (
                states[0, :, : rows * width]
                .reshape(states.shape[1], rows, width, states.shape[-1])
                .transpose(0, 1)
                for states in (key, value)
            )
        else:
            keys, values = scratch.layer.decode_view(step)
        if step.decode_mask is not None and scratch.decode_bias is None:
            # An additive mask is a little faster than a boolean one in SDPA on CPU.
            scratch.decode_bias = torch.zeros(step.decode_mask.shape, dtype=query.dtype
                                              ).masked_fill_(~step.decode_mask, float("-inf"))
        # [rows, heads, dim] -> [rows, kv_heads, groups, dim]: a kv head's query heads attend
        # to it as if they were its query positions (the padding mask is the same for all).
        # The query is a transposed view of [1, tokens, heads, dim], so this copies nothing.
        queries = query.transpose(1, 2)
        if step.spans:
            queries = queries[:, :rows]
        queries = queries.reshape(rows, kv_heads, groups, dim)
        decoded = _attend(queries, keys, values, mask=scratch.decode_bias, scaling=scaling,
                          softcap=softcap)
        decoded = decoded.reshape(1, rows, heads, -1)
        if not step.spans:
            return decoded, None
    out = query.new_empty((1, tokens, heads, value.shape[-1]))
    if decoded is not None:
        out[:, :rows] = decoded
    for _, offset, length in step.spans:
        span, cached = slice(offset, offset + length), slice(offset + shift,
                                                             offset + shift + length)
        attended = _attend(query[:, :, span], key[:, :, cached], value[:, :, cached],
                           mask=None, scaling=scaling, softcap=softcap, causal=True)
        out[0, span] = attended[0].transpose(0, 1)
    return out, None


def _attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    mask: torch.Tensor | None,
    scaling: float | None,
    softcap: float | None,
    causal: bool = False,
) -> torch.Tensor:
    """Scaled dot-product attention; ``mask`` is additive; ``key``/``value`` may have fewer
    heads than ``query`` (grouped-query attention)."""
    groups = query.shape[1] // key.shape[1]
    if softcap is None:
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, is_causal=causal, scale=scaling,
            enable_gqa=groups > 1,
        )
    if groups > 1:  # as transformers' eager attention does
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores + mask
    if causal:
        length = query.shape[-2]
        future = torch.ones((length, length), dtype=torch.bool).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(weights, value)
