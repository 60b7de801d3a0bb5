"""The cross-encoder runtime against transformers' own forward, its truncation, its scores, the
bf16 guard, and the served model's batching and errors."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tidegate.config import ModelConfig
from tidegate.engines import Backend, Precision, cpu_supports_bf16
from tidegate.errors import ConfigError, InvalidRequest
from tidegate.kinds import ModelKind, RuntimeKind
from tidegate.metrics import Metrics
from tidegate.models.served import RerankModel, served_model
from tidegate.runtimes import create_runtime
from tidegate.runtimes.cross_encoder import CrossEncoderRuntime, relevance_scores
from tidegate.runtimes.precision_guard import max_abs_error, score_tolerance

QUERY = "what do cats eat?"
DOCUMENTS = [
    "Cats are obligate carnivores: they eat meat.",
    "The stock market fell sharply on Tuesday.",
    "x",
    "naïve café ☕ — unicode survives tokenization",
    "cats " * 600,  # cut to the model's limit
]
needs_bf16 = pytest.mark.skipif(not cpu_supports_bf16(), reason="no bf16 instructions")


@pytest.fixture(scope="module")
def onnx_fp32(cross_encoder_dir: Path, cache_dir: Path) -> Iterator[CrossEncoderRuntime]:
    runtime = CrossEncoderRuntime(cross_encoder_dir, cache_dir, backend=Backend.ONNXRUNTIME)
    yield runtime
    runtime.close()


def logits(runtime: CrossEncoderRuntime, query: str, documents: list[str]) -> np.ndarray:
    return runtime.run_batch([p.payload for p in runtime.prepare_pairs(query, documents)])


def reference_logits(model_dir: Path, query: str, documents: list[str], limit: int
                     ) -> np.ndarray:
    """transformers' own tokenizer and forward, fp32."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    batch = tokenizer([query] * len(documents), documents, padding=True,
                      truncation="only_second", max_length=limit, return_tensors="pt")
    with torch.no_grad():
        result: np.ndarray = model(**batch).logits.numpy()
    return result


def test_fp32_scores_equal_transformers_forward(
    onnx_fp32: CrossEncoderRuntime, cross_encoder_dir: Path
) -> None:
    reference = reference_logits(cross_encoder_dir, QUERY, DOCUMENTS, onnx_fp32.max_input_tokens)
    batched = logits(onnx_fp32, QUERY, DOCUMENTS)
    alone = np.concatenate([logits(onnx_fp32, QUERY, [d]) for d in DOCUMENTS])
    assert batched.shape == (len(DOCUMENTS), 1) and onnx_fp32.num_labels == 1
    assert max_abs_error(batched, reference) <= 1e-5
    assert max_abs_error(alone, reference) <= 1e-5
    sigmoid = 1 / (1 + np.exp(-reference[:, 0].astype(np.float64)))
    assert np.abs(relevance_scores(batched, raw=False) - sigmoid).max() <= 1e-5
    assert onnx_fp32.engine_info.probe_key == "probe_max_score_error"
    assert onnx_fp32.probe_max_score_error == 0.0


def test_the_document_is_cut_not_the_query(onnx_fp32: CrossEncoderRuntime) -> None:
    short, cut = onnx_fp32.prepare_pairs(QUERY, ["a cat", "cats " * 600])
    (both,) = onnx_fp32.prepare_pairs("why " * 600, ["a cat"])
    assert not short.payload.truncated and short.tokens == len(short.payload.ids)
    assert cut.tokens == onnx_fp32.max_input_tokens == 512 and cut.payload.truncated
    # The query survives whole: segment 0 is "[CLS] what do cats eat ? [SEP]".
    assert cut.payload.type_ids.count(0) == 7 and cut.payload.ids[:7] == short.payload.ids[:7]
    # A query alone over the limit is cut too, rather than refused.
    assert both.tokens == 512 and both.payload.truncated


def test_configured_limit_and_token_types(cross_encoder_dir: Path, cache_dir: Path) -> None:
    runtime = CrossEncoderRuntime(cross_encoder_dir, cache_dir, backend=Backend.ONNXRUNTIME,
                                  max_input_tokens=16)
    try:
        (pair,) = runtime.prepare_pairs(QUERY, ["cats " * 100])
        assert pair.tokens == 16 and set(pair.payload.type_ids) == {0, 1}
    finally:
        runtime.close()


def test_scores_sigmoid_softmax_and_raw() -> None:
    one = np.array([[0.0], [2.0]], dtype=np.float32)
    assert np.allclose(relevance_scores(one, raw=False), [0.5, 1 / (1 + np.exp(-2.0))])
    assert np.allclose(relevance_scores(one, raw=True), [0.0, 2.0])
    two = np.array([[1.0, 3.0], [0.5, -0.5]], dtype=np.float32)
    softmax = np.exp(two) / np.exp(two).sum(axis=1, keepdims=True)
    assert np.allclose(relevance_scores(two, raw=False), softmax[:, 1])
    assert np.allclose(relevance_scores(two, raw=True), [3.0, -0.5])


