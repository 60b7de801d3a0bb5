"""Causal language models on OpenVINO GenAI's continuous-batching pipeline.

The model is exported once (:mod:`tidegate.runtimes.genai_export`) and served by one
``ContinuousBatchingPipeline`` per model, driven step by step by tidegate's engine
(:class:`~tidegate.generation.genai_worker.GenaiWorker`), in the server's process or in a child
process of its own (:mod:`tidegate.runtimes.genai_process`; ``[models.generation]
pipeline_process``): its step holds the GIL while it computes, which in the server's process
holds off the event loop. Tokenizing, chat templates and detokenizing stay with the model's
Hugging Face tokenizer (:class:`LMText`), as on torch.

Precision: ``bf16`` computes and keeps the KV cache in bf16; ``fp32`` is fp32 throughout (the KV
cache too, and OpenVINO's dynamic quantization off). A **load-time probe** generates a few
greedy tokens for three prompts with log-probabilities and compares them with transformers' own
fp32 forward over the same tokens: the largest log-probability difference, and how far each
chosen token lies below the reference's best, must stay within :data:`PROBE_TOLERANCE` for the
precision, else loading raises :class:`ProbeMismatch` naming the numbers.

Memory: the KV cache is allocated up front from ``kv_cache_bytes`` (default: room for
``max_num_seqs`` sequences of the full context), and :attr:`memory_bytes` counts it with the
weights, so the model cache makes room for both before loading.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tidegate.config import GenerationConfig
from tidegate.engines import Backend, Precision, Weights
from tidegate.generation.detok import fast_decoder
from tidegate.generation.engine import StepRunner
from tidegate.generation.genai_worker import GenaiWorker
from tidegate.runtimes.genai_compress import ensure_int8_weights
from tidegate.runtimes.genai_export import ensure_genai_export
from tidegate.runtimes.genai_process import (
    PipelineProcess,
    PipelineSpec,
    ProcessWorker,
    greedy_with_logprobs,
    open_pipeline,
)
from tidegate.runtimes.lm_text import LMText, eos_token_ids

__all__ = ["DEFAULT_KV_TOKENS", "INT8_PROBE_TOLERANCE", "KV_BLOCK_TOKENS", "PROBE_TOLERANCE",
           "GenaiLMRuntime",
           "ProbeMismatch", "kv_bytes_per_token"]

log = logging.getLogger("tidegate.runtimes.genai")

DEFAULT_KV_TOKENS = 8192
"""Without ``kv_cache_bytes``, the KV cache holds ``max_num_seqs`` sequences of the context
length, capped at this many tokens each (so a 128k-context model does not claim hundreds of GB);
a longer sequence still runs while blocks are free."""
KV_BLOCK_TOKENS = 32
"""Tokens per KV-cache block of the pipeline on CPU."""
PROBE_TOLERANCE: dict[Precision, float] = {Precision.FP32: 2e-3, Precision.BF16: 0.15}
"""Largest log-probability error (nats) the load-time probe accepts, per precision."""
INT8_PROBE_TOLERANCE = 0.5
"""Added to the precision's tolerance when the weights are int8."""
_PROBE_PROMPTS = ("The quick brown fox jumps over the lazy dog.",
                  "Serving many models in limited memory",
                  "1, 2, 3, 4,")
_PROBE_TOKENS = 4
_ELEMENT_BYTES = {Precision.FP32: 4, Precision.BF16: 2}
_FALLBACK_CONTEXT = 2048


class ProbeMismatch(RuntimeError):
    """The pipeline's log-probabilities differ from transformers' beyond the tolerance."""


@dataclass(frozen=True, slots=True)
class ProbeResult:
    max_logprob_error: float
    """Largest |pipeline - transformers| log-probability of a generated token (nats)."""
    max_choice_gap: float
    """Largest distance (nats) from a greedily chosen token to transformers' best one."""


def kv_bytes_per_token(model_config: Any, precision: Precision) -> int:
    """Bytes of KV cache one token takes: keys and values of every layer's KV heads."""
    config = model_config.get_text_config()
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
    layers = int(config.num_hidden_layers)
    return 2 * layers * kv_heads * int(head_dim) * _ELEMENT_BYTES[precision]


def _context_length(model_config: Any, tokenizer: Any) -> int:
    config = model_config.get_text_config()
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        native = positions
    else:
        limit = getattr(tokenizer, "model_max_length", None)
        native = limit if isinstance(limit, int) and 0 < limit < 1_000_000 else _FALLBACK_CONTEXT
    window = getattr(config, "sliding_window", None)
    if isinstance(window, int) and 0 < window < native \
            and getattr(config, "use_sliding_window", True) is not False:
        native = window  # within the window, sliding attention is exact
    return native


