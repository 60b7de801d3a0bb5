"""int8 weights for an exported causal LM: ``weights = "int8"``.

Every linear layer's weight (a ``MatMul`` whose second input is a 2-D constant) is stored as
int8 with one fp32 scale per output channel (symmetric, ``max |w| / 127``) and decompressed in
the graph (``Convert`` then ``Multiply``), the pattern OpenVINO's CPU plugin fuses into its
compressed-weight kernels. Embedding lookups keep their fp32 table. The result goes to a sibling
of the export, ``<export>-int8/``, with the tokenizer files copied beside it and a ``meta.json``
verified like the export's (a rebuild when anything is missing or corrupt).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from tidegate.runtimes.genai_export import files_intact, land, staging_dir
from tidegate.runtimes.onnx_export import file_lock

__all__ = ["INT8_FORMAT", "compress_linear_weights", "ensure_int8_weights"]

log = logging.getLogger("tidegate.runtimes.export")

INT8_FORMAT = 1
"""Bumped when the compression changes; entries of another format are rebuilt."""

_MIN_ELEMENTS = 4096
"""Smaller weights are left in fp32: nothing to gain."""
_MODEL_FILES = ("openvino_model.xml", "openvino_model.bin")


def compress_linear_weights(model: Any) -> int:
    """Rewrite ``model`` (an ``openvino.Model``) in place; returns how many weights became int8."""
    import openvino as ov
    import openvino.opset13 as ops

    count = 0
    for node in model.get_ordered_ops():
        if node.get_type_name() != "MatMul":
            continue
        source = node.input_value(1).get_node()
        if source.get_type_name() != "Constant":
            continue
        weight = source.get_data()
        if weight.ndim != 2 or weight.size < _MIN_ELEMENTS or weight.dtype != np.float32:
            continue
        # transpose_b: the weight is [out, in] and each output channel is a row.
        axis = 1 if node.get_attributes().get("transpose_b") else 0
        scale = np.abs(weight).max(axis=axis, keepdims=True) / 127.0
        scale[scale == 0] = 1.0
        quantized = np.clip(np.rint(weight / scale), -127, 127).astype(np.int8)
        decompressed = ops.multiply(ops.convert(ops.constant(quantized), ov.Type.f32),
                                    ops.constant(scale.astype(np.float32)))
        node.input(1).replace_source_output(decompressed.output(0))
        count += 1
    return count


def _is_valid(entry: Path, source_sha: str) -> bool:
    try:
        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict) or meta.get("format") != INT8_FORMAT \
            or meta.get("source_sha256") != source_sha:
        return False
    files = meta.get("files")
    return isinstance(files, dict) and all(name in files for name in _MODEL_FILES) \
        and files_intact(entry, files)


def ensure_int8_weights(export_dir: Path) -> Path:
    """Return a verified int8-weight copy of the export in ``export_dir``, building it if
    needed."""
    entry = export_dir.with_name(export_dir.name + "-int8")
    meta = json.loads((export_dir / "meta.json").read_text(encoding="utf-8"))
    source_sha = str(meta["files"]["openvino_model.bin"]["sha256"])
    if _is_valid(entry, source_sha):
        return entry
    with file_lock(entry.with_suffix(".lock")):
        if _is_valid(entry, source_sha):
            return entry
        _build(export_dir, entry, source_sha)
    return entry


def _build(export_dir: Path, entry: Path, source_sha: str) -> None:
    import openvino as ov

    started = time.perf_counter()
    staging = staging_dir(entry)
    for path in export_dir.iterdir():
        if path.is_file() and path.name not in (*_MODEL_FILES, "meta.json"):
            shutil.copy2(path, staging / path.name)
    model = ov.Core().read_model(str(export_dir / "openvino_model.xml"))
    count = compress_linear_weights(model)
    ov.save_model(model, str(staging / "openvino_model.xml"), compress_to_fp16=False)
    land(staging, entry, {"format": INT8_FORMAT, "source_sha256": source_sha,
                          "int8_weights": count})
    log.info("compressed %d weights of %s to int8 in %.1fs", count, export_dir,
             time.perf_counter() - started)
