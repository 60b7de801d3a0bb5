"""The layout of the running sequences' key/value caches, kept as one padded batch in place,
and of the packed step that decodes them and prefills newcomers in a single forward: row slots,
padding and positions, over plain tensors (the transformers cache over these buffers is
:mod:`tidegate.generation.kvbatch`).

Each layer's keys and values live in one preallocated buffer shaped ``[row slots, kv_heads,
token slots, head_dim]``. The batch is the view ``[:rows, :, start:end]``: every row's last real
token sits in column ``end - 1``, and a row's earlier columns, back to ``start``, are padding
that its attention mask hides.

**A step is one forward over one packed row of tokens**: first the last sampled token of every
running row (when the step decodes), then each newcomer's whole prompt. :meth:`KVLayout.begin`
lays the step out: it gives each newcomer a free row slot, right-aligned so that its last prompt
token shares the column of the running rows' new token, and returns the packed position ids and
the packed indices whose logits are needed. During the forward, each layer's cache ``update``
(:mod:`tidegate.generation.kvbatch`) writes the step's keys and values straight into the buffers
(the running rows' new column, the newcomers' prompts into their rows), and tidegate's attention
function (:mod:`tidegate.generation.attention`) attends each running token to its row and each
prompt causally to itself; the two meet in the batch's :class:`StepScratch`.
:meth:`KVLayout.commit` then makes the step part of the batch; :meth:`KVLayout.abort` forgets
it after a failed forward. A newcomer therefore costs no forward of its own: only its tokens' share
of the step's products.

Joining and leaving touch only the rows involved, never the whole cache:

- a newcomer's prompt goes into the next free row slot;
- a leaver's slot is filled by moving the last row into it (row order is not meaningful: the
  batch keeps the sequence ids in row order), and ``start`` moves up to the first column some
  remaining row still uses.

The whole cache is copied only when the buffer must change shape: more row slots, more token
slots (doubling, so this is amortised), or a newcomer longer than the columns left of ``end``.
A copy also compacts: the live columns move to the front of the new buffer.

Positions are explicit: a row's next token sits at the number of real tokens it holds, never at
the padded length, so rotary and learned position embeddings see the same positions as when the
sequence runs alone. Buffers are allocated uninitialised (except the first, which a layer
allocates zeroed at its first update), but a padding column becomes part of a row's view only
after it was zeroed (or copied with the row), so the zero attention weight the mask gives it
never meets a NaN left by whatever held that memory before.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

__all__ = ["BufferedLayer", "KVLayout", "PackedInputs", "PackedStep", "StepScratch"]

_TOKEN_SLACK = 16
"""Spare token columns a new buffer gets at least (it also gets as many as it holds)."""
_MIN_ROWS = 4


@dataclass(slots=True)
class PackedStep:
    """The layout of one step's packed row, read by the cache layers and the attention (it is
    not written during the step: what the forward leaves behind goes to :class:`StepScratch`)."""

    decode_rows: int
    """Running rows that decode this step: the first ``decode_rows`` packed tokens, in row
    order, one per row."""
    column: int
    """The buffer column their new tokens go to."""
    start: int
    """First buffer column any row uses after the step."""
    end: int
    """The column after the step's last token, in every row."""
    spans: tuple[tuple[int, int, int], ...]
    """Per newcomer: (row slot, offset of its prompt in the packed row, prompt tokens)."""
    tokens: int
    """Length of the packed row."""
    decode_mask: torch.Tensor | None
    """``[decode_rows, 1, 1, end - start]``, True where a running row has a real token; None
    when no running row has padding."""
    materialized: bool = False
    """The cache update returns the running rows' whole caches, not just the step's tokens:
    ``[1, kv_heads, decode_rows * (end - start) + prompt tokens, dim]``, each running row's
    columns ``start:end`` in row order, then the prompts (see :class:`PaddedKVBatch`)."""
@dataclass(slots=True)
class StepScratch:
    """What one forward's cache updates and packed attention calls leave for each other.

    transformers calls the cache update and then the attention function of each layer, and
    neither call can carry tidegate's arguments; so the batch owns one of these, resets it at
    :meth:`KVLayout.begin`, hands it to the cache layers when they are made, and the attention
    reads it through :class:`tidegate.generation.attention.PackedAttention`, which installs it
    for the forward. One object per batch, reused every step: the hot path allocates nothing.
    """

    step: PackedStep | None = None
    """The step in progress (between :meth:`KVLayout.begin` and its commit or abort)."""
    layer: Any = None
    """The cache layer the model updated last: the attention that follows reads its rows."""
    states: tuple[torch.Tensor, torch.Tensor] | None = None
    """The keys and values that layer's update returned, which the attention must receive."""
    decode_bias: torch.Tensor | None = None
    """The step's decode mask as an additive bias in the model's dtype, made by the first
    attention call of the step."""
    updates: int = 0
    """Cache updates so far in this step."""
    attended: int = 0
    """Packed attention calls so far in this step (one per update, or the model bypassed the
    attention interface)."""

    def start(self, step: PackedStep | None) -> None:
        self.step = step
        self.layer = self.states = self.decode_bias = None
        self.updates = self.attended = 0


