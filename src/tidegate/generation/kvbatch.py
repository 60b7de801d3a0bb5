"""The running batch's transformers cache: a ``DynamicCache`` whose layers are the padded
batch's per-layer buffers (:mod:`tidegate.generation.kvlayout` lays them out).

During a packed step each layer's cache ``update`` writes the step's keys and values straight
into the buffers (the running rows' new column, the newcomers' prompts into their rows) and
leaves what it returned in the batch's :class:`~tidegate.generation.kvlayout.StepScratch` for
the packed attention that follows (:mod:`tidegate.generation.attention`). The cache operations
generation utilities use to reshape a cache (beam search, assisted decoding) are refused: the
engine never calls them and they would break the layout's bookkeeping.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from tidegate.generation.kvlayout import (
    BufferedLayer,
    KVLayout,
    PackedInputs,
    PackedStep,
    StepScratch,
)

__all__ = ["PackedInputs", "PackedStep", "PaddedKVBatch", "StepScratch"]


class PaddedKVBatch(KVLayout):
    """The padded batch whose steps hand the model a transformers cache over its buffers.

    With ``materialized``, each layer's cache update hands the model the running rows' whole
    caches instead of the step's own keys and values, for models that transform what they read
    from the cache before attending (latent attention expands compressed keys, JetMoE repeats
    key heads). That copies every row's cache once per layer and step, as a plain
    ``DynamicCache`` would; other models never pay for it.
    """

    def __init__(self, *, materialized: bool = False) -> None:
        super().__init__(self._slot_cache, materialized=materialized)

    def _slot_cache(self, layers: list[BufferedLayer]) -> Any:
        """A ``DynamicCache`` whose layers are ``layers``, filled with slot layers of this
        batch as the model first updates each one."""
        return _slot_cache_class()(layers, self)


@functools.cache
def _slot_layer_class() -> type[Any]:
    """A transformers ``DynamicLayer`` over the batch's preallocated buffers of one layer
    (a :class:`~tidegate.generation.kvlayout.BufferedLayer`)."""
    from transformers.cache_utils import DynamicLayer

    class SlotLayer(DynamicLayer):  # type: ignore[no-untyped-call]
        def __init__(self, batch: KVLayout) -> None:
            super().__init__()  # type: ignore[no-untyped-call]
            self._batch = batch
            self._scratch = batch.scratch
            self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None
            self._geometry: list[tuple[tuple[int, ...], int, int, int]] = []
            """Per buffer: strides, storage offset, heads, dim (views are made from these)."""

        @property
        def buffers(self) -> tuple[torch.Tensor, torch.Tensor] | None:
            return self._buffers

        @buffers.setter
        def buffers(self, buffers: tuple[torch.Tensor, torch.Tensor] | None) -> None:
            self._buffers = buffers
            self._geometry = [(b.stride(), int(b.storage_offset()), b.shape[1], b.shape[3])
                              for b in buffers or ()]

        def _columns(self, rows: int, start: int, width: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
            """``buffer[:rows, :, start:start + width]`` of both buffers, made directly (a
            decode step needs these per layer; ``as_strided`` is the cheapest way)."""
            assert self._buffers is not None
            keys, values = self._buffers
            (k_strides, k_offset, k_heads, k_dim), (v_strides, v_offset, v_heads, v_dim) = (
                self._geometry)
            return (
                keys.as_strided((rows, k_heads, width, k_dim), k_strides,
                                k_offset + start * k_strides[2]),
                values.as_strided((rows, v_heads, width, v_dim), v_strides,
                                  v_offset + start * v_strides[2]),
            )

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor,
                   *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
            scratch = self._scratch
            step = scratch.step
            if step is None:
                raise RuntimeError("the batch's cache is written only during a packed step")
            if key_states.shape[0] != 1 or key_states.shape[-2] != step.tokens:
                raise RuntimeError(
                    f"cache update of shape {tuple(key_states.shape)} does not match the "
                    f"packed step of {step.tokens} tokens"
                )
            if self.buffers is None:  # the batch's first step: allocate, zeroed
                slots, columns = self._batch.capacity
                self.buffers = (
                    key_states.new_zeros((slots, key_states.shape[1], columns,
                                          key_states.shape[-1])),
                    value_states.new_zeros((slots, value_states.shape[1], columns,
                                            value_states.shape[-1])),
                )
                self.device = key_states.device
                self.is_initialized = True
            decoding = step.decode_rows
            if decoding:  # [1, heads, rows, dim] -> the rows' new column [rows, heads, 1, dim]
                for column, states in zip(self._columns(decoding, step.column, 1),
                                          (key_states, value_states), strict=True):
                    running = states[:, :, :decoding] if step.spans else states
                    column.copy_(running.transpose(0, 2))
            if step.spans:
                for buffer, states in zip(self.buffers, (key_states, value_states),
                                          strict=True):
                    for row, offset, tokens in step.spans:
                        buffer[row, :, step.end - tokens : step.end].copy_(
                            states[0, :, offset : offset + tokens])
            if step.materialized:
                key_states, value_states = (
                    _materialized(buffer, states, step)
                    for buffer, states in zip(self.buffers, (key_states, value_states),
                                              strict=True)
                )
            scratch.layer = self
            scratch.states = (key_states, value_states)
            scratch.updates += 1
            return key_states, value_states

        def decode_view(self, step: PackedStep) -> tuple[torch.Tensor, torch.Tensor]:
            """The running rows' keys and values, this step's column included."""
            if self.buffers is None:
                raise RuntimeError("decode view of a layer that holds nothing")
            keys, values = self._columns(step.decode_rows, step.start, step.end - step.start)
            return keys, values

        def get_seq_length(self, *args: object, **kwargs: object) -> int:
            return self._batch.width

        def _unsupported(self, *args: object, **kwargs: object) -> None:
            raise NotImplementedError(
                "the running batch's cache layout is managed by PaddedKVBatch"
            )

        # Generation utilities (beam search, assisted decoding) reshape caches with these;
        # the engine never does, and they would break the buffer bookkeeping.
        crop = batch_repeat_interleave = batch_select_indices = _unsupported
        reorder_cache = reset = offload = prefetch = _unsupported

    return SlotLayer


def _materialized(buffer: torch.Tensor, states: torch.Tensor, step: PackedStep) -> torch.Tensor:
    """The running rows' caches (this step's column included) laid end to end along the token
    axis, then the newcomers' prompts: ``[1, heads, rows * width + prompt tokens, dim]``."""
    rows, width = step.decode_rows, step.end - step.start
    parts = []
    if rows:
        view = buffer[:rows].narrow(2, step.start, width)
        parts.append(view.transpose(0, 1).reshape(1, view.shape[1], rows * width, -1))
    if step.spans:
        parts.append(states[:, :, rows:])
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


@functools.cache
def _slot_cache_class() -> type[Any]:
    from transformers import DynamicCache

    slot_layer = _slot_layer_class()

    class SlotCache(DynamicCache):
        def __init__(self, layers: list[Any], batch: KVLayout) -> None:
            super().__init__()
            self.layers = layers
            self.layer_class_to_replicate = None
            self._batch = batch

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor,
                   layer_idx: int, *args: object, **kwargs: object
                   ) -> tuple[torch.Tensor, torch.Tensor]:
            while len(self.layers) <= layer_idx:
                self.layers.append(slot_layer(self._batch))
            layer: Any = self.layers[layer_idx]
            keys, values = layer.update(key_states, value_states)
            return keys, values

    return SlotCache
