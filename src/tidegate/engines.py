"""Which compute engine and number format serve a model: one vocabulary for the config, the
runtimes and the API. A leaf module: it imports nothing from tidegate."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

__all__ = [
    "DEFAULT_MAX_SCORE_ERROR",
    "DEFAULT_MIN_COSINE",
    "Backend",
    "Precision",
    "Weights",
    "cpu_supports_bf16",
]

DEFAULT_MIN_COSINE = 0.9999
"""Reduced precision must keep every load-time probe vector within this cosine of fp32."""
DEFAULT_MAX_SCORE_ERROR = 1e-3
"""Reduced precision must keep every load-time probe score (a cross-encoder's raw logit)
within this absolute difference of fp32."""


class Backend(StrEnum):
    """``[[models]] backend``: the engine that computes a local model."""

    AUTO = "auto"
    """OpenVINO on x86 CPUs (the engine made for them); see each runtime for its fallback."""
    OPENVINO = "openvino"
    ONNXRUNTIME = "onnxruntime"
    TORCH = "torch"


class Precision(StrEnum):
    """``[[models]] precision``: the number format the engine computes in."""

    AUTO = "auto"
    """bf16 where the CPU computes it natively (and the load-time probe agrees), else fp32."""
    FP32 = "fp32"
    BF16 = "bf16"


class Weights(StrEnum):
    """``[[models]] weights``: how a causal LM's weights are stored on OpenVINO."""

    ORIGINAL = "original"
    """As exported: fp32 (computed in the model's ``precision``)."""
    INT8 = "int8"
    """int8 with a scale per output channel for every linear layer (embeddings stay fp32)."""


_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_supports_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True when the CPU has native bf16 arithmetic (AVX512-BF16 or AMX-BF16).

    Read from the kernel's CPU flags, so checking costs no engine import; without bf16
    instructions OpenVINO would silently compute in fp32 anyway.
    """
    try:
        text = cpuinfo.read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return not _BF16_FLAGS.isdisjoint(line.partition(":")[2].split())
    return False
