"""Export an encoder model to one ONNX graph, once, into a verified cache.

Two graphs (:data:`GraphKind`): ``embedding`` takes ``input_ids`` and ``attention_mask`` and
returns L2-normalized pooled embeddings; ``scores`` (a sequence-classification model, the
cross-encoder runtime) takes those and ``token_type_ids`` when the model has segment embeddings,
and returns the classification logits ``[batch, num_labels]``. Either way a batch is one
ONNX Runtime call. ONNX Runtime fp32 measured about 1.2-2x PyTorch fp32 for
MiniLM on 2 cores (BENCHMARKS.md) with outputs equal to 1e-7.

Cache layout (``<cache_dir>/onnx/<fingerprint>/``): ``model.onnx`` and ``meta.json``. The
fingerprint hashes the model directory's files (and the graph kind, for graphs other than
``embedding``), so a changed model gets a new entry. ``meta.json``
records the graph's SHA-256; a missing, truncated or corrupt graph fails that check and is
rebuilt. Exports are serialized across processes with a lock file and written atomically.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "EXPORT_FORMAT",
    "GraphKind",
    "PoolingMode",
    "ensure_onnx",
    "file_lock",
    "graph_inputs",
    "model_fingerprint",
    "read_pooling",
    "sha256_file",
]

log = logging.getLogger("tidegate.runtimes.export")

EXPORT_FORMAT = 1
"""Bumped when the exported graph changes shape or semantics; old cache entries are ignored."""

PoolingMode = Literal["mean", "cls"]
GraphKind = Literal["embedding", "scores"]
"""``embedding``: pooled, normalized vectors; ``scores``: a sequence classifier's logits."""
_HASHED_SUFFIXES = (".json", ".safetensors", ".bin", ".txt", ".model")


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_fingerprint(model_dir: Path, graph: GraphKind = "embedding") -> str:
    """A hash of every config, vocabulary and weight file under ``model_dir``, and of the graph
    kind (left out for ``embedding``, so entries exported before there were two stay valid)."""
    salt = "" if graph == "embedding" else f"-{graph}"
    digest = hashlib.sha256(f"tidegate-export-{EXPORT_FORMAT}{salt}".encode())
    for path in sorted(model_dir.rglob("*")):
        if path.is_file() and path.suffix in _HASHED_SUFFIXES:
            digest.update(str(path.relative_to(model_dir)).encode())
            digest.update(sha256_file(path).encode())
    return digest.hexdigest()[:20]


def read_pooling(model_dir: Path) -> PoolingMode:
    """The pooling a sentence-transformers directory declares; mean when it declares none."""
    config_path = model_dir / "1_Pooling" / "config.json"
    if not config_path.is_file():
        return "mean"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("pooling_mode_cls_token"):
        return "cls"
    if config.get("pooling_mode_mean_tokens", True):
        return "mean"
    raise ValueError(f"{config_path}: only mean or CLS pooling is supported")


def graph_inputs(model_dir: Path, graph: GraphKind) -> tuple[str, ...]:
    """The graph's input names, in order: ``token_type_ids`` only for a scores graph of a model
    with segment embeddings (BERT's ``type_vocab_size`` 2), where a pair's second text is
    segment 1."""
    names = ("input_ids", "attention_mask")
    if graph == "embedding":
        return names
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    type_vocab = config.get("type_vocab_size", 0) if isinstance(config, dict) else 0
    return (*names, "token_type_ids") if isinstance(type_vocab, int) and type_vocab > 1 else names


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock across processes, held on ``path`` (created if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _is_valid(entry: Path) -> bool:
    meta_path, graph = entry / "meta.json", entry / "model.onnx"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not graph.is_file() or graph.stat().st_size != meta.get("onnx_bytes"):
        return False
    return bool(sha256_file(graph) == meta.get("onnx_sha256"))


def ensure_onnx(
    model_dir: Path, cache_dir: Path, *, graph: GraphKind = "embedding", force: bool = False
) -> Path:
    """Return the path of a verified ONNX ``graph`` for ``model_dir``, exporting it if needed."""
    entry = cache_dir / "onnx" / model_fingerprint(model_dir, graph)
    if not force and _is_valid(entry):
        return entry / "model.onnx"
    with file_lock(entry.with_suffix(".lock")):
        if not force and _is_valid(entry):  # another process exported while we waited
            return entry / "model.onnx"
        if (entry / "model.onnx").exists() or (entry / "meta.json").exists():
            log.warning("ONNX cache entry %s is corrupt or incomplete; rebuilding it", entry)
        _export(model_dir, entry, graph)
    return entry / "model.onnx"


def _export(model_dir: Path, entry: Path, graph: GraphKind) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    import torch  # heavy: imported only when a graph must be built
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    inputs = graph_inputs(model_dir, graph)
    module, output, pooling = (
        _embedding_module(model_dir) if graph == "embedding" else _scores_module(model_dir)
    )
    entry.mkdir(parents=True, exist_ok=True)
    tmp_graph = entry / f"model.onnx.tmp{os.getpid()}"
    sample = torch.ones((2, 8), dtype=torch.long)  # ones: a valid token type for every model
    # The tracer warns about shapes it treats as constants; the dynamic axes cover them, and the
    # output is checked against the PyTorch model by the test suite.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            tuple(sample for _ in inputs),
            str(tmp_graph),
            input_names=list(inputs),
            output_names=[output],
            dynamic_axes={
                **{name: {0: "batch", 1: "sequence"} for name in inputs},
                output: {0: "batch"},
            },
            opset_version=17,
            dynamo=False,
        )
    meta = {
        "format": EXPORT_FORMAT,
        "source": str(model_dir),
        "graph": graph,
        "pooling": pooling,
        "torch": torch.__version__,
        "onnx_bytes": tmp_graph.stat().st_size,
        "onnx_sha256": sha256_file(tmp_graph),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (entry / "meta.json").unlink(missing_ok=True)
    os.replace(tmp_graph, entry / "model.onnx")
    tmp_meta = entry / f"meta.json.tmp{os.getpid()}"
    tmp_meta.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    os.replace(tmp_meta, entry / "meta.json")
    log.info(
        "exported %s to %s in %.1fs", model_dir, entry, time.perf_counter() - started
    )


def _embedding_module(model_dir: Path) -> tuple[Any, str, PoolingMode]:
    """The encoder with its pooling and L2 normalization, as one module."""
    import torch
    from transformers import AutoModel

    pooling = read_pooling(model_dir)
    model = AutoModel.from_pretrained(
        str(model_dir), attn_implementation="eager", dtype=torch.float32
    ).eval()

    class _Pooled(torch.nn.Module):
        def __init__(self, encoder: Any) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.encoder(
                input_ids=input_ids, attention_mask=attention_mask
            ).last_hidden_state
            if pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    return _Pooled(model), "embeddings", pooling


def _scores_module(model_dir: Path) -> tuple[Any, str, None]:
    """A sequence classifier returning its logits (activation left to the caller: raw scores
    are one of the answers)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        str(model_dir), attn_implementation="eager", dtype=torch.float32
    ).eval()

    class _Logits(torch.nn.Module):
        def __init__(self, classifier: Any) -> None:
            super().__init__()
            self.classifier = classifier

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            names = ("input_ids", "attention_mask", "token_type_ids")
            logits: torch.Tensor = self.classifier(**dict(zip(names, inputs, strict=False))).logits
            return logits

    return _Logits(model), "logits", None
