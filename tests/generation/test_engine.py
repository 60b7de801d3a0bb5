"""The engine against the real runtime on tiny random models: greedy outputs of concurrent,
staggered requests match each request run alone through ``model.generate``."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import WINDOW, llama_config, save_model
from tidegate.generation import GenerationResult, SamplingParams
from tidegate.generation.engine import GenerationEngine
from tidegate.generation.worker import StepWorker
from tidegate.runtimes.causal_lm import CausalLMRuntime

from .conftest import run_engine
from .helpers import StepLog, random_prompts, reference_greedy

LENGTHS = (3, 17, 5, 31, 9, 2, 24, 12, 40, 7, 19, 4, 28, 11, 6, 35)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_greedy_staggered_batch_matches_generate_alone(
    name: str, request: pytest.FixtureRequest
) -> None:
    staggered_batch_matches_generate_alone(request.getfixturevalue(name))


def test_prefills_kept_apart_for_per_forward_rotary_scaling_match_generate_alone(
    tmp_path: Path, byte_tokenizer: Any,
) -> None:
    """Dynamic NTK rotary scaling is chosen per forward, so such a model's newcomers are
    prefilled in a forward of their own, after the decode: that path must be exact too."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = llama_config(byte_tokenizer)
    config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    save_model(LlamaForCausalLM(config), byte_tokenizer, tmp_path)
    runtime = CausalLMRuntime(tmp_path)
    try:
        assert not StepWorker(runtime.model).packs_prefill
        staggered_batch_matches_generate_alone(runtime)
    finally:
        runtime.close()


def test_latent_attention_served_with_materialized_caches_matches_generate_alone(
    tmp_path: Path, byte_tokenizer: Any,
) -> None:
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    config = DeepseekV3Config(
        hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
        n_group=1, topk_group=1, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=32,
        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, max_position_embeddings=256,
        vocab_size=len(byte_tokenizer), bos_token_id=byte_tokenizer.eos_token_id,
        eos_token_id=byte_tokenizer.eos_token_id, initializer_range=0.2,
    )
    save_model(DeepseekV3ForCausalLM(config), byte_tokenizer, tmp_path)
    runtime = CausalLMRuntime(tmp_path)
    try:
        assert runtime.materialized_cache
        staggered_batch_matches_generate_alone(runtime)
    finally:
        runtime.close()


def staggered_batch_matches_generate_alone(runtime: CausalLMRuntime) -> None:
    vocab = runtime.model.config.vocab_size
    prompts = random_prompts(16, LENGTHS, vocab, avoid=set(runtime.eos_token_ids))
    max_tokens = [6 + (7 * i) % 19 for i in range(16)]
    expected = [reference_greedy(runtime, p, n) for p, n in zip(prompts, max_tokens, strict=True)]
    log = StepLog()
    results: dict[int, GenerationResult] = {}

    async def scenario(engine: GenerationEngine) -> None:
        tasks: list[asyncio.Task[None]] = []

        async def collect(i: int) -> None:
            stream = engine.submit(prompts[i], SamplingParams(max_tokens=max_tokens[i],
                                                              temperature=0))
            results[i] = await stream.collect()

        for wave, after_steps in enumerate((0, 2, 5, 9)):
            await log.steps(after_steps)
            tasks += [asyncio.create_task(collect(i)) for i in range(4 * wave, 4 * wave + 4)]
        await asyncio.gather(*tasks)

    run_engine(runtime, scenario, max_num_seqs=6, max_prefill_tokens=48, on_step=log)

    for i in range(16):
        assert list(results[i].token_ids) == expected[i], f"request {i} diverged"
        assert results[i].prompt_tokens == len(prompts[i])
    # The batch really was continuous: bounded, joined mid-flight, left mid-flight.
    assert max(len(r.decoded) for r in log.reports) <= 6
    assert any(r.prefilled and r.decoded for r in log.reports)
    assert any(r.dropped and r.decoded for r in log.reports)


