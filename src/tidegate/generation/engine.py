"""The generation engine: continuous (iteration-level) batching of one causal LM.

The event loop owns every decision: admission to the bounded waiting queue, which sequences join
the batch at each step (:mod:`tidegate.generation.scheduler`), detokenization, stop strings,
finishing, cancelling, and pushing deltas into each sequence's stream. One worker thread owns
the model and its KV cache (:mod:`tidegate.generation.worker`) and runs one step at a time.

A step, as seen from the loop::

    abort sequences whose reader fell behind for longer than stream_timeout_s
    plan  = rows to drop (ended since last step) + waiting sequences to prefill (admit())
    await the worker: drop; one forward decodes the batch a token and prefills the newcomers
    apply = per new token: detokenize, match stop strings, push the delta, maybe finish

Pushing never waits, so a slow reader cannot stall the batch. A sequence that ends or is
cancelled leaves the running set at once; its row is dropped at the start of the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, Protocol

from tidegate.config import GenerationConfig
from tidegate.errors import (
    InvalidRequest,
    ModelUnavailable,
    Overloaded,
    RequestTimeout,
    RuntimeFailure,
    RuntimeLost,
    TidegateError,
)
from tidegate.generation.detok import TokenDecoder
from tidegate.generation.params import FinishReason, SamplingParams, TokenLogprob
from tidegate.generation.scheduler import admit, expected_steps, retry_after_s
from tidegate.generation.sequence import SequenceState
from tidegate.generation.stats import EngineStatistics, GenerationMetrics, HistogramSnapshot
from tidegate.generation.stream import GenerationStream
from tidegate.generation.worker import PrefillRequest, StepOutcome, StepPlan
from tidegate.throughput import DrainRate, RecentQuantile

__all__ = [
    "GenerationConfig", "GenerationEngine", "GenerationModel", "StepReport", "StepRunner",
]

log = logging.getLogger("tidegate.generation")

_EndReason = FinishReason | Literal["error"]


class StepRunner(Protocol):
    """Runs the engine's steps on one model (in the engine's single worker thread): the torch
    :class:`~tidegate.generation.worker.StepWorker`, or OpenVINO GenAI's pipeline
    (:class:`~tidegate.generation.genai_worker.GenaiWorker`)."""

    def step(self, plan: StepPlan) -> StepOutcome: ...
    def reset(self) -> None: ...


class GenerationModel(Protocol):
    """What the engine needs from a runtime (``tidegate.runtimes.causal_lm`` for torch,
    ``tidegate.runtimes.genai_lm`` for OpenVINO GenAI)."""

    def create_worker(self) -> StepRunner: ...
    @property
    def decoder(self) -> TokenDecoder: ...
    @property
    def eos_token_ids(self) -> frozenset[int]: ...
    @property
    def context_length(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...


@dataclass(frozen=True, slots=True)
class StepReport:
    """What one completed step did, for observers (tests, tracing)."""

    index: int
    decoded: tuple[str, ...]
    """Request ids of the decode batch, in row order."""
    prefilled: tuple[str, ...]
    dropped: tuple[str, ...]


class GenerationEngine:
    """Continuous batching over one causal LM; see the module docstring for the step cycle.

    ``on_step`` is called on the event loop after every completed step; it must not raise.
    ``on_lost`` is called once, with the reason, if the runtime raises
    :class:`~tidegate.errors.RuntimeLost`: every live sequence has then ended with
    :class:`ModelUnavailable`, and the engine refuses new ones until it is closed.
    """

    def __init__(
        self,
        runtime: GenerationModel,
        *,
        model: str,
        config: GenerationConfig | None = None,
        metrics: GenerationMetrics | None = None,
        executor: Executor | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_step: Callable[[StepReport], None] | None = None,
        on_lost: Callable[[str], None] | None = None,
    ) -> None:
        self.model = model
        self._runtime = runtime
        self._config = config or GenerationConfig()
        self._metrics = metrics or GenerationMetrics()
        self._owns_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"tidegate-generate-{model}"
        )
        self._clock = clock
        self._on_step = on_step
        self._on_lost = on_lost
        self._lost: str | None = None  # why the runtime can compute nothing more
        self._worker = runtime.create_worker()
        self._waiting: deque[SequenceState] = deque()
        self._running: dict[int, SequenceState] = {}
        self._live: dict[int, SequenceState] = {}
        self._batch_names: dict[int, str] = {}  # sequences in the worker's batch
        self._pending_drops: list[int] = []
        self._next_id = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._steps_started = 0
        self._steps_done = 0
        self._drain = DrainRate()
        """Generated tokens per second while busy: Retry-After."""
        self._step_s = 0.0
        """A step's time, from the previous step's end while busy (EWMA): ``max_queue_wait_ms``."""
        self._step_ended: float | None = None
        self._slow = RecentQuantile(start=1.0, low=0.5, high=3.0)
        """Actual over expected time of slow sequences (the 99th percentile of recent ones'):
        a bound meant for nearly every request must allow for the slow ones."""
        self._busy_since: float | None = None  # the first step's start after an idle wait
        self._last_decode: tuple[str, ...] = ()
        self._dropped_names: tuple[str, ...] = ()  # of the step in flight, for its report

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"generate:{self.model}")

    async def aclose(self) -> None:
        """Fail every live sequence with ModelUnavailable and stop after the current step."""
        self._closing = True
        error = ModelUnavailable(self.model, "the model is shutting down")
        for seq in list(self._live.values()):
            self._end(seq, "error", error=error)
        self._wake.set()
        if self._task is not None:
            # A loop that died was logged by _run; shut down regardless.
            with contextlib.suppress(Exception):
                await asyncio.shield(self._task)
        self._worker.reset()
        if self._owns_executor:
            self._executor.shutdown(wait=False)

    # -- the public operation ------------------------------------------------------------------

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        request_id: str | None = None,
    ) -> GenerationStream:
        """Queue one sequence and return its stream (call on the event loop thread).

        Raises :class:`InvalidRequest` for an empty prompt or one that fills the context,
        :class:`Overloaded` when ``max_waiting`` sequences already wait, and
        :class:`ModelUnavailable` before :meth:`start` or after :meth:`aclose`. Generation is
        capped by the context: a sequence that reaches it ends with ``finish_reason="length"``.
        """
        expected_s = self.check_room(params.max_tokens)
        prompt = self._checked_prompt(prompt_ids)
        seq_id = self._next_id
        self._next_id += 1
        request_id = request_id or f"gen-{seq_id}"
        room = self._runtime.context_length - len(prompt)
        stream = GenerationStream(
            request_id, prompt_tokens=len(prompt), capacity=self._config.stream_buffer,
            on_cancel=functools.partial(self._cancel, seq_id),
        )
        seq = SequenceState(
            seq_id, request_id, prompt, params=params,
            max_new=min(params.max_tokens or room, room), stream=stream,
            decoder=self._runtime.decoder, eos_token_ids=self._runtime.eos_token_ids,
            now=self._clock(),
        )
        seq.expected_s = expected_s
        self._waiting.append(seq)
        self._live[seq_id] = seq
        self._metrics.prompt_tokens += len(prompt)
        self._wake.set()
        return stream

    def check_room(self, max_tokens: int | None = None) -> float | None:
        """Raise what :meth:`submit` would if no sequence can wait now (:class:`Overloaded`,
        :class:`ModelUnavailable`), so a caller can refuse before tokenizing a prompt: under
        overload, refusing must cost less than serving. Returns the time a sequence of at most
        ``max_tokens`` submitted now is expected to take, if ``max_queue_wait_ms`` is set."""
        if self._lost is not None:
            raise ModelUnavailable(self.model, f"its runtime was lost ({self._lost}); "
                                   "it will be loaded again")
        if self._closing or self._task is None:
            state = "shutting down" if self._closing else "not started"
            raise ModelUnavailable(self.model, f"the generation engine is {state}")
        limit = self._config.max_waiting
        if len(self._waiting) >= limit:
            self._metrics.rejected += 1
            raise Overloaded(
                model=self.model, queued=len(self._waiting), limit=limit,
                retry_after_s=self._retry_after(), status=self._config.overload_status,
            )
        wait_limit_ms = self._config.max_queue_wait_ms
        if wait_limit_ms is None:
            return None
        expected_s = self._expected_s(max_tokens)
        occupied = len(self._waiting) + len(self._running)
        if expected_s is None or occupied < self._config.max_num_seqs:
            return expected_s  # a free slot takes it at once: there is no queue to bound
        wait_ms = 1000 * expected_s * self._slow.value
        if wait_ms > wait_limit_ms:
            self._metrics.rejected += 1
            raise Overloaded(
                model=self.model, queued=len(self._waiting), limit=limit,
                retry_after_s=self._retry_after(), status=self._config.overload_status,
                wait_ms=wait_ms, wait_limit_ms=wait_limit_ms,
            )
        return expected_s

    def _expected_s(self, max_tokens: int | None) -> float | None:
        """How long a sequence submitted now would take to end (:func:`expected_steps` at the
        measured step time); ``None`` before a step was timed or a sequence ended."""
        mean = self._mean_completion()
        if self._step_s <= 0 or mean <= 0:
            return None
        own = mean if max_tokens is None else min(mean, max_tokens)
        running_left = [
            max(1, min(seq.max_new, max(mean, len(seq.output_ids) + 1)) - len(seq.output_ids))
            for seq in self._running.values()
        ]
        steps = expected_steps(
            waiting=len(self._waiting), running_left=running_left,
            max_num_seqs=self._config.max_num_seqs, mean_completion_tokens=mean,
            own_tokens=own,
        )
        return steps * self._step_s

    def _checked_prompt(self, prompt_ids: Sequence[int]) -> tuple[int, ...]:
        prompt = tuple(int(token) for token in prompt_ids)
        if not prompt:
            raise InvalidRequest("The prompt is empty.", param="prompt")
        vocab = self._runtime.vocab_size
        if any(not 0 <= token < vocab for token in prompt):
            raise InvalidRequest(
                f"The prompt holds token ids outside the vocabulary of model '{self.model}' "
                f"(0..{vocab - 1}).", param="prompt",
            )
        context = self._runtime.context_length
        if len(prompt) >= context:
            raise InvalidRequest(
                f"The prompt has {len(prompt)} tokens; model '{self.model}' has a context of "
                f"{context} tokens, which leaves no room to generate. Shorten the prompt.",
                param="prompt", code="context_length_exceeded",
            )
        return prompt

    def statistics(self) -> EngineStatistics:
        m = self._metrics
        return EngineStatistics(
            running=len(self._running),
            waiting=len(self._waiting),
            steps=self._steps_done,
            steps_started=self._steps_started,
            prompt_tokens=m.prompt_tokens,
            generated_tokens=m.generated_tokens,
            tokens_per_second=self._drain.per_second,
            finished=dict(m.finished),
            rejected=m.rejected,
            aborted_slow_readers=m.aborted_slow_readers,
            time_to_first_token=HistogramSnapshot.of(m.time_to_first_token),
            inter_token_latency=HistogramSnapshot.of(m.inter_token_latency),
            step_seconds=HistogramSnapshot.of(m.step_seconds),
            batch_size=HistogramSnapshot.of(m.batch_size),
            prefill_tokens_per_step=HistogramSnapshot.of(m.prefill_tokens_per_step),
            last_decode_batch=self._last_decode,
        )

    def __repr__(self) -> str:
        return (
            f"<GenerationEngine model={self.model!r} running={len(self._running)}"
            f" waiting={len(self._waiting)} steps={self._steps_done}>"
        )

    # -- the step cycle ------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while not self._closing:
                self._expire_slow_readers(self._clock())
                plan = self._plan()
                if plan is None:
                    self._drain.idle()
                    self._step_ended = None
                    self._busy_since = None
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                self._steps_started += 1
                started = self._clock()
                try:
                    outcome = await loop.run_in_executor(self._executor, self._worker.step, plan)
                except RuntimeLost as exc:
                    self._runtime_lost(exc)
                    return
                except Exception as exc:
                    log.exception("generation step failed for model %s", self.model)
                    self._steps_done += 1
                    self._fail_batch(exc)
                    continue
                self._apply(plan, outcome, started)
        except BaseException as exc:
            # A bug here must not leave callers waiting forever on their streams.
            if not isinstance(exc, asyncio.CancelledError):
                log.exception("the generation loop of model %s stopped", self.model)
            error = ModelUnavailable(self.model, "the generation loop stopped unexpectedly")
            for seq in list(self._live.values()):
                self._end(seq, "error", error=error)
            raise

    def _plan(self) -> StepPlan | None:
        drops = tuple(self._pending_drops)
        self._pending_drops.clear()
        self._dropped_names = tuple(self._batch_names.pop(seq_id, "?") for seq_id in drops)
        admission = admit(
            waiting_prompt_tokens=(len(seq.prompt_ids) for seq in self._waiting),
            running=len(self._running),
            max_num_seqs=self._config.max_num_seqs,
            max_prefill_tokens=self._config.max_prefill_tokens,
        )
        decoding = bool(self._running)
        prefill = []
        for _ in range(admission.count):
            seq = self._waiting.popleft()
            seq.in_batch = True
            self._running[seq.id] = seq
            self._batch_names[seq.id] = seq.request_id
            prefill.append(PrefillRequest(seq.id, seq.prompt_ids, seq.params, seq.generator,
                                          max_new=seq.max_new))
        if not (drops or prefill or decoding):
            return None
        if admission.prefill_tokens:
            self._metrics.prefill_tokens_per_step.observe(admission.prefill_tokens)
        return StepPlan(drop=drops, prefill=tuple(prefill))

    def _apply(self, plan: StepPlan, outcome: StepOutcome, started: float) -> None:
        now = self._clock()
        m = self._metrics
        self._steps_done += 1
        m.step_seconds.observe(now - started)
        if outcome.decoded:
            m.batch_size.observe(len(outcome.decoded))
        # Decoding continues from the step before: only a step after an idle wait counts from
        # its own start.
        if self._busy_since is None:
            self._busy_since = started
        self._drain.observe(len(outcome.tokens), ready_at=self._busy_since, end=now)
        step_s = now - (started if self._step_ended is None else self._step_ended)
        self._step_s = step_s if self._step_s == 0 else 0.9 * self._step_s + 0.1 * step_s
        self._step_ended = now
        self._last_decode = tuple(self._batch_names.get(i, "?") for i in outcome.decoded)
        report = StepReport(
            index=self._steps_done,
            decoded=self._last_decode,
            prefilled=tuple(self._batch_names.get(p.seq_id, "?") for p in plan.prefill),
            dropped=self._dropped_names,
        )
        for seq_id, detail in outcome.failed.items():
            seq = self._running.get(seq_id)
            if seq is not None:
                self._end(seq, "error", error=RuntimeFailure(self.model, detail))
        for seq_id, token in outcome.tokens.items():
            seq = self._running.get(seq_id)
            if seq is None:  # it ended (cancelled) while the step ran
                continue
            logprob = outcome.logprobs.get(seq_id)
            if logprob is None and seq.reports_logprobs:
                self._end(seq, "error", error=RuntimeFailure(
                    self.model, "the generation worker returned a token without its logprobs"))
                continue
            self._on_token(seq, token, logprob, now)
        if self._on_step is not None:
            self._on_step(report)

    def _on_token(self, seq: SequenceState, token: int, logprob: TokenLogprob | None,
                  now: float) -> None:
        m = self._metrics
        if seq.first_token_at is None:
            seq.first_token_at = now
            m.time_to_first_token.observe(now - seq.submitted_at)
        else:
            m.inter_token_latency.observe(now - seq.last_token_at)
        seq.last_token_at = now
        m.generated_tokens += 1
        delta, finished = seq.accept(token, logprob)
        seq.stream.push(delta, now)
        if finished is not None:
            self._end(seq, finished)

    # -- ending sequences ----------------------------------------------------------------------

    def _end(
        self, seq: SequenceState, reason: _EndReason, *, error: TidegateError | None = None
    ) -> None:
        """Take ``seq`` out of the queue or the running set and close its stream."""
        if self._live.pop(seq.id, None) is None:
            return
        if self._running.pop(seq.id, None) is None:
            self._waiting.remove(seq)
        if seq.in_batch:
            self._pending_drops.append(seq.id)
        self._metrics.finished[reason] += 1
        if seq.expected_s and reason in ("stop", "length"):
            self._slow.observe((self._clock() - seq.submitted_at) / seq.expected_s)
        if error is not None:
            seq.stream.fail(error)
        else:
            assert reason != "error"
            seq.stream.finish(seq.result(reason))

    def _cancel(self, seq_id: int) -> None:
        seq = self._live.get(seq_id)
        if seq is not None:
            self._end(seq, "abort")
            self._wake.set()

    def _expire_slow_readers(self, now: float) -> None:
        timeout = self._config.stream_timeout_s
        for seq in list(self._running.values()):
            since = seq.stream.blocked_since
            if since is not None and now - since >= timeout:
                log.warning("aborting %s: its reader fell behind for %.1fs", seq.request_id,
                            now - since)
                self._metrics.aborted_slow_readers += 1
                self._end(seq, "abort", error=RequestTimeout(model=self.model, timeout_s=timeout))

    def _runtime_lost(self, exc: RuntimeLost) -> None:
        """The runtime can compute nothing more: end every live sequence with 503 and tell the
        owner (the model cache reloads the model)."""
        self._lost = str(exc)
        self._steps_done += 1
        log.error("model %s lost its runtime: %s", self.model, exc)
        error = ModelUnavailable(self.model, f"its runtime was lost ({exc}); it will be loaded "
                                 "again")
        for seq in list(self._live.values()):
            seq.in_batch = False
            self._end(seq, "error", error=error)
        if self._on_lost is not None:
            self._on_lost(self._lost)

    def _fail_batch(self, exc: Exception) -> None:
        """The worker raised: its batch is unusable. Fail everything that was in it."""
        self._worker.reset()
        self._pending_drops.clear()
        self._batch_names.clear()
        error = RuntimeFailure(self.model, f"{type(exc).__name__}: {exc}")
        for seq in list(self._running.values()):
            seq.in_batch = False
            self._end(seq, "error", error=error)

    def _mean_completion(self) -> float:
        m = self._metrics
        ended = sum(m.finished.values())
        return m.generated_tokens / ended if ended else 0.0

    def _retry_after(self) -> int:
        return retry_after_s(waiting=len(self._waiting),
                             mean_completion_tokens=self._mean_completion(),
                             tokens_per_s=self._drain.per_second)

