"""The OpenVINO GenAI backend: real exports of small random-weight models, served by tidegate's
engine over the continuous-batching pipeline, compared with transformers' own generation."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import save_model
from tests.generation.conftest import run_engine
from tidegate.config import GenerationConfig, ModelConfig
from tidegate.engines import Backend, Precision
from tidegate.generation.engine import GenerationEngine
from tidegate.generation.params import SamplingParams
from tidegate.kinds import RuntimeKind
from tidegate.runtimes import create_runtime
from tidegate.runtimes.causal_lm import CausalLMRuntime
from tidegate.runtimes.genai_export import ExportFailed, ensure_genai_export
from tidegate.runtimes.genai_lm import (
    DEFAULT_KV_TOKENS,
    KV_BLOCK_TOKENS,
    GenaiLMRuntime,
    kv_bytes_per_token,
)

PROMPTS = ["The quick brown fox", "Hello", "Streams of tokens flow to every client"]


def _small(name: str, vocab: int, eos: int) -> Any:
    import transformers as t

    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                vocab_size=vocab, bos_token_id=eos, eos_token_id=eos, initializer_range=0.2)
    torch.manual_seed(0)
    if name == "qwen2":
        return t.Qwen2ForCausalLM(t.Qwen2Config(**base))
    if name == "mistral":
        return t.MistralForCausalLM(t.MistralConfig(**base, sliding_window=None))
    if name == "phi3":
        return t.Phi3ForCausalLM(t.Phi3Config(**base, pad_token_id=eos))
    if name == "minicpm3":  # not in the transformers optimum-intel supports: cannot be exported
        return t.MiniCPM3ForCausalLM(t.MiniCPM3Config(
            **{**base, "num_key_value_heads": 4}, kv_lora_rank=32, q_lora_rank=32,
            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16))
    raise AssertionError(name)


@pytest.fixture(scope="session")
def family_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
               byte_tokenizer: Any) -> Path:
    name = request.param
    if name in ("gpt2", "llama"):
        return Path(request.getfixturevalue(f"{name}_dir"))
    model = _small(name, len(byte_tokenizer), byte_tokenizer.eos_token_id)
    return save_model(model, byte_tokenizer, tmp_path_factory.mktemp(name))


@pytest.fixture(scope="session")
def genai_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("genai-cache")


def _generation(**options: Any) -> GenerationConfig:
    return GenerationConfig(**{"max_num_seqs": 4, **options})


def _greedy(runtime: Any, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """Every prompt through one engine at once, greedily, without stopping at EOS."""
    results: list[list[int]] = []

    async def scenario(engine: GenerationEngine) -> None:
        streams = [engine.submit(p, SamplingParams(max_tokens=max_new, temperature=0.0))
                   for p in prompts]
        for stream in streams:
            results.append(list((await stream.collect()).token_ids))

    run_engine(runtime, scenario, max_num_seqs=4)
    return results


def _prefill(runtime: GenaiLMRuntime, seq_ids: tuple[int, ...], *, max_new: int) -> Any:
    """A step plan prefilling the first prompt greedily as each of ``seq_ids``."""
    from tidegate.generation.sampling import make_generator
    from tidegate.generation.worker import PrefillRequest, StepPlan

    prompt = tuple(runtime.encode(PROMPTS[0]))
    params = SamplingParams(max_tokens=max_new, temperature=0.0)
    return StepPlan(drop=(), prefill=tuple(
        PrefillRequest(i, prompt, params, make_generator(0), max_new=max_new) for i in seq_ids))


def _reference(model_dir: Path, prompt: list[int], max_new: int) -> tuple[list[int], Any]:
    """transformers' greedy tokens and the fp32 model (to compare near-ties by logits)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                             do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist(), model


@pytest.mark.parametrize("family_dir", ["gpt2", "llama", "qwen2", "mistral", "phi3"],
                         indirect=True)