def _collect_all(
    runtime: CausalLMRuntime, requests: list[tuple[list[int], SamplingParams]], **options: object
) -> list[tuple[list[str], GenerationResult]]:
    """Run ``requests`` concurrently; return each one's deltas and result."""
    out: list[tuple[list[str], GenerationResult]] = []

    async def scenario(engine: GenerationEngine) -> None:
        async def one(prompt: list[int], params: SamplingParams) -> tuple[list[str],
                                                                           GenerationResult]:
            async with engine.submit(prompt, params) as stream:
                deltas = [delta async for delta in stream]
            assert stream.result is not None
            return deltas, stream.result

        out.extend(await asyncio.gather(*(one(p, s) for p, s in requests)))

    run_engine(runtime, scenario, **options)
    return out


def test_stop_string_ends_generation_and_is_not_streamed(llama: CausalLMRuntime) -> None:
    prompt = random_prompts(1, (9,), llama.model.config.vocab_size, avoid={0}, seed=3)[0]
    [(_, full)] = _collect_all(llama, [(prompt, SamplingParams(max_tokens=24, temperature=0))])
    assert full.finish_reason == "length"
    start = next(i for i in range(6, len(full.text) - 2)
                 if "\ufffd" not in full.text[i : i + 2])
    stop = full.text[start : start + 2]
    expected = full.text[: full.text.find(stop)]
    params = SamplingParams(max_tokens=24, temperature=0, stop=("never-there", stop))
    [(deltas, result)] = _collect_all(llama, [(prompt, params)])
    assert result.finish_reason == "stop"
    assert result.text == expected == "".join(deltas)
    assert stop not in "".join(deltas)
    assert result.completion_tokens < full.completion_tokens


def test_seeded_sampling_is_reproducible_in_any_batch(llama: CausalLMRuntime) -> None:
    vocab = llama.model.config.vocab_size
    prompts = random_prompts(4, (6, 15, 3, 22), vocab, avoid={0}, seed=5)
    seeded = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=1234)
    [(_, alone)] = _collect_all(llama, [(prompts[0], seeded)])
    crowd = [(prompts[0], seeded)] + [
        (p, SamplingParams(max_tokens=16, temperature=1.0, seed=i)) for i, p in
        enumerate(prompts[1:])
    ]
    together = _collect_all(llama, crowd, max_num_seqs=4)
    assert together[0][1].token_ids == alone.token_ids
    [(_, other_seed)] = _collect_all(
        llama, [(prompts[0], SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=99))]
    )
    assert other_seed.token_ids != alone.token_ids


def test_max_tokens_and_context_end_with_length(llama: CausalLMRuntime) -> None:
    vocab = llama.model.config.vocab_size
    short, long = random_prompts(2, (8, 250), vocab, avoid={0}, seed=11)
    results = _collect_all(
        llama,
        [(short, SamplingParams(max_tokens=5, temperature=0)),
         (long, SamplingParams(max_tokens=50, temperature=0))],
    )
    (_, five), (_, capped) = results
    assert (five.finish_reason, five.completion_tokens, five.prompt_tokens) == ("length", 5, 8)
    # The context (256 positions) caps generation: 250 + 6 tokens.
    assert (capped.finish_reason, capped.completion_tokens) == ("length", 6)


def test_sliding_window_models_are_served_exactly_within_their_window(
    windowed_dir: Path
) -> None:
    runtime = CausalLMRuntime(windowed_dir)
    assert runtime.context_length == WINDOW  # capped from 256 positions
    vocab = runtime.model.config.vocab_size
    prompts = random_prompts(6, (3, 17, 9, 25, 5, 12), vocab, avoid=set(runtime.eos_token_ids))
    expected = [reference_greedy(runtime, p, WINDOW - len(p)) for p in prompts]
    results: list[GenerationResult] = []

    async def scenario(engine: GenerationEngine) -> None:
        async def one(prompt: list[int]) -> GenerationResult:
            # More than fits: generation stops at the window with finish_reason "length".
            return await engine.submit(prompt, SamplingParams(max_tokens=100,
                                                              temperature=0)).collect()

        results.extend(await asyncio.gather(*(one(p) for p in prompts)))

    run_engine(runtime, scenario, max_num_seqs=4)
    for i, result in enumerate(results):
        assert list(result.token_ids) == expected[i], f"request {i} diverged"
        if result.finish_reason == "length":
            assert result.prompt_tokens + result.completion_tokens == WINDOW
        else:  # the random model may emit its end-of-sequence token first (so did generate)
            assert result.finish_reason == "stop"
    assert sum(result.finish_reason == "length" for result in results) >= 3
