"""The running sequences' key/value caches, kept as one left-padded batch, in place.

Each layer's keys and values live in one preallocated buffer shaped ``[row slots, kv_heads,
token slots, head_dim]``. The batch is the view ``[:rows, :, start:end]``: every row's last real
token sits in column ``end - 1``, and a row's earlier columns, back to ``start``, are padding that
its attention mask hides. Each decode step writes one new column per row at ``end``.

Joining and leaving touch only the rows involved, never the whole cache:

- a newcomer's prefilled cache is copied into the next free row slot, right-aligned at ``end``;
- a leaver's slot is filled by moving the last row into it (row order is not meaningful: the
  batch keeps the sequence ids in row order), and ``start`` moves up to the first column some
  remaining row still uses.

The whole cache is copied only when the buffer must change shape: more row slots, more token
slots (doubling, so this is amortised), or a newcomer longer than the columns left of ``end``.
A copy also compacts: the live columns move to the front of the new buffer.

Positions are explicit: a row's next token sits at the number of real tokens it holds, never at
the padded length, so rotary and learned position embeddings see the same positions as when the
sequence runs alone. Buffers are allocated uninitialised, but a padding column becomes part of
a row's view only after it was zeroed (or copied with the row), so the zero attention weight the
mask gives it never meets a NaN left by whatever held that memory before.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Sequence
from typing import Any

import torch

__all__ = ["KVLayers", "PaddedKVBatch", "cache_layers", "new_cache"]

KVLayers = list[tuple[torch.Tensor, torch.Tensor]]
"""Per model layer, (keys, values) shaped ``[batch, kv_heads, tokens, head_dim]``."""

_TOKEN_SLACK = 16
"""Spare token columns a new buffer gets at least (it also gets as many as it holds)."""
_MIN_ROWS = 4


def new_cache(layers: KVLayers | None = None) -> object:
    """A transformers ``DynamicCache``, optionally filled with ``layers``."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for index, (keys, values) in enumerate(layers or ()):
        cache.update(keys, values, index)
    return cache


def cache_layers(cache: object) -> KVLayers:
    """The (keys, values) of each layer of a ``DynamicCache``."""
    return [(layer[0], layer[1]) for layer in cache]  # type: ignore[attr-defined]


@functools.cache
def _slot_layer_class() -> type[Any]:
    """A transformers ``DynamicLayer`` over a preallocated buffer (see the module docstring).

    The model calls ``update`` once per forward with the step's new column; the batch sets the
    view (``bind``) before each forward and has made sure the column fits.
    """
    from transformers.cache_utils import DynamicLayer

    class SlotLayer(DynamicLayer):  # type: ignore[no-untyped-call]
        def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
            super().__init__()  # type: ignore[no-untyped-call]
            self.device = keys.device
            self.is_initialized = True
            self.buffers = (keys, values)
            self.bind(0, 0, 0)

        def bind(self, rows: int, start: int, end: int) -> None:
            self._rows, self._start, self._end = rows, start, end
            keys, values = self.buffers
            # Row views stay valid until the next bind; a step only narrows their columns.
            self._row_views = (keys[:rows], values[:rows])
            self.keys = self._row_views[0].narrow(2, start, end - start)
            self.values = self._row_views[1].narrow(2, start, end - start)

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor,
                   *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
            keys, values = self._row_views
            end = self._end
            added = key_states.shape[-2]
            if key_states.shape[0] != self._rows or end + added > keys.shape[-2]:
                raise RuntimeError(
                    f"cache update of shape {tuple(key_states.shape)} does not fit the batch "
                    f"({self._rows} rows, columns {self._start}:{end} of {keys.shape[-2]})"
                )
            keys.narrow(2, end, added).copy_(key_states)
            values.narrow(2, end, added).copy_(value_states)
            self._end = end = end + added
            view = keys.narrow(2, self._start, end - self._start), values.narrow(
                2, self._start, end - self._start)
            self.keys, self.values = view
            return view

        def _unsupported(self, *args: object, **kwargs: object) -> None:
            raise NotImplementedError(
                "the running batch's cache layout is managed by PaddedKVBatch"
            )

        # Generation utilities (beam search, assisted decoding) reshape caches with these;
        # the engine never does, and they would break the buffer bookkeeping.
        crop = batch_repeat_interleave = batch_select_indices = _unsupported
        reorder_cache = reset = offload = prefetch = _unsupported

    return SlotLayer