def test_fp32_greedy_output_is_transformers_own(family_dir: Path, genai_cache: Path) -> None:
    runtime = GenaiLMRuntime(family_dir, genai_cache, precision=Precision.FP32,
                             generation=_generation())
    assert runtime.probe.max_logprob_error < 1e-3
    prompts = [runtime.encode(text) for text in PROMPTS]
    got = _greedy(runtime, prompts, 12)
    for prompt, tokens in zip(prompts, got, strict=True):
        # Random weights may end a sequence early on its EOS token, as generate() does.
        want, model = _reference(family_dir, prompt, len(tokens))
        if tokens == want[:len(tokens)]:
            continue
        # A near-tie may flip in the last bits: the first difference must be a tie in fp32.
        first = next(i for i, (a, b) in enumerate(zip(tokens, want, strict=False)) if a != b)
        with torch.inference_mode():
            logits = model(torch.tensor([prompt + tokens[:first]])).logits[0, -1]
        assert float(logits[want[first]] - logits[tokens[first]]) < 1e-4, (tokens, want)


def test_requests_share_one_pipeline_and_a_cancel_frees_its_slot(
        gpt2_dir: Path, genai_cache: Path) -> None:
    runtime = GenaiLMRuntime(gpt2_dir, genai_cache, precision=Precision.FP32,
                             generation=_generation(max_num_seqs=2))
    assert "_encoder" in vars(runtime)  # chosen at load, not on the first prompt
    prompt = runtime.encode(PROMPTS[0])

    async def scenario(engine: GenerationEngine) -> None:
        long = engine.submit(prompt, SamplingParams(max_tokens=200, temperature=0.0))
        other = engine.submit(prompt, SamplingParams(max_tokens=200, temperature=0.0))
        waiting = engine.submit(prompt, SamplingParams(max_tokens=3, temperature=0.0))
        async with long:
            await long.__anext__()
            assert engine.statistics().running == 2 and engine.statistics().waiting == 1
        # Leaving the block cancelled ``long``: the waiting sequence takes its slot.
        result = await waiting.collect()
        assert result.completion_tokens == 3
        other.cancel()

    run_engine(runtime, scenario, max_num_seqs=2)


def test_seeded_sampling_is_reproducible(gpt2_dir: Path, genai_cache: Path) -> None:
    runtime = GenaiLMRuntime(gpt2_dir, genai_cache, precision=Precision.FP32,
                             generation=_generation())
    prompt = runtime.encode(PROMPTS[1])
    results: list[tuple[int, ...]] = []

    async def scenario(engine: GenerationEngine) -> None:
        params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234)
        for _ in range(2):
            noise = engine.submit(prompt, SamplingParams(max_tokens=8, temperature=1.0))
            results.append((await engine.submit(prompt, params).collect()).token_ids)
            await noise.collect()

    run_engine(runtime, scenario)
    assert results[0] == results[1]


def test_memory_counts_weights_and_the_kv_cache(gpt2_dir: Path, genai_cache: Path) -> None:
    from transformers import AutoConfig

    runtime = GenaiLMRuntime(gpt2_dir, genai_cache, precision=Precision.BF16,
                             generation=_generation(max_num_seqs=3))
    per_token = kv_bytes_per_token(AutoConfig.from_pretrained(gpt2_dir), Precision.BF16)
    assert runtime.kv_cache_bytes == 3 * min(runtime.context_length, DEFAULT_KV_TOKENS) * per_token
    weights = (runtime.export_dir / "openvino_model.bin").stat().st_size
    assert runtime.memory_bytes == weights + runtime.kv_cache_bytes
    small = GenaiLMRuntime(gpt2_dir, genai_cache, precision=Precision.BF16,
                           generation=_generation(kv_cache_bytes=per_token * KV_BLOCK_TOKENS * 8))
    assert small.memory_bytes == weights + per_token * KV_BLOCK_TOKENS * 8


def test_export_is_reused_and_rebuilt_when_corrupt(gpt2_dir: Path, tmp_path: Path) -> None:
    entry = ensure_genai_export(gpt2_dir, tmp_path)
    created = json.loads((entry / "meta.json").read_text())["created"]
    stamp = (entry / "meta.json").stat().st_mtime_ns
    assert ensure_genai_export(gpt2_dir, tmp_path) == entry
    assert (entry / "meta.json").stat().st_mtime_ns == stamp  # reused, not exported again
    weights = entry / "openvino_model.bin"
    weights.write_bytes(weights.read_bytes()[:-16])  # truncated
    assert ensure_genai_export(gpt2_dir, tmp_path) == entry
    assert (entry / "meta.json").stat().st_mtime_ns != stamp
    assert json.loads((entry / "meta.json").read_text())["created"] >= created
    assert weights.stat().st_size > 0 and GenaiLMRuntime(
        gpt2_dir, tmp_path, precision=Precision.FP32, generation=_generation()).probe


