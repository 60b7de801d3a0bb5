"""The padded batch's layout bookkeeping, on plain tensors (the model-level check is the greedy
identity test in test_engine.py)."""

from __future__ import annotations

import torch

from tidegate.generation.kvbatch import KVLayers, PaddedKVBatch, batch_cache, cache_layers


def single(tokens: int, value: float, layers: int = 2) -> KVLayers:
    filled = torch.full((1, 2, tokens, 4), value)
    return [(filled, filled + 100) for _ in range(layers)]


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
    assert (batch.ids, batch.width, batch.lengths()) == ((1, 3), 3, [3, 2])
    keys, values = cache_layers(batch.step_inputs()[0])[1]
    assert torch.all(keys[0] == 1) and torch.all(values[1, :, 1:] == 103)
    batch.remove({1, 3, 99})
    assert (len(batch), batch.width) == (0, 0)


def test_the_batch_cache_appends_in_place_and_grows_past_its_capacity() -> None:
    start = torch.arange(2 * 2 * 3 * 4, dtype=torch.float32).reshape(2, 2, 3, 4)
    cache = batch_cache([(start, -start)])
    expected_keys, expected_values = start, -start
    storage = None
    for step in range(40):  # well past the first reservation: the buffer must grow
        column = torch.full((2, 2, 1, 4), float(step))
        keys, values = cache.update(column, -column, 0)  # type: ignore[attr-defined]
        expected_keys = torch.cat([expected_keys, column], dim=-2)
        expected_values = torch.cat([expected_values, -column], dim=-2)
        assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)
        if step == 0:
            storage = keys.untyped_storage().data_ptr()
        elif step == 1:  # the second step wrote into the same buffer, no copy
            assert keys.untyped_storage().data_ptr() == storage
    assert cache.get_seq_length() == 43  # type: ignore[attr-defined]
    assert torch.equal(cache_layers(cache)[0][0], expected_keys)
