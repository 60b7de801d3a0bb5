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

from tests.conftest import save_model
from tidegate.generation.attention import PackedAttention, attend_packed
from tidegate.generation.kvbatch import PaddedKVBatch
from tidegate.generation.worker import check_packed_steps
from tidegate.runtimes.causal_lm import CausalLMRuntime

TOLERANCE = 1e-4


class Driver:
    """What the worker does, without sampling: each step's logits per sequence."""

    def __init__(self, model: Any, *, materialized: bool = False) -> None:
        self.model = model
        self.batch = PaddedKVBatch(materialized=materialized)
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
        logits = self.attention.run(inputs.scratch, lambda: self.model(
            input_ids=ids, position_ids=inputs.position_ids, logits_to_keep=inputs.logits_index,
            use_cache=True, cache=inputs.cache).logits[0])
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
    run_model_scenario(runtime.model, runtime.vocab_size)


def run_model_scenario(model: Any, vocab: int, *, materialized: bool = False) -> None:
    driver = Driver(model, materialized=materialized)
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
        with pytest.raises(RuntimeError, match="does not attend through"):
            driver.step({0: [1, 2, 3]}, next_token=1)
    finally:
        del attention.forward
    driver.batch.abort()
    assert (len(driver.batch), driver.batch.capacity) == (0, (0, 0))
    assert type(attention).forward is original
    assert len(driver.batch) == 0


def test_models_that_transform_cached_keys_are_served_with_materialized_caches(
    tmp_path: Path, byte_tokenizer: Any,
) -> None:
    """JetMoE repeats its key heads after the cache update; DeepSeek-V3 caches compressed
    latents and expands them after it. The load-time check finds that the attention does not
    get what the cache returned, and the engine then hands such a model whole caches: its
    packed steps must still give the model's own logits."""
    from transformers import (
        DeepseekV3Config,
        DeepseekV3ForCausalLM,
        JetMoeConfig,
        JetMoeForCausalLM,
    )

    torch.manual_seed(0)
    vocab = len(byte_tokenizer)
    models = {
        "jetmoe": JetMoeForCausalLM(JetMoeConfig(
            hidden_size=64, num_hidden_layers=2, num_key_value_heads=2, kv_channels=16,
            intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, vocab_size=vocab,
            max_position_embeddings=256, initializer_range=0.2)),
        "deepseek": DeepseekV3ForCausalLM(DeepseekV3Config(
            hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
            first_k_dense_replace=2, kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=8,
            qk_nope_head_dim=16, v_head_dim=16, max_position_embeddings=256,
            vocab_size=vocab)),
    }
    for name, model in models.items():
        runtime = CausalLMRuntime(save_model(model, byte_tokenizer, tmp_path / name))
        try:
            assert runtime.materialized_cache, name
            run_model_scenario(runtime.model, runtime.vocab_size, materialized=True)
            with pytest.raises(NotImplementedError, match="transforms the cached keys"):
                run_model_scenario(runtime.model, runtime.vocab_size)  # not materialized
        finally:
            runtime.close()
    assert not check_packed_steps(family("qwen3"), VOCAB)  # the others are not materialized


def test_rotary_scaling_chosen_per_forward_keeps_prefills_apart() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from tidegate.generation.worker import packs_prefill

    def llama(rope: dict[str, Any] | None) -> Any:
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, vocab_size=64, max_position_embeddings=64)
        if rope is not None:
            config.rope_parameters = {"rope_theta": 10000.0, **rope}
        return LlamaForCausalLM(config)

    assert packs_prefill(llama(None))
    assert packs_prefill(llama({"rope_type": "linear", "factor": 2.0}))
    assert not packs_prefill(llama({"rope_type": "dynamic", "factor": 2.0}))
    assert not packs_prefill(llama({"rope_type": "longrope", "short_factor": [1.0] * 8,
                                    "long_factor": [4.0] * 8,
                                    "original_max_position_embeddings": 16}))


VOCAB = 97
BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, vocab_size=VOCAB)


