"""The padded batch's layout bookkeeping, on plain tensors (the model-level check is the greedy
identity test in test_engine.py)."""

from __future__ import annotations

import torch

from tidegate.generation.kvbatch import KVLayers, PaddedKVBatch, cache_layers


def single(tokens: int, value: float, layers: int = 2) -> KVLayers:
    filled = torch.full((1, 2, tokens, 4), value)
    return [(filled, filled + 100) for _ in range(layers)]


def rows_by_id(batch: PaddedKVBatch, layer: int = 0) -> dict[int, torch.Tensor]:
    keys = cache_layers(batch.step_inputs()[0])[layer][0]
    return {seq_id: keys[row] for row, seq_id in enumerate(batch.ids)}


def decode_step(batch: PaddedKVBatch, value: float) -> torch.Tensor:
    """What the model does in one forward: append one column to every layer, then advance."""
    cache, mask, _ = batch.step_inputs()
    column = torch.full((len(batch), 2, 1, 4), value)
    for index in range(len(cache_layers(cache))):
        cache.update(column, column + 100, index)  # type: ignore[attr-defined]
    batch.advance()
    return mask


def buffer_pointer(batch: PaddedKVBatch) -> int:
    return int(cache_layers(batch.step_inputs()[0])[0][0].untyped_storage().data_ptr())


def test_join_left_pads_and_leave_trims() -> None:
    batch = PaddedKVBatch()
    batch.extend([(1, single(3, 1.0)), (2, single(7, 2.0))])
    assert (batch.ids, batch.width, batch.lengths()) == ((1, 2), 7, [3, 7])
    cache, mask, positions = batch.step_inputs()
    keys = cache_layers(cache)[0][0]
    assert keys.shape == (2, 2, 7, 4)
    assert torch.all(keys[0, :, :4] == 0) and torch.all(keys[0, :, 4:] == 1)
    assert mask.tolist() == [[0, 0, 0, 0, 1, 1, 1, 1], [1] * 8]
    assert positions.flatten().tolist() == [3, 7]

    batch.extend([(3, single(2, 3.0))])
    assert (batch.ids, batch.width, batch.lengths()) == ((1, 2, 3), 7, [3, 7, 2])
    batch.remove({2})
    assert (sorted(batch.ids), batch.width) == ([1, 3], 3)
    assert dict(zip(batch.ids, batch.lengths(), strict=True)) == {1: 3, 3: 2}
    keys, values = cache_layers(batch.step_inputs()[0])[1]
    row_of = {seq_id: row for row, seq_id in enumerate(batch.ids)}
    assert torch.all(keys[row_of[1]] == 1)
    assert torch.all(values[row_of[3], :, 1:] == 103) and torch.all(values[row_of[3], :, 0] == 0)
    batch.remove({1, 3, 99})
    assert (len(batch), batch.width, batch.capacity) == (0, 0, (0, 0))


def test_join_and_leave_copy_only_their_own_rows() -> None:
    batch = PaddedKVBatch()
    batch.extend([(seq_id, single(5, float(seq_id))) for seq_id in range(1, 5)])
    pointer = buffer_pointer(batch)
    decode_step(batch, 50.0)
    batch.remove({2})  # the last row (4) moves into row 1; nothing else is copied
    assert batch.ids == (1, 4, 3)
    batch.extend([(9, single(3, 9.0))])  # fits right-aligned under the current width
    assert buffer_pointer(batch) == pointer, "join and leave must not reallocate the cache"
    rows = rows_by_id(batch)
    for seq_id in (1, 3, 4):
        assert torch.all(rows[seq_id][:, :5] == seq_id) and torch.all(rows[seq_id][:, 5] == 50)
    assert torch.all(rows[9][:, :3] == 0) and torch.all(rows[9][:, 3:] == 9)
    assert dict(zip(batch.ids, batch.lengths(), strict=True)) == {1: 6, 4: 6, 3: 6, 9: 3}


def test_a_longer_newcomer_widens_the_batch_and_masks_the_new_columns() -> None:
    batch = PaddedKVBatch()
    batch.extend([(1, single(2, 1.0))])
    batch.extend([(2, single(30, 2.0))])  # longer than the columns left of the batch's end
    assert (batch.width, batch.lengths()) == (30, [2, 30])
    cache, mask, positions = batch.step_inputs()
    keys = cache_layers(cache)[0][0]
    assert torch.all(keys[0, :, :28] == 0) and torch.all(keys[0, :, 28:] == 1)
    assert mask[0].tolist() == [0] * 28 + [1] * 3 and positions.flatten().tolist() == [2, 30]


def test_a_reused_row_never_exposes_its_previous_sequence() -> None:
    batch = PaddedKVBatch()
    poisoned = [(torch.full((1, 2, 6, 4), float("nan")),) * 2 for _ in range(2)]
    batch.extend([(1, single(6, 1.0)), (2, poisoned)])
    batch.remove({2})
    batch.extend([(3, single(2, 3.0))])  # takes row 1, whose columns held NaN
    rows = rows_by_id(batch)
    assert torch.all(rows[3][:, :4] == 0) and torch.all(rows[3][:, 4:] == 3)


def test_decoding_past_the_capacity_compacts_and_keeps_every_value() -> None:
    batch = PaddedKVBatch()
    batch.extend([(1, single(4, 1.0)), (2, single(8, 2.0))])
    expected = {1: [1.0] * 4, 2: [2.0] * 8}
    for step in range(200):
        if step == 20:
            batch.remove({2})  # the batch's start moves up; compaction reclaims it later
            del expected[2]
        decode_step(batch, float(step))
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
        if randint(3) == 0:  # some join, with prompts up to longer than the batch
            joining = []
            for _ in range(1 + randint(3)):
                tokens = 1 + randint(40)
                values = [float(next_id * 1000 + i) for i in range(tokens)]
                layer = (torch.tensor(values).view(1, 1, tokens, 1).expand(1, 2, tokens, 4),)
                joining.append((next_id, [layer * 2, layer * 2]))
                expected[next_id] = values
                next_id += 1
            batch.extend(joining)
        if expected:
            value = float(-step)
            mask = decode_step(batch, value)
            for values in expected.values():
                values.append(value)
            lengths = dict(zip(batch.ids, batch.lengths(), strict=True))
            assert lengths == {seq_id: len(values) for seq_id, values in expected.items()}
            assert batch.width == max(lengths.values())
            keys = rows_by_id(batch)
            for row, seq_id in enumerate(batch.ids):
                values = expected[seq_id]
                pad = batch.width - len(values)
                assert keys[seq_id][0, :pad, 0].tolist() == [0.0] * pad
                assert keys[seq_id][0, pad:, 0].tolist() == values
                assert mask[row].tolist() == [0] * pad + [1] * len(values)  # the step's mask
        else:
            assert len(batch) == 0
    assert next_id > 50


def test_compaction_gives_back_row_slots_after_a_busy_spell() -> None:
    batch = PaddedKVBatch()
    batch.extend([(seq_id, single(3, float(seq_id))) for seq_id in range(20)])
    assert batch.capacity[0] >= 20
    batch.remove(set(range(2, 20)))
    step = 0
    while batch.capacity[0] >= 20:  # the next compaction shrinks the rows too
        decode_step(batch, 0.0)
        step += 1
        assert step < 100
    assert batch.capacity[0] == 4 and sorted(batch.ids) == [0, 1]
    rows = rows_by_id(batch)
    assert torch.all(rows[0][:, :3] == 0) and torch.all(rows[1][:, :3] == 1)
