"""Cross-encoders: a (query, document) pair in, one relevance logit row out.

A local Hugging Face sequence-classification directory (a sentence-transformers CrossEncoder
is one) with a fast tokenizer. It is exported to a ``scores`` graph (``onnx_export``) and run on
the same engines as embedding models (``encoders``), bf16 guarded by the probe's largest score
difference (``precision_guard.score_tolerance``). Each pair is one batcher item; its payload
is a :class:`PairTokens`, and :meth:`CrossEncoderRuntime.run_batch` returns the raw logits
``[pairs, num_labels]``: turning them into scores (:func:`relevance_scores`) is per request,
since raw scores are one of the answers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tidegate.engines import DEFAULT_MAX_SCORE_ERROR, Backend, Precision, cpu_supports_bf16
from tidegate.runtimes.base import EngineInfo, Prepared
from tidegate.runtimes.embedding import open_tokenizers
from tidegate.runtimes.encoders import Encoder, IntArray
from tidegate.runtimes.onnx_export import graph_inputs
from tidegate.runtimes.padding import pad_batch, run_in_groups
from tidegate.runtimes.precision_guard import choose_engine, probe_texts, score_tolerance

__all__ = ["CrossEncoderRuntime", "PairTokens", "relevance_scores"]

log = logging.getLogger("tidegate.runtimes.cross_encoder")

Logits = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class PairTokens:
    """One (query, document) pair, tokenized as the model saw it."""

    ids: list[int]
    type_ids: list[int]
    truncated: bool
    """True when the pair was cut to the model's limit."""


def relevance_scores(logits: Logits, *, raw: bool) -> npt.NDArray[np.float64]:
    """One score per row: a single logit's sigmoid, or for two labels the softmax's last
    column (the "relevant" class); with ``raw``, that logit itself (the last column's)."""
    values = logits.astype(np.float64)
    if raw:
        return values[:, -1]
    # Softmax over two labels: its last column is the sigmoid of the logits' difference.
    margin = values[:, 0] if values.shape[1] == 1 else values[:, 1] - values[:, 0]
    result: npt.NDArray[np.float64] = 1.0 / (1.0 + np.exp(-margin))
    return result


def _probe_pairs(limit_tokens: int) -> list[tuple[str, str]]:
    """Short queries against short and over-long documents, and a long query."""
    texts = probe_texts(limit_tokens)
    return [(texts[i], texts[-1 - i]) for i in range(len(texts))]


class CrossEncoderRuntime:
    """Tokenize (query, document) pairs with the model's fast tokenizer, cutting the document
    (``only_second``) to fit ``max_input_tokens``; run the logits graph on an engine.

    A query so long that cutting the document cannot make the pair fit is cut too
    (``longest_first``) rather than refused. ``usage`` counts the pair's tokens as the model saw
    them, special tokens included.
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
        max_score_error: float = DEFAULT_MAX_SCORE_ERROR,
        max_input_tokens: int | None = None,
        intra_op_threads: int | None = None,
        bf16_supported: Callable[[], bool] = cpu_supports_bf16,
    ) -> None:
        self._tokenizer, self.text_tokenizer, self.max_input_tokens = open_tokenizers(
            model_dir, max_input_tokens)
        self._tokenizer.enable_truncation(self.max_input_tokens, strategy="only_second")
        self._tokenizer.no_padding()
        from tokenizers import Tokenizer

        self._fallback = Tokenizer.from_str(self._tokenizer.to_str())
        self._fallback.enable_truncation(self.max_input_tokens, strategy="longest_first")
        self._fallback.no_padding()
        pad_id = self._tokenizer.token_to_id("[PAD]")
        self._pad_id = pad_id if pad_id is not None else 0
        self._token_types = "token_type_ids" in graph_inputs(model_dir, "scores")

        probe = self._encode(_probe_pairs(self.max_input_tokens))
        choice = choose_engine(
            model_id or model_dir.name, model_dir, cache_dir, backend=backend,
            precision=precision, threads=intra_op_threads,
            tolerance=score_tolerance(max_score_error), graph_kind="scores", strict=True,
            probe=self._pad([p.payload for p in probe]), bf16_supported=bf16_supported,
        )
        self.encoder: Encoder = choice.encoder
        self.num_labels = choice.encoder.dimensions
        if self.num_labels not in (1, 2):
            self.encoder.close()
            raise ValueError(
                f"{model_dir} classifies into {self.num_labels} labels; a cross-encoder has 1 "
                "(a relevance logit) or 2 (irrelevant, relevant)"
            )
        self.backend = choice.encoder.backend
        self.precision = choice.encoder.precision
        self.probe_max_score_error = choice.probe
        self.precision_fell_back = choice.fell_back
        self.engine_info = EngineInfo(
            backend=self.backend.value, precision=self.precision.value,
            probe_key="probe_max_score_error", probe=self.probe_max_score_error,
        )
        self.memory_bytes = choice.encoder.memory_bytes

    def prepare_pairs(self, query: str, documents: Sequence[str]) -> list[Prepared]:
        """One batcher item per document: the (query, document) pair's tokens."""
        return self._encode([(query, document) for document in documents])

    def _encode(self, pairs: Sequence[tuple[str, str]]) -> list[Prepared]:
        try:
            encodings = self._tokenizer.encode_batch(list(pairs))
        except Exception:  # a query too long for only_second on some pair: pair by pair
            encodings = [self._encode_one(pair) for pair in pairs]
        return [
            Prepared(len(e.ids), PairTokens(e.ids, e.type_ids, bool(e.overflowing)))
            for e in encodings
        ]

    def _encode_one(self, pair: tuple[str, str]) -> Any:
        try:
            return self._tokenizer.encode(*pair)
        except Exception:
            return self._fallback.encode(*pair)

    def _pad(self, payloads: Sequence[PairTokens]) -> tuple[IntArray, ...]:
        types = [p.type_ids for p in payloads] if self._token_types else None
        return pad_batch([p.ids for p in payloads], self._pad_id, types)

    def run_batch(self, payloads: Sequence[Any]) -> Logits:
        """The logits ``[pairs, num_labels]``, in order; pairs of very different lengths run
        as separate forward calls (``padding.run_in_groups``)."""
        def run(indices: Sequence[int]) -> Logits:
            return self.encoder.infer(*self._pad([payloads[i] for i in indices]))

        return run_in_groups([len(p.ids) for p in payloads], run)

    def close(self) -> None:
        self.encoder.close()
