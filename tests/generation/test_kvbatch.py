"""The padded batch's layout bookkeeping, on plain tensors: each step writes what a model's
cache updates would (the model-level checks are test_packed_step.py and the greedy identity
tests in test_engine.py)."""

from __future__ import annotations

import torch

from tidegate.generation.kvbatch import PackedInputs, PaddedKVBatch

HEADS, DIM, LAYERS = 2, 4, 2


def run_step(batch: PaddedKVBatch, decode: float | None = None,
             joining: dict[int, list[float]] | None = None) -> PackedInputs:
    """One packed forward as the model does it: every layer's cache update gets the packed
    row's keys (each token's value) and values (+100), then the step is committed."""
    joining = joining or {}
    inputs = batch.begin(decode=decode is not None,
                         prompts=[(seq_id, len(values)) for seq_id, values in joining.items()])
    packed = [decode] * inputs.step.decode_rows + [v for vs in joining.values() for v in vs]
    states = torch.tensor(packed).view(1, 1, -1, 1).expand(1, HEADS, len(packed), DIM)
    for layer in range(LAYERS):
        inputs.cache.update(states, states + 100, layer)
    batch.commit()
    return inputs


def filled(tokens: int, value: float) -> list[float]:
    return [value] * tokens


def rows_by_id(batch: PaddedKVBatch, layer: int = 0) -> dict[int, torch.Tensor]:
    keys = batch.views()[layer][0]
    return {seq_id: keys[row] for row, seq_id in enumerate(batch.ids)}


def buffer_pointer(batch: PaddedKVBatch) -> int:
    return int(batch.layer_buffers()[0][0].untyped_storage().data_ptr())


def test_join_left_pads_and_leave_trims() -> None:
    batch = PaddedKVBatch()
    first = run_step(batch, joining={1: filled(3, 1.0), 2: filled(7, 2.0)})
    assert first.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 5, 6]]
    assert first.logits_index.tolist() == [2, 9]  # each prompt's last token
    assert (batch.ids, batch.width, batch.lengths()) == ((1, 2), 7, [3, 7])
    keys = batch.views()[0][0]
    assert keys.shape == (2, HEADS, 7, DIM)
    assert torch.all(keys[0, :, :4] == 0) and torch.all(keys[0, :, 4:] == 1)

    step = batch.begin(decode=True, prompts=[])
    assert step.position_ids.tolist() == [[3, 7]] and step.logits_index.tolist() == [0, 1]
    assert step.step.decode_mask is not None
    assert step.step.decode_mask.flatten(1).tolist() == [[False] * 4 + [True] * 4, [True] * 8]
    batch.abort()

    run_step(batch, joining={3: filled(2, 3.0)})  # joins without a decode
    assert (batch.ids, batch.width, batch.lengths()) == ((1, 2, 3), 7, [3, 7, 2])
    batch.remove({2})
    assert (sorted(batch.ids), batch.width) == ([1, 3], 3)
    assert dict(zip(batch.ids, batch.lengths(), strict=True)) == {1: 3, 3: 2}
    keys, values = batch.views()[1]
    row_of = {seq_id: row for row, seq_id in enumerate(batch.ids)}
    assert torch.all(keys[row_of[1]] == 1)
    assert torch.all(values[row_of[3], :, 1:] == 103) and torch.all(values[row_of[3], :, 0] == 0)
    batch.remove({1, 3, 99})
    assert (len(batch), batch.width, batch.capacity) == (0, 0, (0, 0))


def test_a_newcomer_joins_a_decode_step_aligned_with_the_new_column() -> None:
    batch = PaddedKVBatch()
    run_step(batch, joining={1: filled(3, 1.0), 2: filled(5, 2.0)})
    mixed = run_step(batch, decode=50.0, joining={3: [7.0, 8.0, 9.0, 10.0]})
    # Running rows first (their own positions), then the prompt from position 0.
    assert mixed.position_ids.tolist() == [[3, 5, 0, 1, 2, 3]]
    assert mixed.logits_index.tolist() == [0, 1, 5]
    assert dict(zip(batch.ids, batch.lengths(), strict=True)) == {1: 4, 2: 6, 3: 4}
    rows = rows_by_id(batch)
    assert rows[3][0, :, 0].tolist() == [0.0, 0.0, 7.0, 8.0, 9.0, 10.0]
    assert rows[1][0, :, 0].tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 50.0]
    assert rows[2][0, :, 0].tolist() == [2.0] * 5 + [50.0]


def test_join_and_leave_copy_only_their_own_rows() -> None:
    batch = PaddedKVBatch()
    run_step(batch, joining={seq_id: filled(5, float(seq_id)) for seq_id in range(1, 5)})
    pointer = buffer_pointer(batch)
    run_step(batch, decode=50.0)
    batch.remove({2})  # the last row (4) moves into row 1; nothing else is copied
    assert batch.ids == (1, 4, 3)
    run_step(batch, decode=60.0, joining={9: filled(3, 9.0)})  # fits under the width
    assert buffer_pointer(batch) == pointer, "join and leave must not reallocate the cache"
    rows = rows_by_id(batch)
    for seq_id in (1, 3, 4):
        assert rows[seq_id][0, :, 0].tolist() == [float(seq_id)] * 5 + [50.0, 60.0]
    assert rows[9][0, :, 0].tolist() == [0.0] * 4 + [9.0] * 3
    assert dict(zip(batch.ids, batch.lengths(), strict=True)) == {1: 7, 4: 7, 3: 7, 9: 3}


