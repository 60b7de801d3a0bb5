"""Packed steps against the model run plainly: every logit a packed step gives (running rows
decoding while newcomers join in the same forward) equals the logits of each sequence's whole
token list run alone through the model's own attention, for multi-head (GPT-2), grouped-query
(Llama) and sliding-window models with attention softcapping (Gemma 2) and without."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from tidegate.generation.attention import PackedAttention, attend_packed
from tidegate.generation.kvbatch import PaddedKVBatch
from tidegate.runtimes.causal_lm import CausalLMRuntime

TOLERANCE = 1e-4


class Driver:
    """What the worker does, without sampling: each step's logits per sequence."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.batch = PaddedKVBatch()
        self.attention = PackedAttention(model)
        self.tokens: dict[int, list[int]] = {}

    @torch.inference_mode()
    def step(self, joining: dict[int, list[int]], next_token: int) -> dict[int, torch.Tensor]:
        running = self.batch.ids
        inputs = self.batch.begin(
            decode=bool(running), prompts=[(seq_id, len(p)) for seq_id, p in joining.items()]
        )
        packed = [self.tokens[seq_id][-1] for seq_id in running]
        for prompt in joining.values():
            packed.extend(prompt)
        ids = torch.tensor([packed])
        with self.attention.over(inputs.step):
            logits = self.model(input_ids=ids, position_ids=inputs.position_ids,
                                logits_to_keep=inputs.logits_index, use_cache=True,
                                cache=inputs.cache).logits[0]
        self.batch.commit()
        order = [*running, *joining]
        for seq_id, prompt in joining.items():
            self.tokens[seq_id] = list(prompt)
        result = dict(zip(order, logits, strict=True))
        for seq_id in order:  # the next step feeds this token back
            self.tokens[seq_id].append(next_token + seq_id)
        return result

    @torch.inference_mode()
    def remove(self, seq_id: int) -> None:
        self.batch.remove({seq_id})

    @torch.inference_mode()
    def alone(self, seq_id: int) -> torch.Tensor:
        """Logits for the sequence's last token position, the whole sequence run plainly."""
        ids = torch.tensor([self.tokens[seq_id][:-1]])
        return self.model(input_ids=ids).logits[0, -1]  # type: ignore[no-any-return]


def prompts(vocab: int, lengths: Sequence[int], seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=generator).tolist() for n in lengths]


def check(driver: Driver, logits: dict[int, torch.Tensor]) -> None:
    for seq_id, got in logits.items():
        expected = driver.alone(seq_id)
        assert torch.allclose(got, expected, atol=TOLERANCE, rtol=0), (
            f"sequence {seq_id}: max diff {(got - expected).abs().max():.2e}"
        )


def run_scenario(runtime: CausalLMRuntime) -> None:
    driver = Driver(runtime.model)
    vocab = runtime.vocab_size
    p = prompts(vocab - 2, [5, 9, 3, 12, 2, 7], seed=1)
    check(driver, driver.step({0: p[0], 1: p[1]}, next_token=1))  # two join an empty batch
    check(driver, driver.step({}, next_token=1))  # decode only
    check(driver, driver.step({2: p[2]}, next_token=1))  # a shorter one joins the decode
    check(driver, driver.step({3: p[3], 4: p[4]}, next_token=1))  # a longer one widens it
    driver.remove(1)
    check(driver, driver.step({5: p[5]}, next_token=1))  # joins the leaver's row
    for _ in range(3):
        check(driver, driver.step({}, next_token=1))


def test_gpt2_packed_steps_give_the_plain_logits(gpt2: CausalLMRuntime) -> None:
    run_scenario(gpt2)


def test_grouped_query_packed_steps_give_the_plain_logits(llama: CausalLMRuntime) -> None:
    run_scenario(llama)


def test_windowed_packed_steps_give_the_plain_logits(windowed_dir: Path) -> None:
    runtime = CausalLMRuntime(windowed_dir)
    try:
        run_scenario(runtime)
    finally:
        runtime.close()


@pytest.mark.parametrize("windowed_dir", ["gemma2"], indirect=True)
def test_softcapped_attention_is_honoured(windowed_dir: Path) -> None:
    runtime = CausalLMRuntime(windowed_dir)
    try:
        # A cap this low changes the logits a lot: ignoring it would fail the comparison.
        runtime.model.config.attn_logit_softcapping = 0.5
        run_scenario(runtime)
    finally:
        runtime.close()


def test_the_packed_attention_refuses_to_run_outside_a_step() -> None:
    query = torch.zeros((1, 2, 3, 4))
    with pytest.raises(RuntimeError, match="only inside a tidegate step"):
        attend_packed(None, query, query, query, None)


def test_a_model_that_bypasses_the_attention_interface_is_refused(
    gpt2: CausalLMRuntime,
) -> None:
    """A layer that attends by itself would see the packed row as one sequence."""
    model = gpt2.model
    attention = model.transformer.h[0].attn
    original = type(attention).forward

    def own_attention(self: Any, hidden_states: torch.Tensor, cache: Any = None,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
        # Writes its keys and values into the cache, then attends without the interface.
        _, key, value = self.c_attn(hidden_states).split(self.split_size, dim=2)
        heads = (*key.shape[:-1], -1, self.head_dim)
        cache.update(key.view(heads).transpose(1, 2), value.view(heads).transpose(1, 2),
                     self.layer_idx)
        return self.c_proj(value), None

    driver = Driver(model)
    attention.forward = own_attention.__get__(attention)
    try:
        with pytest.raises(RuntimeError, match="does not route attention"):
            driver.step({0: [1, 2, 3]}, next_token=1)
    finally:
        del attention.forward
    driver.batch.abort()
    assert (len(driver.batch), driver.batch.capacity) == (0, (0, 0))
    assert type(attention).forward is original
    assert len(driver.batch) == 0