@dataclass(frozen=True, slots=True)
class PackedInputs:
    cache: Any
    """The transformers cache to pass to the model."""
    position_ids: torch.Tensor
    """``[1, tokens]``: each packed token's position in its own sequence."""
    logits_index: torch.Tensor
    """Packed indices whose logits the step needs: each running row's token, then each
    newcomer's last prompt token (ascending)."""
    step: PackedStep
    scratch: StepScratch
    """The batch's scratch, reset for this step: give it to :meth:`PackedAttention.run`."""


class BufferedLayer(Protocol):
    """One model layer's keys and values buffers, as the layout sees a cache layer."""

    @property
    def buffers(self) -> tuple[torch.Tensor, torch.Tensor] | None: ...
    @buffers.setter
    def buffers(self, buffers: tuple[torch.Tensor, torch.Tensor] | None) -> None: ...


@functools.lru_cache(maxsize=64)
def _rows_index(rows: int) -> torch.Tensor:
    """``0..rows-1``: the logits a decode-only step keeps (shared, never written)."""
    return torch.arange(rows, dtype=torch.long)



class KVLayout:
    """Rows of sequence ids, their caches in per-layer buffers, and the padding layout.

    The model's cache object over the buffers comes from ``new_cache`` (given the list the
    cache fills with one :class:`BufferedLayer` per model layer, at the model's first update):
    :class:`tidegate.generation.kvbatch.PaddedKVBatch` is this layout with transformers' cache.

    With ``materialized``, each layer's cache update hands the model the running rows' whole
    caches instead of the step's own keys and values, for models that transform what they read
    from the cache before attending (latent attention expands compressed keys, JetMoE repeats
    key heads). That copies every row's cache once per layer and step, as a plain
    ``DynamicCache`` would; other models never pay for it.
    """

    def __init__(self, new_cache: Callable[[list[BufferedLayer]], object], *,
                 materialized: bool = False) -> None:
        self.materialized = materialized
        self._new_cache = new_cache
        self.scratch = StepScratch()
        """Shared by this batch's cache layers and the attention during each step."""
        self._ids: list[int] = []
        self._first: list[int] = []
        """Per row, the buffer column of its first real token."""
        self._start = 0
        self._end = 0
        self._slots = 0
        self._columns = 0
        self._layers: list[BufferedLayer] = []
        """One layer per model layer, created by the cache at the model's first update."""
        self._cache: object = None
        self._first_column: torch.Tensor | None = None
        """``self._first`` as a ``[rows, 1]`` tensor, until the rows change."""
        self._joining: list[tuple[int, int]] = []
        """(sequence id, first column) of the step's newcomers, until it is committed."""

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
        return (self._slots, self._columns)

    @property
    def active_step(self) -> PackedStep | None:
        """The step between :meth:`begin` and :meth:`commit` or :meth:`abort`."""
        return self.scratch.step

    def layer_buffers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's (keys, values) buffers."""
        return [layer.buffers for layer in self._layers if layer.buffers is not None]

    def views(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's live (keys, values), ``[rows, kv_heads, width, head_dim]``, rows in
        :attr:`ids` order (for inspection)."""
        rows, width = len(self._ids), self.width
        return [(keys[:rows].narrow(2, self._start, width),
                 values[:rows].narrow(2, self._start, width))
                for keys, values in self.layer_buffers()]

    def clear(self) -> None:
        """Forget every row and release the buffers."""
        self._ids, self._first = [], []
        self._start = self._end = self._slots = self._columns = 0
        self._layers = []
        self._cache = None
        self._first_column = None
        self.scratch.start(None)
        self._joining = []

    def begin(self, *, decode: bool, prompts: Sequence[tuple[int, int]]) -> PackedInputs:
        """Lay out one step: every running row decodes one token if ``decode``, and each
        ``(sequence id, prompt tokens)`` newcomer joins. The packed row the model gets holds the
        running rows' tokens in row order, then the prompts in the order given."""
        if self.scratch.step is not None:
            raise RuntimeError("a step is already in progress")
        if decode and not self._ids:
            raise RuntimeError("decode step on an empty batch")
        if not decode and not prompts:
            raise RuntimeError("a step must decode or prefill something")
        rows = len(self._ids)
        longest = max((tokens for _, tokens in prompts), default=0)
        added = 1 if decode else 0
        if rows:
            self._fit(rows + len(prompts), longest, added)
        else:  # the layers allocate these at their first update
            self._layers = []
            self._cache = self._new_cache(self._layers)
            self._slots = max(len(prompts), _MIN_ROWS)
            self._columns = 2 * longest + _TOKEN_SLACK
            self._start = self._end = longest
        end = self._end + added
        start = min(self._start, end - longest) if prompts else self._start
        spans = []
        offset = rows if decode else 0
        positions: list[int] = [self._end - first for first in self._first] if decode else []
        keep = list(range(offset))
        joining = []
        for index, (seq_id, tokens) in enumerate(prompts):
            spans.append((rows + index, offset, tokens))
            positions.extend(range(tokens))
            offset += tokens
            keep.append(offset - 1)
            joining.append((seq_id, end - tokens))
        for buffer in (b for pair in self.layer_buffers() for b in pair) if spans else ():
            if start < self._start:  # columns that become visible (masked) to old rows
                buffer[:rows, :, start : self._start].zero_()
            for row, _, tokens in spans:  # newcomers' padding
                buffer[row, :, start : end - tokens].zero_()
        step = PackedStep(
            decode_rows=rows if decode else 0, column=self._end, start=start, end=end,
            spans=tuple(spans), tokens=offset,
            decode_mask=self._decode_mask(start, end) if decode else None,
            materialized=self.materialized,
        )
        self.scratch.start(step)
        self._joining = joining
        return PackedInputs(
            cache=self._cache,
            position_ids=torch.tensor([positions], dtype=torch.long),
            logits_index=_rows_index(rows) if not spans else torch.tensor(keep,
                                                                           dtype=torch.long),
            step=step,
            scratch=self.scratch,
        )

    def commit(self) -> None:
        """The model ran the step: its tokens are now part of every row, its newcomers rows."""
        scratch = self.scratch
        step = scratch.step
        if step is None:
            raise RuntimeError("no step to commit")
        if scratch.updates == 0:
            raise RuntimeError("the model did not write the step into the cache")
        for seq_id, first in self._joining:
            self._ids.append(seq_id)
            self._first.append(first)
        if self._joining:
            self._first_column = None
        self._start, self._end = step.start, step.end
        scratch.start(None)
        self._joining = []

    def abort(self) -> None:
        """Forget the step in progress: the rows are as before it began."""
        self.scratch.start(None)
        self._joining = []
        if not self._ids:
            self.clear()

    def remove(self, seq_ids: Collection[int]) -> None:
        """Drop these sequences' rows (ids not in the batch are ignored)."""
        if self.scratch.step is not None:
            raise RuntimeError("rows cannot leave during a step")
        leaving = sorted(
            (row for row, seq_id in enumerate(self._ids) if seq_id in seq_ids), reverse=True
        )
        if len(leaving) == len(self._ids):
            if leaving:
                self.clear()
            return
        if not leaving:
            return
        for row in leaving:  # descending, so the last row is never one still to leave
            last = len(self._ids) - 1
            if row != last:
                for keys, values in self.layer_buffers():
                    for buffer in (keys, values):
                        buffer[row, :, self._start : self._end].copy_(
                            buffer[last, :, self._start : self._end]
                        )
                self._ids[row], self._first[row] = self._ids[last], self._first[last]
            self._ids.pop()
            self._first.pop()
        # Columns that are padding in every remaining row hold nothing anyone attends to.
        self._start = min(self._first)
        self._first_column = None

    def _decode_mask(self, start: int, end: int) -> torch.Tensor | None:
        if max(self._first) == start:
            return None
        if self._first_column is None:
            self._first_column = torch.tensor(self._first, dtype=torch.long).unsqueeze(1)
        columns = torch.arange(start, end, dtype=torch.long)
        return (columns.unsqueeze(0) >= self._first_column).view(len(self._ids), 1, 1, -1)

    def _fit(self, rows: int, longest: int, added: int) -> None:
        """Make the buffers hold ``rows`` rows, a column for the running rows' new token
        (``added``) and a newcomer of ``longest`` tokens right-aligned with it."""
        slots, columns = self._slots, self._columns
        end = self._end + added
        if rows <= slots and end <= columns and longest <= end:
            return
        if rows > slots:
            slots = max(rows, 2 * slots)
        elif 4 * rows <= slots:  # give back row slots a busy spell left unused
            slots = max(_MIN_ROWS, 2 * rows)
        self._relayout(slots=slots, left=max(0, longest - self.width - added),
                       columns=columns if end <= columns else 0)

    def _relayout(self, *, slots: int, left: int, columns: int) -> None:
        """Copy the live rows into new buffers with ``slots`` rows, their columns starting at
        ``left``, and room to grow (at least ``columns`` token slots)."""
        rows, width = len(self._ids), self.width
        columns = max(columns, left + 2 * width + _TOKEN_SLACK)
        for layer in self._layers:
            if layer.buffers is None:
                continue
            moved = []
            for buffer in layer.buffers:
                new = buffer.new_empty((slots, buffer.shape[1], columns, buffer.shape[-1]))
                new[:rows, :, left : left + width].copy_(
                    buffer[:rows, :, self._start : self._end]
                )
                moved.append(new)
            layer.buffers = (moved[0], moved[1])  # drops this layer's old buffers now
        shift = left - self._start
        self._first = [first + shift for first in self._first]
        self._first_column = None
        self._start, self._end = left, left + width
        self._slots, self._columns = slots, columns