def test_a_longer_newcomer_widens_the_batch_and_masks_the_new_columns() -> None:
    batch = PaddedKVBatch()
    run_step(batch, joining={1: filled(2, 1.0)})
    run_step(batch, decode=5.0, joining={2: filled(30, 2.0)})  # longer than the columns left
    assert (batch.width, batch.lengths()) == (30, [3, 30])
    keys = batch.views()[0][0]
    assert torch.all(keys[0, :, :27] == 0) and keys[0, 0, 27:, 0].tolist() == [1.0, 1.0, 5.0]
    step = batch.begin(decode=True, prompts=[])
    assert step.step.decode_mask is not None
    assert step.step.decode_mask[0].flatten().tolist() == [False] * 27 + [True] * 4
    assert step.position_ids.flatten().tolist() == [3, 30]


def test_a_reused_row_never_exposes_its_previous_sequence() -> None:
    batch = PaddedKVBatch()
    run_step(batch, joining={1: filled(6, 1.0), 2: filled(6, float("nan"))})
    batch.remove({2})
    run_step(batch, decode=0.0, joining={3: filled(2, 3.0)})  # takes row 1, which held NaN
    rows = rows_by_id(batch)
    assert rows[3][0, :, 0].tolist() == [0.0] * 5 + [3.0, 3.0]
    assert not torch.isnan(batch.views()[0][0]).any()


def test_a_failed_step_leaves_the_rows_as_they_were() -> None:
    batch = PaddedKVBatch()
    run_step(batch, joining={1: filled(4, 1.0)})
    batch.begin(decode=True, prompts=[(2, 9)])
    batch.abort()  # the forward raised
    assert (batch.ids, batch.lengths()) == ((1,), [4])
    run_step(batch, decode=7.0)
    assert rows_by_id(batch)[1][0, :, 0].tolist() == [1.0] * 4 + [7.0]
    empty = PaddedKVBatch()
    empty.begin(decode=False, prompts=[(1, 3)])
    empty.abort()
    assert (len(empty), empty.capacity) == (0, (0, 0))


def test_decoding_past_the_capacity_compacts_and_keeps_every_value() -> None:
    batch = PaddedKVBatch()
    run_step(batch, joining={1: filled(4, 1.0), 2: filled(8, 2.0)})
    expected = {1: [1.0] * 4, 2: [2.0] * 8}
    for step in range(200):
        if step == 20:
            batch.remove({2})  # the batch's start moves up; compaction reclaims it later
            del expected[2]
        run_step(batch, decode=float(step))
        for values in expected.values():
            values.append(float(step))
        _, columns = batch.capacity
        assert columns <= 2 * batch.width + 16 + 1 or step < 20
    rows = rows_by_id(batch)
    assert batch.lengths() == [len(expected[1])]
    assert rows[1][0, :, 0].tolist() == expected[1]
    assert batch.width == len(expected[1])


def test_random_joins_leaves_and_steps_keep_every_row_exact() -> None:
    """Against a plain model of the batch: each sequence's own tokens, in order, must be what
    its row holds right-aligned at the batch's end, with zeros (masked) before them."""
    rng = torch.Generator().manual_seed(7)
    batch = PaddedKVBatch()
    expected: dict[int, list[float]] = {}
    next_id = 0

    def randint(high: int) -> int:
        return int(torch.randint(high, (1,), generator=rng))

    for step in range(300):
        if expected and randint(4) == 0:  # some leave
            leaving = {seq_id for seq_id in expected if randint(3) == 0}
            batch.remove(leaving | {10_000})
            for seq_id in leaving:
                del expected[seq_id]
        decode = float(-step) if expected else None
        joining = {}
        if randint(3) == 0 or not expected:  # some join, up to longer than the batch
            for _ in range(1 + randint(3)):
                tokens = 1 + randint(40)
                joining[next_id] = [float(next_id * 1000 + i) for i in range(tokens)]
                next_id += 1
        inputs = batch.begin(decode=decode is not None,
                             prompts=[(seq_id, len(v)) for seq_id, v in joining.items()])
        mask = inputs.step.decode_mask
        batch.abort()
        run_step(batch, decode=decode, joining=joining)
        for values in expected.values():
            values.append(float(-step))
        expected.update(joining)
        lengths = dict(zip(batch.ids, batch.lengths(), strict=True))
        assert lengths == {seq_id: len(values) for seq_id, values in expected.items()}
        assert batch.width == max(lengths.values())
        keys = rows_by_id(batch)
        for row, seq_id in enumerate(batch.ids):
            values = expected[seq_id]
            pad = batch.width - len(values)
            assert keys[seq_id][0, :pad, 0].tolist() == [0.0] * pad
            assert keys[seq_id][0, pad:, 0].tolist() == values
            if mask is not None and seq_id not in joining:  # the step's padding mask
                visible = mask[row].flatten().tolist()
                assert visible == [False] * (len(visible) - len(values)) + [True] * len(values)
    assert next_id > 50


def test_compaction_gives_back_row_slots_after_a_busy_spell() -> None:
    batch = PaddedKVBatch()
    run_step(batch, joining={seq_id: filled(3, float(seq_id)) for seq_id in range(20)})
    assert batch.capacity[0] >= 20
    batch.remove(set(range(2, 20)))
    step = 0
    while batch.capacity[0] >= 20:  # the next compaction shrinks the rows too
        run_step(batch, decode=0.0)
        step += 1
        assert step < 100, f"row slots still {batch.capacity[0]} after 100 steps"
    assert batch.capacity[0] == 4 and sorted(batch.ids) == [0, 1]
    rows = rows_by_id(batch)
    assert torch.all(rows[0][:, :3] == 0) and torch.all(rows[1][:, :3] == 1)
