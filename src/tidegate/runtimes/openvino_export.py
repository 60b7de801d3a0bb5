"""Convert an exported graph (embedding or scores) to OpenVINO IR, once, into a verified cache.

The ONNX graph (``onnx_export``) is the one source: OpenVINO reads it and saves its own IR
(``model.xml`` + ``model.bin``, weights kept in fp32 so every precision compiles from it) under
``<cache_dir>/openvino/<fingerprint>/``, the fingerprint being the model directory's, as for the
ONNX graph. ``meta.json`` records both files' sizes and SHA-256; a missing, truncated or corrupt
file fails that check and the IR is rebuilt. Compiled models are cached by OpenVINO itself in
``<cache_dir>/openvino/compiled/`` (``CACHE_DIR``), which makes a restart's compile a blob read.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from tidegate.runtimes.onnx_export import (
    GraphKind,
    ensure_onnx,
    file_lock,
    model_fingerprint,
    sha256_file,
)

__all__ = ["IR_FORMAT", "compiled_cache_dir", "ensure_openvino_ir"]

log = logging.getLogger("tidegate.runtimes.export")

IR_FORMAT = 1
"""Bumped when the IR conversion changes; entries of another format are rebuilt."""

_FILES = ("model.xml", "model.bin")


def compiled_cache_dir(cache_dir: Path) -> Path:
    """Where OpenVINO keeps compiled blobs (its ``CACHE_DIR``) below tidegate's cache."""
    return cache_dir / "openvino" / "compiled"


def _is_valid(entry: Path) -> bool:
    try:
        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict) or meta.get("format") != IR_FORMAT:
        return False
    for name in _FILES:
        path, recorded = entry / name, meta.get("files", {}).get(name, {})
        if not path.is_file() or path.stat().st_size != recorded.get("bytes"):
            return False
        if sha256_file(path) != recorded.get("sha256"):
            return False
    return True


def ensure_openvino_ir(
    model_dir: Path, cache_dir: Path, *, graph_kind: GraphKind = "embedding", force: bool = False
) -> Path:
    """Return the path of a verified ``model.xml`` for ``model_dir``'s ``graph_kind`` graph,
    converting it if needed."""
    entry = cache_dir / "openvino" / model_fingerprint(model_dir, graph_kind)
    if not force and _is_valid(entry):
        return entry / "model.xml"
    graph = ensure_onnx(model_dir, cache_dir, graph=graph_kind)
    with file_lock(entry.with_suffix(".lock")):
        if not force and _is_valid(entry):  # another process converted while we waited
            return entry / "model.xml"
        if any((entry / name).exists() for name in (*_FILES, "meta.json")):
            log.warning("OpenVINO cache entry %s is corrupt or incomplete; rebuilding it", entry)
        _convert(graph, entry)
    return entry / "model.xml"


def _convert(graph: Path, entry: Path) -> None:
    import openvino as ov

    started = time.perf_counter()
    entry.mkdir(parents=True, exist_ok=True)
    (entry / "meta.json").unlink(missing_ok=True)
    tmp_xml = entry / f"model.tmp{os.getpid()}.xml"
    # fp32 weights on disk: bf16 is a compile-time choice, and fp32 must stay exact.
    ov.save_model(ov.convert_model(str(graph)), str(tmp_xml), compress_to_fp16=False)
    files = {}
    for name, tmp in zip(_FILES, (tmp_xml, tmp_xml.with_suffix(".bin")), strict=True):
        files[name] = {"bytes": tmp.stat().st_size, "sha256": sha256_file(tmp)}
    # OpenVINO reads the weights beside the .xml by its stem; the .bin goes first, so a
    # model.xml never stands beside an old model.bin (and meta.json comes last of all).
    os.replace(tmp_xml.with_suffix(".bin"), entry / "model.bin")
    os.replace(tmp_xml, entry / "model.xml")
    meta = {
        "format": IR_FORMAT,
        "onnx_sha256": sha256_file(graph),
        "openvino": ov.get_version(),
        "files": files,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    tmp_meta = entry / f"meta.json.tmp{os.getpid()}"
    tmp_meta.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    os.replace(tmp_meta, entry / "meta.json")
    log.info("converted %s to OpenVINO IR in %.1fs", graph, time.perf_counter() - started)
