"""The ONNX Runtime MiniLM engine against sentence-transformers fp32 computed in the test."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tidegate.engines import Backend
from tidegate.runtimes.embedding import TextEmbeddingRuntime, model_token_limit
from tidegate.runtimes.onnx_export import ensure_onnx, model_fingerprint

TEXTS = [
    "a cat sits on the mat",
    "The quick brown fox jumps over the lazy dog near the quiet river bank.",
    "x",
    "naïve café ☕ — unicode survives tokenization",
    "long " * 600,  # truncated at 256 tokens by both
]


def embed(runtime: Any, texts: list[str]) -> np.ndarray:
    prepared = runtime.prepare(texts)
    return np.asarray(runtime.run_batch([p.payload for p in prepared]))


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))


def test_matches_sentence_transformers_batched_and_alone(
    minilm: Any, reference_model: Any
) -> None:
    reference = reference_model.encode(TEXTS, normalize_embeddings=True)
    batched = embed(minilm, TEXTS)
    alone = np.stack([embed(minilm, [t])[0] for t in TEXTS])
    assert batched.shape == (len(TEXTS), 384)
    assert cosines(batched, reference).min() >= 0.9999
    assert cosines(alone, reference).min() >= 0.9999
    assert np.allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)


def test_token_counts_include_special_tokens_and_truncation(minilm: Any, model_dir: Path) -> None:
    assert model_token_limit(model_dir) == 256
    assert minilm.max_input_tokens == 256
    counts = [p.tokens for p in minilm.prepare(["hello world", "long " * 600])]
    assert counts == [4, 256]


def test_its_tokenizer_reports_whole_inputs_without_truncating(minilm: Any) -> None:
    from tidegate.runtimes.tokenization import TextTokenizer

    tokenizer = minilm.text_tokenizer
    assert isinstance(tokenizer, TextTokenizer)
    assert tokenizer.max_model_len == 256
    assert tokenizer.max_token_id == 30521
    ids = tokenizer.tokenize("A cat sits on the mat.", add_special_tokens=True)
    assert tokenizer.token_strs(ids) == ["[CLS]", "a", "cat", "sits", "on", "the", "mat", ".",
                                         "[SEP]"]
    assert tokenizer.tokenize("A cat sits on the mat.", add_special_tokens=False) == ids[1:-1]
    assert tokenizer.detokenize(ids) == "[CLS] a cat sits on the mat. [SEP]"
    assert tokenizer.detokenize(ids[1:-1]) == "a cat sits on the mat."
    assert len(tokenizer.tokenize("long " * 600, add_special_tokens=True)) == 602
    assert [p.tokens for p in minilm.prepare(["long " * 600])] == [256]  # embedding truncates


def test_configured_limit_below_the_models(model_dir: Path, cache_dir: Path) -> None:
    runtime = TextEmbeddingRuntime(
        model_dir, cache_dir, backend=Backend.ONNXRUNTIME, max_input_tokens=16
    )
    assert [p.tokens for p in runtime.prepare(["word " * 100])] == [16]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete", "meta"])
def test_corrupt_or_missing_cache_is_rebuilt(
    damage: str, model_dir: Path, cache_dir: Path, tmp_path: Path, minilm: Any
) -> None:
    own_cache = tmp_path / "cache"
    entry = own_cache / "onnx" / model_fingerprint(model_dir)
    shutil.copytree(minilm.encoder.graph_path.parent, entry)
    graph = entry / "model.onnx"
    if damage == "truncate":
        with graph.open("r+b") as fh:
            fh.truncate(1000)
    elif damage == "garbage":
        with graph.open("r+b") as fh:
            fh.seek(5_000_000)
            fh.write(b"\x00garbage" * 100)
    elif damage == "delete":
        graph.unlink()
    else:
        (entry / "meta.json").write_text("{not json")
    runtime = TextEmbeddingRuntime(model_dir, own_cache, backend=Backend.ONNXRUNTIME)
    assert graph.stat().st_size == minilm.encoder.graph_path.stat().st_size
    assert np.allclose(embed(runtime, TEXTS[:2]), embed(minilm, TEXTS[:2]), atol=1e-6)


def test_valid_cache_is_reused(model_dir: Path, cache_dir: Path, minilm: Any) -> None:
    before = minilm.encoder.graph_path.stat().st_mtime_ns
    assert ensure_onnx(model_dir, cache_dir) == minilm.encoder.graph_path
    assert minilm.encoder.graph_path.stat().st_mtime_ns == before
