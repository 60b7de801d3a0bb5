"""The OpenVINO MiniLM engine: fp32 and bf16 against sentence-transformers fp32, the precision
guard, the IR cache, and choosing backend and precision for the CPU at hand."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tidegate.engines import Backend, Precision, cpu_supports_bf16
from tidegate.runtimes.embedding import TextEmbeddingRuntime
from tidegate.runtimes.onnx_export import model_fingerprint
from tidegate.runtimes.openvino_export import ensure_openvino_ir
from tidegate.runtimes.precision_guard import (
    min_cosine,
    probe_texts,
    resolve_backend,
    resolve_precision,
)

# Short and long texts: the long ones fill the model's 256-token window, where bf16 drifts most.
TEXTS = [
    "a cat sits on the mat",
    "The quick brown fox jumps over the lazy dog near the quiet river bank.",
    "x",
    "naïve café ☕ — unicode survives tokenization",
    " ".join(f"passage {i} about tides, estuaries and sediment transport" for i in range(40)),
    "long " * 600,
    " ".join(["retrieval augmented generation ranks passages by relevance"] * 30),
]

BF16 = cpu_supports_bf16()
needs_bf16 = pytest.mark.skipif(not BF16, reason="this CPU has no bf16 instructions")


def embed(runtime: Any, texts: list[str]) -> np.ndarray:
    return np.asarray(runtime.run_batch([p.payload for p in runtime.prepare(texts)]))


def openvino(model_dir: Path, cache_dir: Path, **kwargs: Any) -> TextEmbeddingRuntime:
    return TextEmbeddingRuntime(model_dir, cache_dir, backend=Backend.OPENVINO, **kwargs)


@pytest.fixture(scope="module")
def ov_fp32(model_dir: Path, cache_dir: Path) -> Iterator[TextEmbeddingRuntime]:
    runtime = openvino(model_dir, cache_dir, precision=Precision.FP32)
    yield runtime
    runtime.close()


def test_fp32_matches_sentence_transformers(ov_fp32: Any, reference_model: Any) -> None:
    reference = reference_model.encode(TEXTS, normalize_embeddings=True)
    batched, alone = embed(ov_fp32, TEXTS), np.stack([embed(ov_fp32, [t])[0] for t in TEXTS])
    assert (ov_fp32.backend, ov_fp32.precision) == (Backend.OPENVINO, Precision.FP32)
    assert ov_fp32.probe_min_cosine == 1.0
    assert min_cosine(batched, reference) >= 0.99999
    assert min_cosine(alone, reference) >= 0.99999
    assert batched.shape == (len(TEXTS), 384) and ov_fp32.dimensions == 384


@needs_bf16
def test_bf16_stays_within_the_guard(
    model_dir: Path, cache_dir: Path, reference_model: Any
) -> None:
    runtime = openvino(model_dir, cache_dir, precision=Precision.BF16)
    try:
        assert runtime.precision is Precision.BF16 and not runtime.precision_fell_back
        assert 0.9999 <= runtime.probe_min_cosine < 1.0  # bf16 really differs from fp32
        reference = reference_model.encode(TEXTS, normalize_embeddings=True)
        assert min_cosine(embed(runtime, TEXTS), reference) >= 0.9999
    finally:
        runtime.close()


@needs_bf16
def test_guard_falls_back_to_fp32_and_logs_the_number(
    model_dir: Path, cache_dir: Path, ov_fp32: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, "tidegate.runtimes.embedding"):
        runtime = openvino(
            model_dir, cache_dir, model_id="strict", precision=Precision.AUTO,
            min_cosine=0.9999999,
        )
    try:
        assert runtime.precision is Precision.FP32 and runtime.precision_fell_back
        assert runtime.probe_min_cosine < 0.9999999
        assert f"{runtime.probe_min_cosine:.6f}" in caplog.text and "strict" in caplog.text
        assert np.array_equal(embed(runtime, TEXTS[:3]), embed(ov_fp32, TEXTS[:3]))
    finally:
        runtime.close()


def test_cpu_without_bf16_runs_fp32_under_auto(model_dir: Path, cache_dir: Path) -> None:
    runtime = openvino(model_dir, cache_dir, bf16_supported=lambda: False)
    try:
        assert runtime.precision is Precision.FP32 and not runtime.precision_fell_back
    finally:
        runtime.close()
    with pytest.raises(ValueError, match="no bf16 instructions"):
        openvino(model_dir, cache_dir, precision=Precision.BF16, bf16_supported=lambda: False)


def test_auto_resolution() -> None:
    assert resolve_backend(Backend.AUTO, "x86_64") is Backend.OPENVINO
    assert resolve_backend(Backend.AUTO, "aarch64") is Backend.ONNXRUNTIME
    assert resolve_backend(Backend.ONNXRUNTIME, "x86_64") is Backend.ONNXRUNTIME
    assert resolve_precision(Backend.OPENVINO, Precision.AUTO, True) is Precision.BF16
    assert resolve_precision(Backend.OPENVINO, Precision.AUTO, False) is Precision.FP32
    assert resolve_precision(Backend.ONNXRUNTIME, Precision.AUTO, True) is Precision.FP32
    with pytest.raises(ValueError, match="computes only fp32"):
        resolve_precision(Backend.ONNXRUNTIME, Precision.BF16, True)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [("fpu avx2 avx512f avx512_bf16 vaes", True), ("fpu amx_bf16 amx_tile", True),
     ("fpu avx2 avx512f avx512_vnni", False)],
)
def test_cpu_flags(tmp_path: Path, flags: str, expected: bool) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    assert cpu_supports_bf16(cpuinfo) is expected
    assert cpu_supports_bf16(tmp_path / "missing") is False


def test_probe_set_reaches_the_models_limit(ov_fp32: Any) -> None:
    counts = [p.tokens for p in ov_fp32.prepare(probe_texts(ov_fp32.max_input_tokens))]
    assert min(counts) <= 3 and max(counts) == ov_fp32.max_input_tokens == 256


def test_min_cosine() -> None:
    a = np.array([[1.0, 0.0], [0.0, 2.0]], dtype=np.float32)
    b = np.array([[1.0, 0.0], [1.0, 1.0]], dtype=np.float32)
    assert min_cosine(a, b) == pytest.approx(2**-0.5)


@pytest.mark.parametrize("damage", ["truncate-bin", "garbage-bin", "delete-xml", "meta"])
def test_corrupt_ir_is_rebuilt(
    damage: str, model_dir: Path, cache_dir: Path, tmp_path: Path, ov_fp32: Any
) -> None:
    own_cache = tmp_path / "cache"
    fingerprint = model_fingerprint(model_dir)
    shutil.copytree(cache_dir / "onnx" / fingerprint, own_cache / "onnx" / fingerprint)
    entry = own_cache / "openvino" / fingerprint
    shutil.copytree(ov_fp32.encoder.ir_path.parent, entry)
    weights = entry / "model.bin"
    if damage == "truncate-bin":
        with weights.open("r+b") as fh:
            fh.truncate(1000)
    elif damage == "garbage-bin":
        with weights.open("r+b") as fh:
            fh.seek(5_000_000)
            fh.write(b"\x00garbage" * 100)
    elif damage == "delete-xml":
        (entry / "model.xml").unlink()
    else:
        (entry / "meta.json").write_text("{not json")
    runtime = openvino(model_dir, own_cache, precision=Precision.FP32)
    try:
        assert weights.stat().st_size == ov_fp32.encoder.ir_path.with_suffix(".bin").stat().st_size
        assert np.array_equal(embed(runtime, TEXTS[:2]), embed(ov_fp32, TEXTS[:2]))
    finally:
        runtime.close()


def test_valid_ir_is_reused(model_dir: Path, cache_dir: Path, ov_fp32: Any) -> None:
    xml = ov_fp32.encoder.ir_path
    before = (xml.stat().st_mtime_ns, xml.with_suffix(".bin").stat().st_mtime_ns)
    assert ensure_openvino_ir(model_dir, cache_dir) == xml
    assert (xml.stat().st_mtime_ns, xml.with_suffix(".bin").stat().st_mtime_ns) == before
    if BF16:  # OpenVINO caches the bf16 compile (the fp32 one compiles in milliseconds)
        assert any((cache_dir / "openvino" / "compiled").iterdir())
