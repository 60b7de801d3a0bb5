"""Shared fixtures: one ONNX export per test session, and real server processes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tidegate cache for the whole session, so MiniLM is exported and converted once."""
    return tmp_path_factory.mktemp("tidegate-cache")


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from tidegate.runtimes.embedding import bundled_model_dir

    return bundled_model_dir()


@pytest.fixture(scope="session")
def minilm(model_dir: Path, cache_dir: Path) -> Iterator[object]:
    from tidegate.engines import Backend
    from tidegate.runtimes.embedding import TextEmbeddingRuntime

    runtime = TextEmbeddingRuntime(model_dir, cache_dir, backend=Backend.ONNXRUNTIME)
    yield runtime
    runtime.close()


@pytest.fixture(scope="session")
def reference_model(model_dir: Path) -> object:
    """sentence-transformers fp32 on PyTorch: the reference our runtime must match."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(model_dir), device="cpu")


# -- tiny random-weight causal LMs (built offline, saved with save_pretrained) -------------------
# A GPT-2 and a Llama sharing a byte-level BPE tokenizer trained on a few sentences.

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Café, naïve, résumé: déjà vu in Zürich.",
    "日本語のテキストと絵文字 🙂🚀 を含む文章。",
    "tidegate streams tokens to many clients at once.",
    "Ünïcödé byte pairs split characters across tokens.",
]
EOS = "<|endoftext|>"


def build_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS
    )


@pytest.fixture(scope="session")
def byte_tokenizer() -> Any:
    return build_tokenizer()


def save_model(model: Any, tokenizer: Any, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory, byte_tokenizer: Any) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=64, n_head=2, n_positions=256, vocab_size=len(byte_tokenizer),
        bos_token_id=byte_tokenizer.eos_token_id, eos_token_id=byte_tokenizer.eos_token_id,
        initializer_range=0.2,
    )
    return save_model(GPT2LMHeadModel(config), byte_tokenizer, tmp_path_factory.mktemp("gpt2"))


def llama_config(byte_tokenizer: Any) -> Any:
    """The small Llama (grouped-query attention) the generation tests serve."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, vocab_size=len(byte_tokenizer),
        bos_token_id=byte_tokenizer.eos_token_id, eos_token_id=byte_tokenizer.eos_token_id,
        initializer_range=0.2,
    )


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory, byte_tokenizer: Any) -> Path:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(byte_tokenizer))
    return save_model(model, byte_tokenizer, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def endless_dir(tmp_path_factory: pytest.TempPathFactory, byte_tokenizer: Any) -> Path:
    """A small Llama that never ends on its own: no end-of-sequence token, and a context of
    2**20 positions (rotary: no table to allocate). A request to it runs until its
    ``max_tokens``, its timeout or its client's disconnect."""
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=byte_tokenizer.backend_tokenizer, bos_token=EOS
    )
    config = llama_config(tokenizer)
    config.max_position_embeddings = 1 << 20
    config.eos_token_id = None
    torch.manual_seed(0)
    return save_model(LlamaForCausalLM(config), tokenizer, tmp_path_factory.mktemp("endless"))


WINDOW = 40
"""The sliding window of the ``windowed_dir`` models, well below their 256 positions."""


@pytest.fixture(scope="session", params=["mistral", "qwen2-hybrid", "gemma2", "gemma3"])
def windowed_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                 byte_tokenizer: Any) -> Path:
    """A sliding-window model: Mistral (every layer), Qwen2 with sliding layers above the
    first, Gemma 2 and Gemma 3 text models (sliding and full layers alternating)."""
    import torch
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(0)
    shape = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, vocab_size=len(byte_tokenizer),
        bos_token_id=byte_tokenizer.eos_token_id, eos_token_id=byte_tokenizer.eos_token_id,
        initializer_range=0.2, sliding_window=WINDOW,
    )
    model: Any
    if request.param == "mistral":
        model = MistralForCausalLM(MistralConfig(**shape))
    elif request.param == "qwen2-hybrid":
        model = Qwen2ForCausalLM(Qwen2Config(use_sliding_window=True, max_window_layers=1,
                                             **shape))
    elif request.param == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(head_dim=16, **shape))
    else:
        model = Gemma3ForCausalLM(Gemma3TextConfig(head_dim=16, **shape))
    return save_model(model, byte_tokenizer, tmp_path_factory.mktemp(request.param))


# -- tiny random-weight BERT cross-encoders (the bundled MiniLM tokenizer) -----------------------

@pytest.fixture(scope="session")
def cross_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One relevance logit (sentence-transformers' usual CrossEncoder head)."""
    from bench.tiny_cross_encoder import build_cross_encoder

    return build_cross_encoder(tmp_path_factory.mktemp("cross-encoder"))


@pytest.fixture(scope="session")
def cross_encoder_2label_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two labels (irrelevant, relevant): scored by the softmax's last column."""
    from bench.tiny_cross_encoder import CrossEncoderShape, build_cross_encoder

    return build_cross_encoder(tmp_path_factory.mktemp("cross-encoder-2"),
                               CrossEncoderShape(num_labels=2), seed=99)
