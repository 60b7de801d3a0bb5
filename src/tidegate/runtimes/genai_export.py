"""Export a Hugging Face causal LM for OpenVINO GenAI, once, into a verified cache.

The export is optimum-intel's (``main_export``, task ``text-generation-with-past``, a stateful
model, weights kept in fp32 so both precisions compile from one export) plus openvino-tokenizers'
tokenizer and detokenizer, which the GenAI pipeline reads beside the model.

**Why a separate exporter directory.** optimum-intel 2.2 (the newest) imports and traces only
with transformers < 5.6, while tidegate's torch engine follows today's transformers (5.24). The
exporter therefore runs in a child process whose ``sys.path`` starts with its own small
directory (:data:`EXPORTER_REQUIREMENTS`, installed there with ``--no-deps`` by
``tidegate install-exporter``); torch, OpenVINO and everything else are shared with tidegate.
The load-time probe (``genai_lm``) then checks the exported graph against today's transformers.

Cache layout: ``<cache_dir>/genai/<fingerprint>/`` (the model directory's fingerprint, as for the
ONNX export) with ``meta.json`` recording every file's size and SHA-256: a missing, truncated or
corrupt file fails that check and the export is rebuilt. Exports are serialized across processes
with a lock file and land by renaming a finished directory.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tidegate.runtimes.onnx_export import file_lock, model_fingerprint, sha256_file

__all__ = [
    "EXPORTER_REQUIREMENTS",
    "GENAI_FORMAT",
    "ExportFailed",
    "ExporterMissing",
    "default_exporter_dir",
    "ensure_genai_export",
    "files_intact",
    "install_exporter",
    "land",
    "staging_dir",
]

log = logging.getLogger("tidegate.runtimes.export")

GENAI_FORMAT = 1
"""Bumped when the export changes; entries of another format are rebuilt."""

EXPORTER_REQUIREMENTS = (
    "optimum-intel==2.2.0",
    "optimum==2.3.0",
    "transformers==5.5.4",
    "huggingface_hub==1.33.0",
    "tokenizers==0.22.2",
)
"""What the exporter's directory holds (``pip install --no-deps --target``): optimum-intel and
the transformers it supports. Every other dependency is tidegate's own."""

_NEEDED = ("openvino_model.xml", "openvino_model.bin", "openvino_tokenizer.xml",
           "openvino_detokenizer.xml", "config.json")
_EXPORT_TIMEOUT_S = 1800.0


class ExporterMissing(RuntimeError):
    """The exporter directory is not installed."""


class ExportFailed(RuntimeError):
    """optimum-intel could not export the model (its architecture, usually); the message ends
    with the exporter's last output lines."""


def default_exporter_dir() -> Path:
    """``<environment>/tidegate-exporter``: beside the interpreter's own packages."""
    return Path(sys.prefix) / "tidegate-exporter"


def _installed_marker(exporter_dir: Path) -> Path:
    return exporter_dir / "tidegate-exporter.json"


def exporter_version(exporter_dir: Path) -> str | None:
    """The requirement set installed in ``exporter_dir``, or None when it is not installed."""
    try:
        data = json.loads(_installed_marker(exporter_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return " ".join(data["requirements"]) if isinstance(data, dict) else None


def install_exporter(exporter_dir: Path | None = None) -> Path:
    """Install :data:`EXPORTER_REQUIREMENTS` into ``exporter_dir`` with pip (``--no-deps``, so
    nothing of tidegate's own environment moves). Idempotent: a directory holding this exact
    set is left alone."""
    target = exporter_dir or default_exporter_dir()
    if exporter_version(target) == " ".join(EXPORTER_REQUIREMENTS):
        return target
    staging = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--no-deps", "--target", str(staging), *EXPORTER_REQUIREMENTS],
        check=True,
    )
    _installed_marker(staging).write_text(
        json.dumps({"requirements": list(EXPORTER_REQUIREMENTS)}), encoding="utf-8")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return target


def _is_valid(entry: Path) -> bool:
    try:
        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict) or meta.get("format") != GENAI_FORMAT:
        return False
    files = meta.get("files")
    return isinstance(files, dict) and set(_NEEDED) <= set(files) and files_intact(entry, files)


def files_intact(entry: Path, files: dict[str, dict[str, object]]) -> bool:
    """Every file ``meta.json`` recorded is there with its size and SHA-256."""
    for name, recorded in files.items():
        path = entry / name
        if not path.is_file() or path.stat().st_size != recorded.get("bytes"):
            return False
        if sha256_file(path) != recorded.get("sha256"):
            return False
    return True


def staging_dir(entry: Path) -> Path:
    """An empty directory beside ``entry`` to build it in (this process's own)."""
    staging = entry.with_name(entry.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def land(staging: Path, entry: Path, meta: dict[str, object]) -> dict[str, dict[str, object]]:
    """Record every file of ``staging`` (size, SHA-256) in its ``meta.json`` with ``meta``,
    then put it in ``entry``'s place; returns the files recorded."""
    files: dict[str, dict[str, object]] = {
        path.name: {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        for path in sorted(staging.iterdir()) if path.is_file()}
    (staging / "meta.json").write_text(json.dumps({**meta, "files": files}, indent=2),
                                       encoding="utf-8")
    shutil.rmtree(entry, ignore_errors=True)
    os.replace(staging, entry)
    return files


def ensure_genai_export(model_dir: Path, cache_dir: Path, *, exporter_dir: Path | None = None,
                        force: bool = False) -> Path:
    """Return a verified export directory for ``model_dir``, exporting it if needed.

    Raises :class:`ExporterMissing` when an export is needed and the exporter is not installed,
    :class:`ExportFailed` when optimum-intel cannot export the model.
    """
    entry = cache_dir / "genai" / model_fingerprint(model_dir)
    if not force and _is_valid(entry):
        return entry
    exporter = exporter_dir or default_exporter_dir()
    if exporter_version(exporter) is None:
        raise ExporterMissing(
            f"the OpenVINO exporter is not installed in {exporter}; run "
            "`tidegate install-exporter` (it installs optimum-intel there)")
    with file_lock(entry.with_suffix(".lock")):
        if not force and _is_valid(entry):  # another process exported while we waited
            return entry
        if entry.exists():
            log.warning("OpenVINO GenAI cache entry %s is corrupt or incomplete; rebuilding it",
                        entry)
        _export(model_dir, entry, exporter)
    return entry


def _export(model_dir: Path, entry: Path, exporter: Path) -> None:
    started = time.perf_counter()
    staging = staging_dir(entry)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(exporter), env.get("PYTHONPATH", "")) if p)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "tidegate.runtimes.genai_export_child",
               str(model_dir), str(staging)]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True,
                              timeout=_EXPORT_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise ExportFailed(f"exporting {model_dir} took over {_EXPORT_TIMEOUT_S:.0f}s") from exc
    if done.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        tail = [line for line in done.stderr.strip().splitlines() if line.strip()][-3:]
        raise ExportFailed(f"optimum-intel could not export {model_dir}: " + " | ".join(tail))
    missing = [name for name in _NEEDED if not (staging / name).is_file()]
    if missing:
        shutil.rmtree(staging, ignore_errors=True)
        raise ExportFailed(f"the export of {model_dir} lacks {', '.join(missing)}")
    land(staging, entry, {"format": GENAI_FORMAT, "exporter": exporter_version(exporter),
                          "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    log.info("exported %s for OpenVINO GenAI in %.1fs", model_dir,
             time.perf_counter() - started)
