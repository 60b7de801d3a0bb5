"""Choose an encoder model's engine and precision, and guard reduced precision at load.

A reduced precision (bf16) is kept only if, on a fixed probe set of short and long texts, its
outputs stay within a :class:`Tolerance` of fp32 on the same engine: an embedding model's
vectors within ``min_cosine`` (:func:`cosine_tolerance`), a cross-encoder's raw scores within
``max_score_error`` (:func:`score_tolerance`). Otherwise the model falls back to fp32 and the
log says so with the number (or, with ``strict`` and an explicit bf16, refuses to load). The
decision is a pure function of the two engines' outputs (:func:`min_cosine`,
:func:`max_abs_error`), so it is tested without a model.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from tidegate.engines import Backend, Precision
from tidegate.runtimes.encoders import Encoder, IntArray, open_encoder
from tidegate.runtimes.onnx_export import GraphKind

__all__ = [
    "EngineChoice",
    "Tolerance",
    "choose_engine",
    "cosine_tolerance",
    "max_abs_error",
    "min_cosine",
    "probe_texts",
    "resolve_backend",
    "resolve_precision",
    "score_tolerance",
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


def max_abs_error(scores: npt.NDArray[np.float32], reference: npt.NDArray[np.float32]) -> float:
    """The largest absolute difference between two batches of scores (logits)."""
    return float(np.abs(scores.astype(np.float64) - reference.astype(np.float64)).max())


Figure = Callable[[npt.NDArray[np.float32], npt.NDArray[np.float32]], float]


@dataclass(frozen=True, slots=True)
class Tolerance:
    """How far reduced precision may drift from fp32 on the probe set."""

    figure: str
    """What is measured, for the log (``minimum cosine``)."""
    key: str
    """The config key that sets :attr:`limit` (``min_cosine``)."""
    limit: float
    measure: Figure
    at_least: bool
    """True: the measured figure must reach the limit; False: stay at or under it."""
    exact: float
    """The figure when the model computes in fp32 (nothing to compare)."""

    def accepts(self, measured: float) -> bool:
        return measured >= self.limit if self.at_least else measured <= self.limit


def cosine_tolerance(limit: float) -> Tolerance:
    """Embedding vectors: every probe vector's cosine with fp32's at least ``limit``."""
    return Tolerance("minimum cosine", "min_cosine", limit, min_cosine, at_least=True, exact=1.0)


def score_tolerance(limit: float) -> Tolerance:
    """Cross-encoder logits: no probe score further than ``limit`` from fp32's."""
    return Tolerance("largest score difference", "max_score_error", limit, max_abs_error,
                     at_least=False, exact=0.0)


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
    probe: float
    """bf16 vs fp32 on the probe set, in the tolerance's figure; its ``exact`` value when the
    model runs in fp32 (nothing to compare)."""
    fell_back: bool
    """True when reduced precision was wanted (asked for or chosen by ``auto``) and refused."""


def choose_engine(
    model_id: str, model_dir: Path, cache_dir: Path, *, backend: Backend, precision: Precision,
    threads: int | None, tolerance: Tolerance, probe: Sequence[IntArray],
    bf16_supported: Callable[[], bool], graph_kind: GraphKind = "embedding",
    strict: bool = False,
) -> EngineChoice:
    """Open the engine for ``backend``/``precision`` (``auto`` resolved here) and guard bf16.

    ``probe`` is the graph's padded inputs. With ``strict``, an explicit ``bf16`` that fails
    the probe raises ValueError instead of falling back (``auto`` still falls back)."""
    backend = resolve_backend(backend)
    wanted = resolve_precision(backend, precision, bf16_supported())
    exact = open_encoder(backend, Precision.FP32, model_dir, cache_dir, threads=threads,
                         graph_kind=graph_kind)
    if wanted is Precision.FP32:
        return EngineChoice(exact, tolerance.exact, fell_back=False)
    try:
        reduced = open_encoder(backend, wanted, model_dir, cache_dir, threads=threads,
                               graph_kind=graph_kind)
    except BaseException:
        exact.close()
        raise
    try:
        measured = tolerance.measure(reduced.infer(*probe), exact.infer(*probe))
    except BaseException:
        reduced.close()
        exact.close()
        raise
    if not tolerance.accepts(measured):
        reduced.close()
        report = (f"{model_id}: {wanted.value} on {backend.value} reaches a {tolerance.figure} "
                  f"of {measured:.6g} vs fp32 on the probe set, beyond {tolerance.key} "
                  f"{tolerance.limit:.6g}")
        if strict and precision is Precision.BF16:
            exact.close()
            raise ValueError(f"{report}; use precision 'auto' or 'fp32', or raise "
                             f"{tolerance.key}")
        log.warning("%s; serving in fp32", report)
        return EngineChoice(exact, measured, fell_back=True)
    exact.close()
    log.info(
        "%s: %s on %s, %s %.6g vs fp32 on the probe set",
        model_id, wanted.value, backend.value, tolerance.figure, measured,
    )
    return EngineChoice(reduced, measured, fell_back=False)