@pytest.mark.parametrize("family_dir", ["minicpm3"], indirect=True)
def test_an_architecture_that_cannot_be_exported(
        family_dir: Path, genai_cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    def config(backend: str) -> ModelConfig:
        return ModelConfig(id="odd", runtime=RuntimeKind.CAUSAL_LM, source=str(family_dir),
                           backend=Backend(backend))

    with pytest.raises(ExportFailed, match="could not export"):
        create_runtime(config("openvino"), genai_cache, {})
    with caplog.at_level(logging.WARNING, "tidegate.runtimes"):
        runtime = create_runtime(config("auto"), genai_cache, {})
    assert isinstance(runtime, CausalLMRuntime)
    assert "serving it on the torch engine" in caplog.text
    assert "could not export" in caplog.text


def test_auto_serves_openvino_in_bf16(gpt2_dir: Path, genai_cache: Path) -> None:
    from tidegate.engines import cpu_supports_bf16

    runtime = create_runtime(
        ModelConfig(id="g", runtime=RuntimeKind.CAUSAL_LM, source=str(gpt2_dir)), genai_cache, {})
    assert isinstance(runtime, GenaiLMRuntime)
    assert runtime.precision is (Precision.BF16 if cpu_supports_bf16() else Precision.FP32)
    assert runtime.probe.max_logprob_error <= 0.15  # the bf16 tolerance


def test_a_dropped_sequence_leaves_the_pipeline_at_the_next_step(
        gpt2_dir: Path, genai_cache: Path) -> None:
    from tidegate.generation.worker import StepPlan

    runtime = GenaiLMRuntime(gpt2_dir, genai_cache, precision=Precision.FP32,
                             generation=_generation())
    worker = runtime.create_worker()
    first = worker.step(_prefill(runtime, (0, 1), max_new=50))
    assert set(first.tokens) == {0, 1} and not first.failed
    second = worker.step(StepPlan(drop=(0,), prefill=()))
    assert second.decoded == (1,) and set(second.tokens) == {1}
    assert worker.step(StepPlan(drop=(1,), prefill=())).tokens == {}
    assert not runtime.busy()
    worker.reset()


def test_a_probe_mismatch_fails_openvino_and_sends_auto_to_torch(
        gpt2_dir: Path, genai_cache: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    from tidegate.runtimes import genai_lm

    # No pipeline matches transformers to the last bit in bf16: a zero tolerance must refuse.
    monkeypatch.setitem(genai_lm.PROBE_TOLERANCE, Precision.BF16, 0.0)

    def config(backend: str) -> ModelConfig:
        return ModelConfig(id="g", runtime=RuntimeKind.CAUSAL_LM, source=str(gpt2_dir),
                           backend=Backend(backend), precision=Precision.BF16)

    with pytest.raises(genai_lm.ProbeMismatch,
                       match=r"log-probabilities by up to \d.*nats.*tolerance 0\)"):
        create_runtime(config("openvino"), genai_cache, {})
    with caplog.at_level(logging.WARNING, "tidegate.runtimes"):
        runtime = create_runtime(config("auto"), genai_cache, {})
    assert isinstance(runtime, CausalLMRuntime) and runtime.dtype == "bfloat16"
    assert "load-time probe" in caplog.text


def test_penalties_and_min_tokens_match_the_torch_engine(
        gpt2_dir: Path, genai_cache: Path) -> None:
    """OpenAI's presence/frequency penalties and vLLM's min_tokens mean the same on both
    engines: greedy fp32 text is identical."""
    genai = GenaiLMRuntime(gpt2_dir, genai_cache, precision=Precision.FP32,
                           generation=_generation())
    torch_runtime = CausalLMRuntime(gpt2_dir)
    prompts = [genai.encode(text) for text in PROMPTS]
    params = [SamplingParams(max_tokens=16, temperature=0.0, presence_penalty=1.5,
                             frequency_penalty=0.7),
              SamplingParams(max_tokens=16, temperature=0.0, frequency_penalty=-1.0),
              SamplingParams(max_tokens=16, temperature=0.0, min_tokens=10,
                             presence_penalty=0.5)]
    outputs: dict[str, list[tuple[int, ...]]] = {}
    for name, runtime in (("openvino", genai), ("torch", torch_runtime)):
        got: list[tuple[int, ...]] = []

        async def scenario(engine: GenerationEngine, into: list[tuple[int, ...]] = got) -> None:
            streams = [engine.submit(p, q) for p in prompts for q in params]
            for stream in streams:
                into.append((await stream.collect()).token_ids)

        run_engine(runtime, scenario, max_num_seqs=4)
        outputs[name] = got
    assert outputs["openvino"] == outputs["torch"]


@pytest.mark.parametrize("family_dir", ["gpt2", "llama"], indirect=True)
def test_int8_weights_are_smaller_and_pass_the_probe(family_dir: Path, genai_cache: Path) -> None:
    from tidegate.engines import Weights
    from tidegate.runtimes.genai_lm import INT8_PROBE_TOLERANCE, PROBE_TOLERANCE

    original = GenaiLMRuntime(family_dir, genai_cache, precision=Precision.FP32,
                              generation=_generation())
    small = GenaiLMRuntime(family_dir, genai_cache, precision=Precision.FP32,
                           generation=_generation(), weights=Weights.INT8)
    assert small.export_dir == original.export_dir.with_name(original.export_dir.name + "-int8")
    meta = json.loads((small.export_dir / "meta.json").read_text())
    assert meta["int8_weights"] >= 2
    assert small.memory_bytes < original.memory_bytes
    assert original.probe.max_logprob_error < small.probe.max_logprob_error \
        <= PROBE_TOLERANCE[Precision.FP32] + INT8_PROBE_TOLERANCE
    prompts = [small.encode(text) for text in PROMPTS]
    got = _greedy(small, prompts, 8)
    assert all(len(tokens) > 0 for tokens in got)


def test_a_prompt_larger_than_the_kv_cache_fails_naming_the_knob(
        gpt2_dir: Path, genai_cache: Path) -> None:
    from transformers import AutoConfig

    from tidegate.errors import RuntimeFailure

    per_token = kv_bytes_per_token(AutoConfig.from_pretrained(gpt2_dir), Precision.FP32)
    runtime = GenaiLMRuntime(gpt2_dir, genai_cache, precision=Precision.FP32,
                             generation=_generation(kv_cache_bytes=per_token * KV_BLOCK_TOKENS))
    long_prompt = runtime.encode(" ".join(PROMPTS * 3))
    assert KV_BLOCK_TOKENS < len(long_prompt) < runtime.context_length - 8

    async def scenario(engine: GenerationEngine) -> None:
        with pytest.raises(RuntimeFailure, match="kv_cache_bytes"):
            await engine.submit(long_prompt, SamplingParams(max_tokens=4)).collect()
        # The engine goes on: a prompt that fits is served.
        short = runtime.encode(PROMPTS[1])
        result = await engine.submit(short, SamplingParams(max_tokens=2)).collect()
        assert result.completion_tokens == 2

    run_engine(runtime, scenario)


def test_the_pipeline_runs_in_a_child_process_that_close_ends(
        gpt2_dir: Path, genai_cache: Path) -> None:
    """Its steps hold the GIL: in the server's process they would stop the event loop."""
    runtime = GenaiLMRuntime(gpt2_dir, genai_cache, precision=Precision.FP32,
                             generation=_generation())
    pid = runtime.pid
    assert pid is not None and pid != os.getpid()
    os.kill(pid, 0)  # alive
    # A terminal's Ctrl-C or a service manager's SIGTERM reaches the whole process group: the
    # child keeps serving until the parent, having drained, closes it.
    os.kill(pid, signal.SIGTERM)
    os.kill(pid, signal.SIGINT)
    assert _greedy(runtime, [runtime.encode(PROMPTS[1])], 3)[0]
    runtime.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    runtime.close()  # again: nothing left to do


def test_a_lost_pipeline_process_fails_the_step_with_a_clear_error(
        gpt2_dir: Path, genai_cache: Path) -> None:
    from tidegate.generation.worker import StepPlan
    from tidegate.runtimes.genai_process import PipelineProcessDied

    runtime = GenaiLMRuntime(gpt2_dir, genai_cache, precision=Precision.FP32,
                             generation=_generation())
    worker = runtime.create_worker()
    assert set(worker.step(_prefill(runtime, (0,), max_new=5)).tokens) == {0}
    assert runtime.pid is not None
    os.kill(runtime.pid, signal.SIGKILL)
    with pytest.raises(PipelineProcessDied, match=r"exited \(exit code -9\)"):
        worker.step(StepPlan(drop=(), prefill=()))
    worker.reset()  # nothing left to cancel: no error
    runtime.close()


def test_a_model_whose_pipeline_process_died_is_failed_then_loaded_again(
        gpt2_dir: Path, genai_cache: Path) -> None:
    """The engine ends its requests with 503, the cache marks the model failed (Retry-After
    for the backoff), and the first request after the backoff loads it again."""
    from tidegate.clock import FakeClock
    from tidegate.config import Config, ServerConfig
    from tidegate.errors import ModelUnavailable
    from tidegate.metrics import Metrics
    from tidegate.models.manager import ModelManager, ModelState

    config = Config(
        server=ServerConfig(cache_dir=str(genai_cache)),
        models=(ModelConfig(id="g", runtime=RuntimeKind.CAUSAL_LM, source=str(gpt2_dir),
                            backend=Backend.OPENVINO, precision=Precision.FP32,
                            generation=_generation(pipeline_process=True)),),
    )
    greedy = SamplingParams(max_tokens=4, temperature=0.0)

    async def complete(manager: ModelManager) -> int:
        async with manager.lease("g") as served:
            result = await served.generator().engine.submit([1, 2, 3], greedy).collect()
            return result.completion_tokens

    async def scenario() -> None:
        clock = FakeClock()
        manager = ModelManager(config, Metrics(), clock=clock)
        await manager.start()
        try:
            assert await complete(manager) == 4
            async with manager.lease("g") as served:
                runtime = served.generator().runtime
                assert runtime.pid is not None
                os.kill(runtime.pid, signal.SIGKILL)
                with pytest.raises(ModelUnavailable, match="runtime was lost"):
                    await served.generator().engine.submit([1, 2, 3], greedy).collect()
            for _ in range(200):  # the unload runs in a task of the manager's
                if manager.snapshot("g").status is ModelState.FAILED:
                    break
                await asyncio.sleep(0.01)
            snapshot = manager.snapshot("g")
            assert snapshot.status is ModelState.FAILED and "runtime lost" in str(snapshot.error)
            with pytest.raises(ModelUnavailable) as backing_off:
                await complete(manager)
            assert backing_off.value.retry_after_s >= 1
            clock.advance(backing_off.value.retry_after_s)
            assert await complete(manager) == 4  # loaded again, in a new process
        finally:
            await manager.aclose()

    asyncio.run(scenario())


def test_in_process_the_pipeline_is_this_processs_own(gpt2_dir: Path, genai_cache: Path) -> None:
    """What the benchmarks' raw ceiling drives step by step."""
    runtime = GenaiLMRuntime(gpt2_dir, genai_cache, precision=Precision.FP32,
                             generation=_generation(), in_process=True)
    assert runtime.pid is None and runtime.pipeline is not None
    assert _greedy(runtime, [runtime.encode(PROMPTS[1])], 3)[0]
    assert not runtime.busy()
    runtime.close()


@pytest.mark.parametrize(("pipeline_process", "threads", "child"), [
    (True, None, True), (False, 1, False),
    (None, None, False),  # every core computes: the GIL held during steps costs the loop less
    (None, 1, len(os.sched_getaffinity(0)) > 1),  # a core left to the event loop
])
def test_pipeline_process_or_free_cores_put_the_pipeline_in_a_child(
        pipeline_process: bool | None, threads: int | None, child: bool) -> None:
    from tidegate.runtimes import pipeline_in_child

    model = ModelConfig(id="g", runtime=RuntimeKind.CAUSAL_LM, source="unused",
                        intra_op_threads=threads,
                        generation=GenerationConfig(pipeline_process=pipeline_process))
    assert pipeline_in_child(model) is child


def test_the_config_picks_where_the_pipeline_runs(gpt2_dir: Path, genai_cache: Path) -> None:
    for pipeline_process in (True, False):
        runtime = create_runtime(
            ModelConfig(id="g", runtime=RuntimeKind.CAUSAL_LM, source=str(gpt2_dir),
                        backend=Backend.OPENVINO, precision=Precision.FP32,
                        generation=GenerationConfig(pipeline_process=pipeline_process)),
            genai_cache, {})
        assert isinstance(runtime, GenaiLMRuntime)
        assert (runtime.pid is not None) is pipeline_process
        runtime.close()
