"""Choose an embedding model's engine and precision, and guard reduced precision at load.

A reduced precision (bf16) is kept only if, on a fixed probe set of short and long texts, its
vectors stay within ``min_cosine`` of fp32 on the same engine; otherwise the model falls back
to fp32 and the log says so with the number. The decision is a pure function of the two
engines' outputs (:func:`min_cosine`), so it is tested without a model.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from tidegate.engines import Backend, Precision
from tidegate.runtimes.encoders import Encoder, IntArray, open_encoder

__all__ = [
    "EngineChoice",
    "choose_engine",
    "min_cosine",
    "probe_texts",
    "resolve_backend",
    "resolve_precision",
]

log = logging.getLogger("tidegate.runtimes.embedding")

_SENTENCE = (
    "the river carries light cold water past old stone mills where children learned to count "
    "boats and herons while engineers measured flow rates tides salinity and silt in 1987 "
    "naïve café résumé Zürich 東京 🙂 protein kinase inhibitors reduce tumour growth in mice"
)
_WORDS = _SENTENCE.split(" ")


def probe_texts(limit_tokens: int) -> list[str]:
    """A fixed probe set: a word, sentences, a passage, and texts past the model's limit."""
    long_text = " ".join(_WORDS[i % len(_WORDS)] for i in range(limit_tokens * 2))
    passage = " ".join(_WORDS[(i * 7) % len(_WORDS)] for i in range(min(120, limit_tokens)))
    return [
        "x",
        "a cat sits on the mat",
        "What is the boiling point of water at high altitude?",
        "naïve café ☕ — unicode, numbers 3.14159 and symbols <>&%",
        passage,
        long_text,
        " ".join(reversed(long_text.split())),
    ]


def min_cosine(vectors: npt.NDArray[np.float32], reference: npt.NDArray[np.float32]) -> float:
    """The smallest row-wise cosine similarity between two batches of vectors."""
    a, b = vectors.astype(np.float64), reference.astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(((a * b).sum(axis=1) / np.maximum(norms, 1e-30)).min())


def resolve_backend(requested: Backend, machine: str | None = None) -> Backend:
    """``auto`` is OpenVINO on x86 CPUs, ONNX Runtime elsewhere."""
    if requested is not Backend.AUTO:
        return requested
    arch = (machine or platform.machine()).lower()
    return Backend.OPENVINO if arch in ("x86_64", "amd64") else Backend.ONNXRUNTIME


def resolve_precision(backend: Backend, requested: Precision, bf16_supported: bool) -> Precision:
    """``auto`` is bf16 on OpenVINO where the CPU computes it natively, else fp32.

    An explicit ``bf16`` that cannot run raises ValueError; configuration checks catch it
    before start-up (``tidegate.config``), this is the last line.
    """
    if requested is Precision.FP32:
        return Precision.FP32
    can_bf16 = backend is Backend.OPENVINO and bf16_supported
    if requested is Precision.BF16 and not can_bf16:
        reason = (
            "this CPU has no bf16 instructions (AVX512-BF16 or AMX)"
            if backend is Backend.OPENVINO
            else f"backend {backend.value!r} computes only fp32; use backend 'openvino'"
        )
        raise ValueError(f"precision 'bf16' cannot run: {reason}")
    return Precision.BF16 if can_bf16 else Precision.FP32


@dataclass(frozen=True, slots=True)
class EngineChoice:
    """The engine a model serves with, and what the load-time probe measured."""

    encoder: Encoder
    probe_min_cosine: float
    """bf16 vs fp32 on the probe set; 1.0 when the model runs in fp32 (nothing to compare)."""
    fell_back: bool
    """True when reduced precision was wanted (asked for or chosen by ``auto``) and refused."""


def choose_engine(
    model_id: str, model_dir: Path, cache_dir: Path, *, backend: Backend, precision: Precision,
    threads: int | None, threshold: float, probe: tuple[IntArray, IntArray],
    bf16_supported: Callable[[], bool],
) -> EngineChoice:
    """Open the engine for ``backend``/``precision`` (``auto`` resolved here) and guard bf16."""
    backend = resolve_backend(backend)
    wanted = resolve_precision(backend, precision, bf16_supported())
    exact = open_encoder(backend, Precision.FP32, model_dir, cache_dir, threads=threads)
    if wanted is Precision.FP32:
        return EngineChoice(exact, 1.0, fell_back=False)
    reduced = open_encoder(backend, wanted, model_dir, cache_dir, threads=threads)
    try:
        measured = min_cosine(reduced.infer(*probe), exact.infer(*probe))
    except BaseException:
        reduced.close()
        exact.close()
        raise
    if measured < threshold:
        log.warning(
            "%s: %s on %s reaches a minimum cosine of %.6f vs fp32 on the probe set, below "
            "min_cosine %.6f; serving in fp32", model_id, wanted.value, backend.value,
            measured, threshold,
        )
        reduced.close()
        return EngineChoice(exact, measured, fell_back=True)
    exact.close()
    log.info(
        "%s: %s on %s, minimum cosine %.6f vs fp32 on the probe set",
        model_id, wanted.value, backend.value, measured,
    )
    return EngineChoice(reduced, measured, fell_back=False)
