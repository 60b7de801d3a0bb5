"""Causal language models with PyTorch on CPU: a local Hugging Face model directory, offline.

The runtime loads the model and its tokenizer and answers questions about them (context length,
end-of-sequence tokens, memory); generating is the job of
:class:`tidegate.generation.GenerationEngine`, which takes this runtime.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from tidegate.engines import Backend, Precision, Weights
from tidegate.generation.detok import TokenDecoder, fast_decoder
from tidegate.generation.worker import StepWorker, check_packed_steps
from tidegate.runtimes.linear_layout import convert_linears
from tidegate.runtimes.lm_text import LMText, default_chat_prompt, eos_token_ids

__all__ = ["CausalLMRuntime", "Dtype", "context_length_of", "default_chat_prompt"]

log = logging.getLogger("tidegate.runtimes.causal_lm")

Dtype = Literal["float32", "bfloat16"]
_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_FALLBACK_CONTEXT = 2048

def context_length_of(model_config: Any, tokenizer: Any) -> int:
    """The model's context: its position embeddings, else the tokenizer's limit."""
    config = model_config.get_text_config()
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        return positions
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:
        return limit
    return _FALLBACK_CONTEXT


def _check_cache_layout(model: Any) -> int | None:
    """The engine keeps one growing key/value tensor pair per layer; refuse caches it cannot
    keep that way (linear-attention, quantized or cross-attention ones) instead of generating
    wrong text. Returns the smallest sliding window among the model's layers, if any: within
    that many tokens a sliding-window layer attends to everything, exactly like a full one, so
    the model is served with its context capped there."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    cache = DynamicCache(config=model.config)
    windows = {int(layer.sliding_window) for layer in cache.layers
               if type(layer) is DynamicSlidingWindowLayer}
    odd = sorted({type(layer).__name__ for layer in cache.layers
                  if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer)})
    if odd or getattr(model.config, "add_cross_attention", False):
        raise ValueError(
            f"{type(model).__name__} needs cache layers of type {', '.join(odd) or 'cross'}, "
            "which the generation engine does not support yet"
        )
    return min(windows) if windows else None


class CausalLMRuntime(LMText):
    """A ``transformers`` causal LM and its tokenizer, loaded from a local directory.

    Blocking: construct it off the event loop. ``memory_bytes`` counts parameters and buffers
    (the KV cache of running sequences comes on top).
    """

    max_top_logprobs: int | None = None
    """Most alternatives per token this runtime's engine reports; None: as many as the API
    allows. (A runtime whose pipeline reports fewer sets it; the API refuses more.)"""

    def __init__(
        self,
        model_dir: Path,
        *,
        dtype: Dtype = "float32",
        max_context_tokens: int | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(get_args(Dtype))}, got {dtype!r}")
        if not model_dir.is_dir():
            raise FileNotFoundError(f"model source {model_dir} is not a directory")
        self.model_dir = model_dir
        self.dtype: Dtype = dtype
        self.tokenizer: Any = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.decoder: TokenDecoder = fast_decoder(self.tokenizer)
        """Decodes generated ids as ``tokenizer.decode`` does, faster where it can."""
        self.choose_encoder()
        self.model: Any = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=_DTYPES[dtype], local_files_only=True
        )
        self.model.train(False)  # inference mode for dropout and the like
        # fp32 few-row products are much faster in another layout (see linear_layout).
        self.converted_linears = convert_linears(self.model) if dtype == "float32" else 0
        window = _check_cache_layout(self.model)
        native = context_length_of(self.model.config, self.tokenizer)
        if window is not None and window < native:
            log.warning("%s uses sliding-window attention (window %d tokens): serving it with "
                        "its context capped at the window, where that attention is exact",
                        model_dir, window)
            native = window
        self.context_length = min(max_context_tokens or native, native)
        self.eos_token_ids = eos_token_ids(
            getattr(self.model, "generation_config", None), self.model.config, self.tokenizer)
        rows = getattr(self.model.get_input_embeddings(), "num_embeddings", None)
        self.vocab_size = rows if isinstance(rows, int) else int(
            self.model.config.get_text_config().vocab_size
        )
        # Refuse, now, a model whose attention the engine's packed steps cannot reproduce.
        self.materialized_cache = check_packed_steps(self.model, self.vocab_size)
        """The engine must hand the model whole caches (latent attention and the like)."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        self.memory_bytes = sum(t.numel() * t.element_size() for t in tensors)
        log.info("loaded %s (%s, %d bytes, context %d, %d linear layers converted)",
                 model_dir, dtype, self.memory_bytes, self.context_length,
                 self.converted_linears)

    backend = Backend.TORCH
    weights = Weights.ORIGINAL

    @property
    def precision(self) -> Precision:
        return Precision.BF16 if self.dtype == "bfloat16" else Precision.FP32

    def create_worker(self) -> StepWorker:
        return StepWorker(self.model, materialized=self.materialized_cache,
                          eos_token_ids=self.eos_token_ids)

    def close(self) -> None:
        self.model = None