class GenaiLMRuntime(LMText):
    """A causal LM exported for OpenVINO GenAI, its pipeline and its tokenizer.

    Blocking: construct it off the event loop. Raises ``ExporterMissing`` / ``ExportFailed``
    (:mod:`tidegate.runtimes.genai_export`) or :class:`ProbeMismatch`.
    """

    backend = Backend.OPENVINO
    max_top_logprobs = 0
    """The pipeline reports only the chosen token's log-probability."""

    def __init__(
        self,
        model_dir: Path,
        cache_dir: Path,
        *,
        precision: Precision,
        generation: GenerationConfig,
        threads: int | None = None,
        weights: Weights = Weights.ORIGINAL,
        exporter_dir: Path | None = None,
        in_process: bool = False,
    ) -> None:
        """``in_process``: the pipeline in this process (the benchmarks' raw ceiling drives it
        directly); else in a child process of its own (see :mod:`.genai_process`)."""
        from transformers import AutoConfig, AutoTokenizer

        if precision is Precision.AUTO:
            raise ValueError("resolve precision 'auto' before loading")
        if not model_dir.is_dir():
            raise FileNotFoundError(f"model source {model_dir} is not a directory")
        self.model_dir = model_dir
        self.precision = precision
        self.tokenizer: Any = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.decoder = fast_decoder(self.tokenizer)
        self.choose_encoder()
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        native = _context_length(config, self.tokenizer)
        self.context_length = min(generation.max_context_tokens or native, native)
        self.vocab_size = int(config.get_text_config().vocab_size)
        self.eos_token_ids = eos_token_ids(_generation_defaults(model_dir), config,
                                           self.tokenizer)
        per_token = kv_bytes_per_token(config, precision)
        self.kv_cache_bytes = generation.kv_cache_bytes or (
            generation.max_num_seqs * min(self.context_length, DEFAULT_KV_TOKENS) * per_token)
        blocks = max(1, self.kv_cache_bytes // (per_token * KV_BLOCK_TOKENS))
        if blocks * KV_BLOCK_TOKENS < self.context_length:
            log.warning("%s: kv_cache_bytes=%d holds %d tokens, less than one full context "
                        "(%d); longer sequences are refused", model_dir, self.kv_cache_bytes,
                        blocks * KV_BLOCK_TOKENS, self.context_length)
        self.weights = weights
        self.export_dir = ensure_genai_export(model_dir, cache_dir, exporter_dir=exporter_dir)
        if weights is Weights.INT8:
            self.export_dir = ensure_int8_weights(self.export_dir)
        self.spec = PipelineSpec(
            export_dir=self.export_dir, precision=precision,
            max_num_seqs=generation.max_num_seqs,
            # tidegate's engine bounds each step's prefill; the pipeline must accept what it
            # admits.
            max_batched_tokens=generation.max_prefill_tokens + generation.max_num_seqs,
            blocks=blocks, threads=threads, eos_token_ids=tuple(sorted(self.eos_token_ids)),
            vocab_size=self.vocab_size)
        self.pipeline: Any = open_pipeline(self.spec) if in_process else None
        self._process = None if in_process else PipelineProcess(
            self.spec, name=f"tidegate-genai-{model_dir.name}")
        weights_bytes = (self.export_dir / "openvino_model.bin").stat().st_size
        self.memory_bytes = weights_bytes + self.kv_cache_bytes
        try:
            self.probe = self._probe()
        except BaseException:
            self.close()
            raise
        log.info("loaded %s on OpenVINO GenAI (%s, %s weights: %d bytes, KV cache %d bytes in %d "
                 "blocks, context %d, probe error %.2g nats)", model_dir, precision.value,
                 self.weights.value, weights_bytes, self.kv_cache_bytes, blocks,
                 self.context_length, max(self.probe.max_logprob_error, self.probe.max_choice_gap))

    @property
    def pid(self) -> int | None:
        """The pipeline's process (None in process)."""
        return None if self._process is None else self._process.pid

    def create_worker(self) -> StepRunner:
        if self._process is not None:
            return ProcessWorker(self._process)
        return GenaiWorker(self.pipeline, eos_token_ids=self.eos_token_ids,
                           vocab_size=self.vocab_size)

    def busy(self) -> bool:
        """The pipeline still holds requests (cancelled ones free theirs at the next step)."""
        if self._process is not None:
            return bool(self._process.call("busy"))
        return bool(self.pipeline.has_non_finished_requests())

    def close(self) -> None:
        self.pipeline = None
        if self._process is not None:
            self._process.close()

    def _generate_probe(self, prompts: list[list[int]]) -> list[tuple[list[int], list[float]]]:
        if self._process is not None:
            result: list[tuple[list[int], list[float]]] = self._process.call(
                "probe", (prompts, _PROBE_TOKENS))
            return result
        return greedy_with_logprobs(self.pipeline, prompts, tokens=_PROBE_TOKENS,
                                    eos_token_ids=self.eos_token_ids, vocab_size=self.vocab_size)

    def _probe(self) -> ProbeResult:
        import torch
        from transformers import AutoModelForCausalLM

        prompts = [[t % self.vocab_size for t in self.encode(text)] or [0]
                   for text in _PROBE_PROMPTS]
        generated = self._generate_probe(prompts)
        model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32,
                                                     local_files_only=True)
        model.train(False)
        error = gap = 0.0
        with torch.inference_mode():
            for prompt, (tokens, logprobs) in zip(prompts, generated, strict=True):
                ids = torch.tensor([prompt + tokens[:-1]])
                reference = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
                for step, (token, logprob) in enumerate(zip(tokens, logprobs, strict=True)):
                    row = reference[len(prompt) - 1 + step]
                    error = max(error, abs(float(row[token]) - logprob))
                    gap = max(gap, float(row.max()) - float(row[token]))
        del model
        result = ProbeResult(max_logprob_error=error, max_choice_gap=gap)
        tolerance = PROBE_TOLERANCE[self.precision] + (
            INT8_PROBE_TOLERANCE if self.weights is Weights.INT8 else 0.0)
        if max(error, gap) > tolerance:
            raise ProbeMismatch(
                f"{self.model_dir}: OpenVINO GenAI ({self.precision.value}, "
                f"{self.weights.value} weights) differs from "
                f"transformers on the load-time probe: log-probabilities by up to {error:.3g} "
                f"nats, chosen tokens up to {gap:.3g} nats below the best (tolerance "
                f"{tolerance:g})")
        return result


def _generation_defaults(model_dir: Path) -> Any:
    from transformers import GenerationConfig as HFGenerationConfig

    try:
        return HFGenerationConfig.from_pretrained(model_dir, local_files_only=True)
    except OSError:  # no generation_config.json
        return None
