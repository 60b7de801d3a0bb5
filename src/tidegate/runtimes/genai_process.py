"""OpenVINO GenAI's pipeline in a child process of its own, stepped through a pipe.

``ContinuousBatchingPipeline.step()`` keeps the GIL for its whole computation (its Python
binding does not release it), so a pipeline stepped in one of the server's threads stops the
event loop, and with it every other request the server holds, for as long as each step
computes: a 0.5 ms sleep on the main thread woke 6.4 ms late at p50 (13.8 ms at p99) while a
thread stepped 16 sequences, against 0.09 ms beside OpenVINO's ``InferRequest.infer``, which
releases it. In a child process the pipeline has an interpreter and a GIL to itself; the
parent's worker thread waits on the pipe, which releases the GIL. Which models run here is
:func:`tidegate.runtimes.pipeline_in_child`'s choice (``[models.generation] pipeline_process``):
with every core computing, the GIL held during steps measured cheaper than the extra process.

:class:`PipelineProcess` starts the child (``spawn``), which builds the pipeline and answers one
call at a time: a step of :class:`~tidegate.generation.genai_worker.GenaiWorker`, a reset, the
load-time probe. A call's exception comes back as :class:`PipelineCallFailed` naming the
original; a child that exits (killed, out of memory) fails every call after with
:class:`PipelineProcessDied`. The child ignores SIGINT and SIGTERM, which a terminal or a
service manager may send the whole process group: the parent drains first, then closes the
child (:meth:`PipelineProcess.close`, or when the parent exits, since the pipe then ends).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import signal
import threading
import weakref
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from tidegate.engines import Precision
from tidegate.errors import RuntimeLost
from tidegate.generation.genai_worker import GenaiWorker, generation_config
from tidegate.generation.params import SamplingParams
from tidegate.generation.steps import StepOutcome, StepPlan

__all__ = ["PipelineCallFailed", "PipelineProcess", "PipelineProcessDied", "PipelineSpec",
           "ProcessWorker", "greedy_with_logprobs", "open_pipeline"]

log = logging.getLogger("tidegate.runtimes.genai")

_CLOSE_WAIT_S = 10.0
"""How long :meth:`PipelineProcess.close` waits for the child to exit before killing it."""
_PROBE_REQUEST_BASE = 1 << 40  # request ids the engine never uses


@dataclass(frozen=True, slots=True)
class PipelineSpec:
    """Everything the child needs to build the pipeline (picklable)."""

    export_dir: Path
    precision: Precision
    max_num_seqs: int
    max_batched_tokens: int
    blocks: int
    threads: int | None
    eos_token_ids: tuple[int, ...]
    vocab_size: int


class PipelineCallFailed(RuntimeError):
    """A call raised in the pipeline's process; the message names the original exception."""


class PipelineProcessDied(RuntimeLost):
    """The pipeline's process is gone: nothing more can run on this model."""


def open_pipeline(spec: PipelineSpec) -> Any:
    """The ``ContinuousBatchingPipeline`` of ``spec``, in this process."""
    import openvino_genai

    scheduler = openvino_genai.SchedulerConfig()
    scheduler.max_num_seqs = spec.max_num_seqs
    scheduler.max_num_batched_tokens = spec.max_batched_tokens
    scheduler.dynamic_split_fuse = True
    scheduler.enable_prefix_caching = False
    scheduler.cache_size = 0
    scheduler.num_kv_blocks = spec.blocks
    properties: dict[str, object] = {}
    if spec.precision is Precision.FP32:
        properties.update(INFERENCE_PRECISION_HINT="f32", KV_CACHE_PRECISION="f32",
                          DYNAMIC_QUANTIZATION_GROUP_SIZE="0")
    else:
        properties.update(INFERENCE_PRECISION_HINT="bf16", KV_CACHE_PRECISION="bf16")
    if spec.threads:
        properties["INFERENCE_NUM_THREADS"] = spec.threads
    return openvino_genai.ContinuousBatchingPipeline(str(spec.export_dir), scheduler, "CPU",
                                                     properties)