class PaddedKVBatch:
    """Rows of sequence ids, their caches as one ``DynamicCache``, and the padding layout."""

    def __init__(self) -> None:
        self._ids: list[int] = []
        self._first: list[int] = []
        """Per row, the buffer column of its first real token."""
        self._start = 0
        self._end = 0
        self._layers: list[Any] = []
        self._cache: object | None = None
        self._mask: torch.Tensor | None = None
        """The padding mask up to the last column, built on the first step after a layout
        change and grown by one column per step."""
        self._step_mask = torch.zeros((0, 1), dtype=torch.long)
        """The mask :meth:`step_inputs` returned, which :meth:`advance` makes the mask."""
        self._first_column = torch.zeros((0, 1), dtype=torch.long)
        self._ones = torch.zeros((0, 1), dtype=torch.long)

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def ids(self) -> tuple[int, ...]:
        """Sequence ids, in row order."""
        return tuple(self._ids)

    @property
    def width(self) -> int:
        """Padded length of every row."""
        return self._end - self._start if self._ids else 0

    def lengths(self) -> list[int]:
        """Real (unpadded) tokens held by each row."""
        return [self._end - first for first in self._first]

    @property
    def capacity(self) -> tuple[int, int]:
        """(row slots, token slots) of the buffers; (0, 0) when empty."""
        if not self._layers:
            return (0, 0)
        keys = self._layers[0].buffers[0]
        return (int(keys.shape[0]), int(keys.shape[-2]))

    def clear(self) -> None:
        """Forget every row and release the buffers."""
        self._ids, self._first = [], []
        self._start = self._end = 0
        self._layers = []
        self._cache = None
        self._mask = None

    def extend(self, entries: Sequence[tuple[int, KVLayers]]) -> None:
        """Add prefilled sequences, each with its own one-row cache ``[1, heads, tokens, dim]``."""
        if not entries:
            return
        longest = max(layers[0][0].shape[-2] for _, layers in entries)
        rows = len(self._ids) + len(entries)
        if not self._layers:
            self._allocate(entries[0][1], rows, longest)
        else:
            slots, columns = self.capacity
            if rows > slots or longest > self._end:
                self._relayout(
                    slots=max(rows, 2 * slots) if rows > slots else slots,
                    left=max(0, longest - self.width),
                    columns=columns,
                )
        start = min(self._start, self._end - longest) if self._ids else self._end - longest
        for layer in self._layers:  # columns that become visible (masked) to the old rows
            for buffer in layer.buffers:
                buffer[: len(self._ids), :, start : self._start].zero_()
        self._start = start
        for seq_id, layers in entries:
            row, tokens = len(self._ids), layers[0][0].shape[-2]
            first = self._end - tokens
            for layer, (keys, values) in zip(self._layers, layers, strict=True):
                for buffer, states in zip(layer.buffers, (keys, values), strict=True):
                    buffer[row, :, start:first].zero_()
                    buffer[row, :, first : self._end].copy_(states[0])
            self._ids.append(seq_id)
            self._first.append(first)
        self._bind()

    def remove(self, seq_ids: Collection[int]) -> None:
        """Drop these sequences' rows (ids not in the batch are ignored)."""
        leaving = sorted(
            (row for row, seq_id in enumerate(self._ids) if seq_id in seq_ids), reverse=True
        )
        if len(leaving) == len(self._ids):
            if leaving:
                self.clear()
            return
        for row in leaving:  # descending, so the last row is never one still to leave
            last = len(self._ids) - 1
            if row != last:
                for layer in self._layers:
                    for buffer in layer.buffers:
                        buffer[row, :, self._start : self._end].copy_(
                            buffer[last, :, self._start : self._end]
                        )
                self._ids[row], self._first[row] = self._ids[last], self._first[last]
            self._ids.pop()
            self._first.pop()
        # Columns that are padding in every remaining row hold nothing anyone attends to.
        self._start = min(self._first)
        self._bind()

    def step_inputs(self) -> tuple[object, torch.Tensor, torch.Tensor]:
        """The cache, attention mask (with the new token's column) and position ids of one
        decode step. Call :meth:`advance` once the model has run."""
        if self._cache is None or not self._ids:
            raise RuntimeError("decode step on an empty batch")
        slots, columns = self.capacity
        if self._end >= columns:  # compact; give back row slots a busy spell left unused
            rows = len(self._ids)
            self._relayout(slots=slots if 4 * rows > slots else max(_MIN_ROWS, 2 * rows),
                           left=0, columns=0)
        if self._mask is None:
            self._mask = self._layout_mask()
        self._step_mask = torch.cat([self._mask, self._ones], dim=1)
        return self._cache, self._step_mask, self._end - self._first_column

    def advance(self) -> None:
        """Record that the model appended one token to every row of the cache (each layer's
        view already grew in its ``update``)."""
        self._mask = self._step_mask
        self._end += 1

    def _layout_mask(self) -> torch.Tensor:
        """The padding mask of the current rows and columns; also refreshes the per-row
        tensors the decode steps reuse until the layout changes."""
        self._first_column = torch.tensor(self._first, dtype=torch.long).unsqueeze(1)
        self._ones = torch.ones((len(self._ids), 1), dtype=torch.long)
        columns = torch.arange(self._start, self._end, dtype=torch.long)
        return (columns.unsqueeze(0) >= self._first_column).long()

    def _allocate(self, like: KVLayers, rows: int, longest: int) -> None:
        slot_layer = _slot_layer_class()
        columns = 2 * longest + _TOKEN_SLACK
        self._layers = [
            slot_layer(*(
                states.new_empty((max(rows, _MIN_ROWS), states.shape[1], columns,
                                  states.shape[-1]))
                for states in (keys, values)
            ))
            for keys, values in like
        ]
        from transformers import DynamicCache

        cache = DynamicCache()
        cache.layers = self._layers
        self._cache = cache
        self._start = self._end = longest

    def _relayout(self, *, slots: int, left: int, columns: int) -> None:
        """Copy the live rows into new buffers with ``slots`` rows, their columns starting at
        ``left``, and room to grow (at least ``columns`` token slots)."""
        rows, width = len(self._ids), self.width
        columns = max(columns, left + 2 * width + _TOKEN_SLACK)
        for layer in self._layers:
            moved = []
            for buffer in layer.buffers:
                new = buffer.new_empty((slots, buffer.shape[1], columns, buffer.shape[-1]))
                new[:rows, :, left : left + width].copy_(
                    buffer[:rows, :, self._start : self._end]
                )
                moved.append(new)
            layer.buffers = (moved[0], moved[1])
            layer.bind(rows, left, left + width)  # drops this layer's old buffers now
        shift = left - self._start
        self._first = [first + shift for first in self._first]
        self._start, self._end = left, left + width
        self._bind()

    def _bind(self) -> None:
        self._mask = None
        for layer in self._layers:
            layer.bind(len(self._ids), self._start, self._end)