def test_two_labels_use_the_softmax_last_column(
    cross_encoder_2label_dir: Path, cache_dir: Path
) -> None:
    runtime = CrossEncoderRuntime(cross_encoder_2label_dir, cache_dir,
                                  backend=Backend.ONNXRUNTIME)
    try:
        reference = reference_logits(cross_encoder_2label_dir, QUERY, DOCUMENTS[:3],
                                     runtime.max_input_tokens)
        computed = logits(runtime, QUERY, DOCUMENTS[:3])
        assert runtime.num_labels == 2 and max_abs_error(computed, reference) <= 1e-5
        softmax = np.exp(reference) / np.exp(reference).sum(axis=1, keepdims=True)
        assert np.abs(relevance_scores(computed, raw=False) - softmax[:, 1]).max() <= 1e-5
    finally:
        runtime.close()


def test_score_tolerance_is_the_largest_absolute_difference() -> None:
    tolerance = score_tolerance(1e-3)
    reference = np.array([[0.5], [-1.0]], dtype=np.float32)
    assert tolerance.accepts(tolerance.measure(reference + 5e-4, reference))
    drifted = reference + np.float32([[0.0], [2e-3]])
    assert not tolerance.accepts(tolerance.measure(drifted, reference))


@needs_bf16
def test_bf16_on_openvino_stays_within_the_guard(
    cross_encoder_dir: Path, cache_dir: Path, onnx_fp32: CrossEncoderRuntime
) -> None:
    runtime = CrossEncoderRuntime(cross_encoder_dir, cache_dir, backend=Backend.OPENVINO,
                                  precision=Precision.BF16)
    try:
        assert runtime.precision is Precision.BF16 and not runtime.precision_fell_back
        assert 0.0 < runtime.probe_max_score_error <= 1e-3
        difference = max_abs_error(logits(runtime, QUERY, DOCUMENTS),
                                   logits(onnx_fp32, QUERY, DOCUMENTS))
        assert difference <= 1e-2  # bf16: the guard's probe bounds it, not to 1e-5
    finally:
        runtime.close()


@needs_bf16
def test_guard_falls_back_under_auto_and_refuses_explicit_bf16(
    cross_encoder_dir: Path, cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, "tidegate.runtimes.embedding"):
        runtime = CrossEncoderRuntime(cross_encoder_dir, cache_dir, model_id="strict",
                                      backend=Backend.OPENVINO, max_score_error=1e-9)
    try:
        assert runtime.precision is Precision.FP32 and runtime.precision_fell_back
        assert runtime.probe_max_score_error > 1e-9
        assert "strict" in caplog.text and "max_score_error" in caplog.text
    finally:
        runtime.close()
    with pytest.raises(ValueError, match=r"largest score difference .* max_score_error"):
        CrossEncoderRuntime(cross_encoder_dir, cache_dir, backend=Backend.OPENVINO,
                            precision=Precision.BF16, max_score_error=1e-9)


def test_config_needs_a_source_and_checks_the_knob() -> None:
    with pytest.raises(ConfigError, match="source: must be a local model directory"):
        ModelConfig(id="r", runtime=RuntimeKind.CROSS_ENCODER)
    with pytest.raises(ConfigError, match="max_score_error: must be a number > 0"):
        ModelConfig(id="r", runtime=RuntimeKind.CROSS_ENCODER, source="/m", max_score_error=0)
    with pytest.raises(ConfigError, match="backend"):
        ModelConfig(id="r", runtime=RuntimeKind.CROSS_ENCODER, source="/m",
                    backend=Backend.TORCH)


def _served(model_dir: Path, cache_dir: Path, **settings: Any) -> RerankModel:
    config = ModelConfig(id="rr", runtime=RuntimeKind.CROSS_ENCODER, source=str(model_dir),
                         backend=Backend.ONNXRUNTIME, **settings)
    served = served_model(config, create_runtime(config, cache_dir, {}), Metrics())
    assert isinstance(served, RerankModel) and served.kind is ModelKind.RERANK
    return served


def test_served_model_batches_each_pair_and_refuses_other_routes(
    cross_encoder_dir: Path, cache_dir: Path, onnx_fp32: CrossEncoderRuntime
) -> None:
    served = _served(cross_encoder_dir, cache_dir)

    async def main() -> None:
        await served.start()
        try:
            result = await served.reranker().rerank(QUERY, DOCUMENTS)
            expected = relevance_scores(logits(onnx_fp32, QUERY, DOCUMENTS), raw=False)
            assert np.allclose(result.scores, expected, atol=1e-6)
            prepared = onnx_fp32.prepare_pairs(QUERY, DOCUMENTS)
            assert result.tokens == sum(p.tokens for p in prepared)
            assert served.batcher.statistics().items == len(DOCUMENTS)
            raw = await served.rerank(QUERY, DOCUMENTS[:2], raw=True)
            assert np.allclose(raw.scores, logits(onnx_fp32, QUERY, DOCUMENTS[:2])[:, 0],
                               atol=1e-6)
            with pytest.raises(InvalidRequest, match=r"'texts'\[4\].*512 tokens") as caught:
                await served.rerank(QUERY, DOCUMENTS, truncate=False, param="texts")
            assert caught.value.param == "texts"
            for refuse in (served.embedder, served.generator):
                with pytest.raises(InvalidRequest, match="cross-encoder") as wrong:
                    refuse()
                assert wrong.value.code == "wrong_model_type" and wrong.value.param == "model"
        finally:
            await served.aclose()

    asyncio.run(main())