def family(name: str) -> Any:
    import transformers as t

    torch.manual_seed(0)
    models = {
        "llama-mqa": lambda: t.LlamaForCausalLM(t.LlamaConfig(**{**BASE,
                                                                 "num_key_value_heads": 1})),
        "qwen3": lambda: t.Qwen3ForCausalLM(t.Qwen3Config(**BASE, head_dim=16)),
        "gemma": lambda: t.GemmaForCausalLM(t.GemmaConfig(**BASE, head_dim=16)),
        "phi3": lambda: t.Phi3ForCausalLM(t.Phi3Config(**BASE, pad_token_id=0, bos_token_id=1,
                                                       eos_token_id=2)),
        "phi": lambda: t.PhiForCausalLM(t.PhiConfig(**{**BASE, "num_key_value_heads": 4})),
        "gpt-neox": lambda: t.GPTNeoXForCausalLM(t.GPTNeoXConfig(
            **{**BASE, "num_key_value_heads": 4})),
        "opt": lambda: t.OPTForCausalLM(t.OPTConfig(
            hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256, vocab_size=VOCAB, word_embed_proj_dim=64)),
        "gpt-j": lambda: t.GPTJForCausalLM(t.GPTJConfig(
            n_embd=64, n_layer=2, n_head=4, n_positions=256, vocab_size=VOCAB, rotary_dim=8)),
        "starcoder2": lambda: t.Starcoder2ForCausalLM(t.Starcoder2Config(**BASE)),
        "bloom": lambda: t.BloomForCausalLM(t.BloomConfig(
            hidden_size=64, n_layer=2, n_head=4, vocab_size=VOCAB)),
        "gpt-neo": lambda: t.GPTNeoForCausalLM(t.GPTNeoConfig(
            hidden_size=64, num_layers=2, num_heads=4, vocab_size=VOCAB,
            attention_types=[[["global", "local"], 1]], max_position_embeddings=256)),
        "falcon": lambda: t.FalconForCausalLM(t.FalconConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
            alibi=True)),
        "deepseek-v2": lambda: t.DeepseekV2ForCausalLM(t.DeepseekV2Config(
            **{**BASE, "num_key_value_heads": 4}, moe_intermediate_size=32,
            n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
            first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=8,
            qk_nope_head_dim=16, v_head_dim=16, initializer_range=0.2)),
        "minicpm3": lambda: t.MiniCPM3ForCausalLM(t.MiniCPM3Config(
            **{**BASE, "num_key_value_heads": 4}, kv_lora_rank=32, q_lora_rank=32,
            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)),
        "gpt-oss": lambda: t.GptOssForCausalLM(t.GptOssConfig(
            **{**BASE, "intermediate_size": 64}, head_dim=16, num_local_experts=4,
            num_experts_per_tok=2, sliding_window=64)),
    }
    return models[name]().eval()


@pytest.mark.parametrize("name", ["llama-mqa", "qwen3", "gemma", "phi3", "phi", "gpt-neox",
                                  "opt", "gpt-j", "starcoder2"])
def test_more_families_give_the_plain_logits(name: str) -> None:
    model = family(name)
    check_packed_steps(model, VOCAB)  # what the runtime runs at load
    run_model_scenario(model, VOCAB)


@pytest.mark.parametrize("name", ["bloom", "gpt-neo", "falcon", "gpt-oss"])
def test_families_that_attend_their_own_way_are_refused(name: str) -> None:
    """Bloom, GPT-Neo and Falcon attend without the interface (ALiBi, local attention); gpt-oss
    needs attention sinks."""
    with pytest.raises(ValueError, match="cannot run the generation engine's packed steps"):
        check_packed_steps(family(name), VOCAB)


@pytest.mark.parametrize("name", ["deepseek-v2", "minicpm3"])
def test_more_latent_attention_families_are_served_materialized(name: str) -> None:
    model = family(name)
    assert check_packed_steps(model, VOCAB)
    run_model_scenario(model, VOCAB, materialized=True)


def test_a_sequence_longer_than_the_sliding_window_fails_the_step() -> None:
    """The packed attention does not apply sliding windows (the runtime caps the context at the
    window): a longer sequence must fail loudly, not attend past its window."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**BASE, sliding_window=8)).eval()
    driver = Driver(model)
    driver.step({0: list(range(1, 9))}, next_token=1)  # 8 tokens: within the window
    with pytest.raises(RuntimeError, match="longer than the sliding window"):
        driver.step({}, next_token=1)  # the 9th
