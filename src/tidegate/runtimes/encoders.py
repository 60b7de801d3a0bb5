"""The engines under an encoder model: each runs an exported graph (``onnx_export``: an
embedding model's pooled, L2-normalized vectors, or a cross-encoder's logits) on a padded batch
of token ids. OpenVINO is the default on x86 (bf16 where the CPU computes it natively); ONNX
Runtime fp32 is the alternative. Both read the same exported graph."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from tidegate.engines import Backend, Precision
from tidegate.runtimes.onnx_export import GraphKind, ensure_onnx
from tidegate.runtimes.openvino_export import compiled_cache_dir, ensure_openvino_ir

__all__ = ["Encoder", "OnnxEncoder", "OpenVinoEncoder", "open_encoder"]

log = logging.getLogger("tidegate.runtimes.embedding")

IntArray = npt.NDArray[np.int64]


class Encoder(Protocol):
    """A compiled graph: ids, mask and (for a scores graph of a model with segment embeddings)
    token types, each batch x length int64, -> one row per sequence (a unit vector, or logits)."""

    backend: Backend
    precision: Precision
    memory_bytes: int
    dimensions: int
    """The output row's length (vector size, or number of labels)."""

    def infer(self, input_ids: IntArray, attention_mask: IntArray,
              token_type_ids: IntArray | None = None) -> npt.NDArray[np.float32]: ...

    def close(self) -> None: ...


def _threads(requested: int | None) -> int:
    return requested or len(os.sched_getaffinity(0))


def _feeds(input_ids: IntArray, attention_mask: IntArray,
           token_type_ids: IntArray | None) -> dict[str, IntArray]:
    feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
    if token_type_ids is not None:
        feeds["token_type_ids"] = token_type_ids
    return feeds


class OnnxEncoder:
    """ONNX Runtime, fp32, on the CPU execution provider."""

    backend = Backend.ONNXRUNTIME
    precision = Precision.FP32

    def __init__(self, model_dir: Path, cache_dir: Path, *, threads: int | None = None,
                 graph_kind: GraphKind = "embedding") -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = _threads(threads)
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning worker threads burn the cores the event loop needs between batches.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        graph = ensure_onnx(model_dir, cache_dir, graph=graph_kind)
        try:
            session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # a graph that verified but does not load: rebuild once
            log.warning("ONNX Runtime could not load %s (%s); re-exporting", graph, exc)
            graph = ensure_onnx(model_dir, cache_dir, graph=graph_kind, force=True)
            session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        self._session: Any = session
        self.graph_path = graph
        self.memory_bytes = graph.stat().st_size
        self.dimensions = int(session.get_outputs()[0].shape[1] or 0)

    def infer(self, input_ids: IntArray, attention_mask: IntArray,
              token_type_ids: IntArray | None = None) -> npt.NDArray[np.float32]:
        outputs = self._session.run(None, _feeds(input_ids, attention_mask, token_type_ids))
        result: npt.NDArray[np.float32] = outputs[0]
        return result

    def close(self) -> None:
        self._session = None


SHAPE_CACHE_ENTRIES = 128
"""Input shapes whose prepared kernels OpenVINO's CPU plugin keeps (``CPU_RUNTIME_CACHE_CAPACITY``,
least recently used first out). Its default, 5,000, let memory grow with every new (batch size,
length) pair, ~600 KiB each for MiniLM: 1,600 batches of random shapes (sizes 1-64, lengths
8-24) grew a process by 628 MB, where 128 entries held it at +136-158 MB, as fast at one
repeated shape (100 batches of 64 x 16: 3.69 s against 3.83 s). Batches sized by load (a
bound in time on the queue) meet hundreds of shapes."""


class OpenVinoEncoder:
    """OpenVINO on the CPU, compiled for latency (one stream over ``threads`` cores).

    Each thread that calls :meth:`infer` gets its own infer request, so concurrent batches
    (``max_concurrent_batches`` > 1) never share one.
    """

    backend = Backend.OPENVINO

    def __init__(
        self, model_dir: Path, cache_dir: Path, *, precision: Precision,
        threads: int | None = None, graph_kind: GraphKind = "embedding",
    ) -> None:
        import openvino as ov

        if precision not in (Precision.FP32, Precision.BF16):
            raise ValueError(f"OpenVinoEncoder needs a resolved precision, got {precision}")
        self.precision: Precision = precision
        core = ov.Core()
        core.set_property({"CACHE_DIR": str(compiled_cache_dir(cache_dir))})
        settings = {
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": _threads(threads),
            "INFERENCE_PRECISION_HINT": "bf16" if precision is Precision.BF16 else "f32",
            "CPU_RUNTIME_CACHE_CAPACITY": SHAPE_CACHE_ENTRIES,
        }
        ir = ensure_openvino_ir(model_dir, cache_dir, graph_kind=graph_kind)
        try:
            compiled = core.compile_model(str(ir), "CPU", settings)
        except Exception as exc:  # an IR that verified but does not compile: rebuild once
            log.warning("OpenVINO could not compile %s (%s); converting again", ir, exc)
            ir = ensure_openvino_ir(model_dir, cache_dir, graph_kind=graph_kind, force=True)
            compiled = core.compile_model(str(ir), "CPU", settings)
        self._compiled: Any = compiled
        self._local = threading.local()
        self.ir_path = ir
        self.memory_bytes = ir.with_suffix(".bin").stat().st_size
        self.dimensions = int(compiled.outputs[0].get_partial_shape()[1].get_length())

    def infer(self, input_ids: IntArray, attention_mask: IntArray,
              token_type_ids: IntArray | None = None) -> npt.NDArray[np.float32]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        # share_inputs: no copy in; the output is copied out (the request reuses its buffer).
        outputs = request.infer(
            _feeds(input_ids, attention_mask, token_type_ids), share_inputs=True
        )
        result: npt.NDArray[np.float32] = outputs[0]
        return result

    def close(self) -> None:
        self._compiled = None
        self._local = threading.local()


def open_encoder(
    backend: Backend, precision: Precision, model_dir: Path, cache_dir: Path,
    *, threads: int | None = None, graph_kind: GraphKind = "embedding",
) -> Encoder:
    """Compile ``model_dir``'s ``graph_kind`` graph on a resolved backend (not AUTO) in a
    resolved precision."""
    if backend is Backend.OPENVINO:
        return OpenVinoEncoder(model_dir, cache_dir, precision=precision, threads=threads,
                               graph_kind=graph_kind)
    if backend is Backend.ONNXRUNTIME and precision is Precision.FP32:
        return OnnxEncoder(model_dir, cache_dir, threads=threads, graph_kind=graph_kind)
    raise ValueError(f"no encoder engine for backend {backend} in {precision}")