def greedy_with_logprobs(pipeline: Any, prompts: Sequence[Sequence[int]], *, tokens: int,
                         eos_token_ids: Collection[int], vocab_size: int
                         ) -> list[tuple[list[int], list[float]]]:
    """``tokens`` greedy tokens for each prompt, with their log-probabilities (the probe's)."""
    import numpy as np
    import openvino as ov

    config = generation_config(SamplingParams(temperature=0.0), max_new=tokens,
                               eos_token_ids=frozenset(eos_token_ids), vocab_size=vocab_size)
    config.logprobs = 1
    handles = [pipeline.add_request(_PROBE_REQUEST_BASE + i,
                                    ov.Tensor(np.array([list(prompt)], dtype=np.int64)), config)
               for i, prompt in enumerate(prompts)]
    results: list[tuple[list[int], list[float]]] = [([], []) for _ in handles]
    while pipeline.has_non_finished_requests():
        pipeline.step()
        for handle, (ids, logprobs) in zip(handles, results, strict=True):
            while handle.can_read():
                for output in handle.read().values():
                    ids.extend(int(t) for t in output.generated_ids)
                    logprobs.extend(float(v) for v in output.generated_log_probs)
    return results


def _child(conn: Connection, spec: PipelineSpec) -> None:
    """The child's whole life: build the pipeline, then answer calls until told to close or
    the parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        pipeline = open_pipeline(spec)
        worker = GenaiWorker(pipeline, eos_token_ids=spec.eos_token_ids,
                             vocab_size=spec.vocab_size)
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ok", None))
    while True:
        try:
            op, arg = conn.recv()
        except (EOFError, OSError):
            return  # the parent closed its end, or exited
        if op == "close":
            worker.reset()
            conn.send(("ok", None))
            return
        try:
            value: Any
            if op == "step":
                value = worker.step(arg)
            elif op == "reset":
                worker.reset()
                value = None
            elif op == "busy":
                value = bool(pipeline.has_non_finished_requests())
            elif op == "probe":
                prompts, tokens = arg
                value = greedy_with_logprobs(pipeline, prompts, tokens=tokens,
                                             eos_token_ids=spec.eos_token_ids,
                                             vocab_size=spec.vocab_size)
            else:
                raise ValueError(f"unknown call {op!r}")
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        else:
            conn.send(("ok", value))


class PipelineProcess:
    """The child process that owns one model's pipeline. Blocking: construct, call and close
    it off the event loop. One call at a time (calls from several threads wait their turn)."""

    def __init__(self, spec: PipelineSpec, *, name: str = "tidegate-genai") -> None:
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        self._process = context.Process(target=_child, args=(child, spec), name=name,
                                        daemon=True)
        self._process.start()
        child.close()
        self._conn = parent
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _stop, parent, self._process)
        try:
            self._reply()  # the pipeline is built, or why not
        except Exception:
            self.close()
            raise

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def call(self, op: str, arg: object = None) -> Any:
        with self._lock:
            if not self._finalizer.alive:
                raise PipelineProcessDied("the OpenVINO GenAI process was closed")
            try:
                self._conn.send((op, arg))
            except (BrokenPipeError, OSError) as exc:
                raise self._died() from exc
            return self._reply()

    def close(self) -> None:
        """Cancel what runs, stop the child (killed after a wait), free its pipe. Idempotent."""
        self._finalizer()

    def _reply(self) -> Any:
        try:
            status, value = self._conn.recv()
        except (EOFError, OSError) as exc:
            raise self._died() from exc
        if status == "error":
            raise PipelineCallFailed(value)
        return value

    def _died(self) -> PipelineProcessDied:
        self._process.join(timeout=1.0)
        return PipelineProcessDied(
            f"the OpenVINO GenAI process exited (exit code {self._process.exitcode})")


def _stop(conn: Connection, process: Any) -> None:
    try:
        conn.send(("close", None))
        if conn.poll(_CLOSE_WAIT_S):
            conn.recv()
    except (EOFError, OSError):
        pass
    finally:
        conn.close()
    process.join(timeout=_CLOSE_WAIT_S)
    if process.is_alive():
        log.warning("the OpenVINO GenAI process %s did not exit; killing it", process.pid)
        process.kill()
        process.join()
    process.close()


class ProcessWorker:
    """The engine's step worker for a pipeline in a :class:`PipelineProcess`: the same calls as
    :class:`~tidegate.generation.genai_worker.GenaiWorker`, each one round trip on the pipe."""

    def __init__(self, process: PipelineProcess) -> None:
        self._process = process

    def step(self, plan: StepPlan) -> StepOutcome:
        if plan.prefill:  # the pipeline seeds from the parameters; the torch RNG stays here
            plan = replace(plan, prefill=tuple(replace(p, generator=None)  # type: ignore[arg-type]
                                               for p in plan.prefill))
        outcome: StepOutcome = self._process.call("step", plan)
        return outcome

    def reset(self) -> None:
        with contextlib.suppress(PipelineProcessDied):  # nothing is left to cancel
            self._process.call("reset")
