"""Cancellation, slow readers, admission limits and shutdown: the engine's invariants, read from
its step reports and statistics (never from wall-clock time)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest

from tidegate.errors import (
    InvalidRequest,
    ModelUnavailable,
    Overloaded,
    RequestTimeout,
    RuntimeFailure,
)
from tidegate.generation import SamplingParams
from tidegate.generation.engine import GenerationEngine, StepReport
from tidegate.generation.worker import StepWorker
from tidegate.runtimes.causal_lm import CausalLMRuntime

from .conftest import run_engine
from .helpers import StepLog, reference_greedy

LONG = SamplingParams(max_tokens=200, temperature=0)
PROMPT = [5, 17, 42, 9]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_cancel_frees_the_slot_within_one_step(llama: CausalLMRuntime) -> None:
    log = StepLog()

    async def scenario(engine: GenerationEngine) -> None:
        a = engine.submit(PROMPT, LONG, request_id="a")
        b = engine.submit(PROMPT[:2], LONG, request_id="b")
        c = engine.submit(PROMPT[:3], LONG, request_id="c")  # waits: two slots
        await log.until(lambda: any("a" in r.decoded for r in log.reports))
        assert engine.statistics().waiting == 1
        in_flight = engine.statistics().steps_started
        a.cancel()
        assert engine.statistics().running == 1  # the slot is free for the next plan
        await log.steps(in_flight + 2)
        after = [r for r in log.reports if r.index > in_flight]
        assert all("a" not in r.decoded for r in after)
        assert after[0].prefilled == ("c",)  # the freed slot went to the waiting sequence
        assert (await a.collect()).finish_reason == "abort"
        b.cancel()
        c.cancel()

    run_engine(llama, scenario, max_num_seqs=2, on_step=log)


def test_cancel_while_waiting_or_by_leaving_the_block(llama: CausalLMRuntime) -> None:
    async def scenario(engine: GenerationEngine) -> None:
        first = engine.submit(PROMPT, LONG)
        queued = engine.submit(PROMPT, LONG)
        queued.cancel()
        assert engine.statistics().waiting == 1  # nothing was admitted yet: only `first` left
        assert (await queued.collect()).finish_reason == "abort"
        async with first:
            async for _ in first:
                break  # the client went away after one delta
        result = first.result
        assert result is not None and result.finish_reason == "abort"
        stats = engine.statistics()
        assert (stats.running, stats.waiting, stats.finished["abort"]) == (0, 0, 2)

    run_engine(llama, scenario, max_num_seqs=1)


def test_slow_reader_is_aborted_without_stalling_the_others(llama: CausalLMRuntime) -> None:
    clock = FakeClock()
    log = StepLog()

    def tick(report: object) -> None:
        clock.now += 1.0  # each step "takes" one second
        log(report)  # type: ignore[arg-type]

    async def scenario(engine: GenerationEngine) -> None:
        slow = engine.submit(PROMPT, LONG, request_id="slow")
        fast = engine.submit(PROMPT[:2], SamplingParams(max_tokens=40, temperature=0),
                             request_id="fast")
        fast_result = await fast.collect()  # the slow stream is never read meanwhile
        assert (fast_result.finish_reason, fast_result.completion_tokens) == ("length", 40)
        stats = engine.statistics()
        assert stats.aborted_slow_readers == 1
        assert stats.finished["abort"] == 1
        decoded_slow = [r.index for r in log.reports if "slow" in r.decoded]
        # Decoded every step from the second on, until aborted; then never again.
        assert decoded_slow == list(range(2, decoded_slow[-1] + 1))
        assert decoded_slow[-1] >= 2 + 5  # it got its 5 (fake) seconds of grace
        assert decoded_slow[-1] < 40  # and was aborted long before `fast` ended
        buffered = []
        with pytest.raises(RequestTimeout):
            async for delta in slow:
                buffered.append(delta)
        assert 1 <= len(buffered) <= 2  # the buffer's capacity; the rest was dropped
        assert slow.result is None

    run_engine(llama, scenario, clock=clock, on_step=tick, stream_buffer=2,
               stream_timeout_s=5.0)


def test_admission_beyond_the_queue_bound_is_overloaded(llama: CausalLMRuntime) -> None:
    async def scenario(engine: GenerationEngine) -> None:
        # submit() is synchronous: nothing is admitted until the loop gets control back.
        streams = [engine.submit(PROMPT, LONG) for _ in range(2)]
        with pytest.raises(Overloaded) as refused:
            engine.submit(PROMPT, LONG)
        assert (refused.value.queued, refused.value.limit, refused.value.status) == (2, 2, 503)
        assert refused.value.retry_after_s >= 1
        assert engine.statistics().rejected == 1
        with pytest.raises(Overloaded):  # what the API asks before tokenizing a prompt
            engine.check_room()
        assert engine.statistics().rejected == 2
        streams.pop().cancel()
        engine.check_room()  # a place is free again
        for stream in streams:
            stream.cancel()

    run_engine(llama, scenario, max_num_seqs=1, max_waiting=2, overload_status=503)


def test_max_queue_wait_refuses_what_would_end_too_late(llama: CausalLMRuntime) -> None:
    """A bound on a new sequence's time to its end: the sequences ahead hold the slots for
    the mean completion each (4 tokens here), then its own tokens (fewer if its
    ``max_tokens`` is lower), at the measured step time (10 ms: the clock moves only between
    steps)."""
    clock = FakeClock()

    def between_steps(_: StepReport) -> None:
        clock.now += 0.01

    async def scenario(engine: GenerationEngine) -> None:
        first = await engine.submit(PROMPT, SamplingParams(max_tokens=4, temperature=0)).collect()
        assert first.completion_tokens == 4
        admitted = [engine.submit(PROMPT, LONG)]  # a free slot takes it, whatever it costs
        # with k waiting ahead (the one slot busy): 4 k + 4 steps; 500 ms admits k <= 11
        for _ in range(11):
            admitted.append(engine.submit(PROMPT, LONG))
        with pytest.raises(Overloaded,
                           match=r"12 queued ahead, .* result in about 520 ms, limit 500 ms"):
            engine.submit(PROMPT, LONG)
        # a request for one token ends 3 steps sooner: 490 ms
        short = SamplingParams(max_tokens=1, temperature=0)
        assert engine.check_room(short.max_tokens) == pytest.approx(0.49)
        admitted.append(engine.submit(PROMPT, short))
        with pytest.raises(Overloaded):
            engine.check_room(1)
        assert engine.statistics().rejected == 2
        for stream in admitted:
            stream.cancel()

    run_engine(llama, scenario, clock=clock, on_step=between_steps, max_num_seqs=1,
               max_waiting=1000, max_queue_wait_ms=500)


def test_the_rate_counts_the_time_between_steps(llama: CausalLMRuntime) -> None:
    """Steps take no time on this clock, but 1 s passes between them (the event loop busy with
    other requests): the engine generates 1 token/s, which is what its queue drains at."""
    clock = FakeClock()

    def between_steps(_: StepReport) -> None:
        clock.now += 1.0

    async def scenario(engine: GenerationEngine) -> None:
        result = await engine.submit(PROMPT, SamplingParams(max_tokens=6, temperature=0)
                                     ).collect()
        assert result.completion_tokens == 6
        assert engine.statistics().tokens_per_second == pytest.approx(1.0)

    run_engine(llama, scenario, clock=clock, on_step=between_steps, max_num_seqs=1)


def test_prefill_budget_spreads_admission_over_steps(llama: CausalLMRuntime) -> None:
    log = StepLog()

    async def scenario(engine: GenerationEngine) -> None:
        streams = [engine.submit(list(range(1, 11)), SamplingParams(max_tokens=3,
                                                                   temperature=0))
                   for _ in range(4)]
        await asyncio.gather(*(s.collect() for s in streams))

    run_engine(llama, scenario, max_prefill_tokens=20, on_step=log)
    assert [len(r.prefilled) for r in log.reports[:2]] == [2, 2]


def test_bad_prompts_are_refused(llama: CausalLMRuntime) -> None:
    async def scenario(engine: GenerationEngine) -> None:
        with pytest.raises(InvalidRequest) as empty:
            engine.submit([], LONG)
        assert empty.value.param == "prompt"
        with pytest.raises(InvalidRequest) as too_long:
            engine.submit([1] * llama.context_length, LONG)
        assert too_long.value.code == "context_length_exceeded"

    run_engine(llama, scenario)


def test_aclose_fails_live_streams_and_refuses_new_ones(llama: CausalLMRuntime) -> None:
    async def main() -> None:
        engine = GenerationEngine(llama, model="tiny")
        with pytest.raises(ModelUnavailable):
            engine.submit(PROMPT, LONG)  # not started
        await engine.start()
        running = engine.submit(PROMPT, LONG)
        await anext(running)
        waiting_error = asyncio.ensure_future(running.collect())
        await engine.aclose()
        with pytest.raises(ModelUnavailable):
            await waiting_error
        with pytest.raises(ModelUnavailable):
            engine.submit(PROMPT, LONG)
        assert engine.statistics().finished["error"] == 1

    asyncio.run(main())


def test_statistics_count_tokens_and_latencies(gpt2: CausalLMRuntime) -> None:
    stats_seen = []

    async def scenario(engine: GenerationEngine) -> None:
        streams = [engine.submit(PROMPT[: i + 1], SamplingParams(max_tokens=4, temperature=0))
                   for i in range(3)]
        results = await asyncio.gather(*(s.collect() for s in streams))
        stats_seen.append((engine.statistics(), results))

    run_engine(gpt2, scenario)
    [(stats, results)] = stats_seen
    generated = sum(r.completion_tokens for r in results)
    assert stats.generated_tokens == generated
    assert stats.prompt_tokens == 1 + 2 + 3
    assert stats.time_to_first_token.count == 3
    assert stats.inter_token_latency.count == generated - 3
    assert (stats.running, stats.waiting) == (0, 0)
    assert stats.tokens_per_second > 0
    assert sum(stats.finished.values()) == 3


class FlakyModel:
    """The real model, raising on chosen forward calls: the engine's boundary with the model."""

    def __init__(self, model: Any, fail_on: set[int], poison: int | None = None) -> None:
        self._model = model
        self.forward = model.forward
        self.config = model.config
        self._fail_on = fail_on
        self._poison = poison
        self.calls = 0

    def __call__(self, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls in self._fail_on:
            raise RuntimeError(f"forward call {self.calls} failed")
        # Packed steps: a prompt's first token is the one at position 0.
        starts = kwargs["input_ids"][kwargs["position_ids"] == 0]
        if self._poison is not None and bool((starts == self._poison).any()):
            raise RuntimeError(f"a prompt starts with poison token {self._poison}")
        return self._model(**kwargs)


@dataclass
class FlakyRuntime:
    model: FlakyModel
    decoder: Any
    eos_token_ids: frozenset[int]
    context_length: int
    vocab_size: int

    def create_worker(self) -> StepWorker:
        return StepWorker(self.model, eos_token_ids=self.eos_token_ids)


def flaky(runtime: CausalLMRuntime, fail_on: set[int], poison: int | None = None) -> FlakyRuntime:
    return FlakyRuntime(FlakyModel(runtime.model, fail_on, poison), runtime.decoder,
                        runtime.eos_token_ids, runtime.context_length, runtime.vocab_size)


def test_failed_prefill_fails_only_its_sequence(llama: CausalLMRuntime) -> None:
    poison = 7
    async def main() -> None:
        model = flaky(llama, set(), poison=poison)
        engine = GenerationEngine(model, model="tiny")
        await engine.start()
        try:
            # Both arrive before the first step: prefilled together, which fails; then each
            # alone, which fails only the poisoned prompt.
            bad = engine.submit([poison, *PROMPT], SamplingParams(max_tokens=3, temperature=0))
            good = engine.submit(PROMPT, SamplingParams(max_tokens=3, temperature=0))
            with pytest.raises(RuntimeFailure, match="poison token 7"):
                await bad.collect()
            assert (await good.collect()).completion_tokens == 3
            assert model.model.calls == 1 + 2 + 2  # together, each alone, two decode steps
        finally:
            await engine.aclose()

    asyncio.run(main())


def test_a_failed_joint_prefill_is_retried_prompt_by_prompt(llama: CausalLMRuntime) -> None:
    async def main() -> None:
        engine = GenerationEngine(flaky(llama, {1}), model="tiny")
        await engine.start()
        try:
            streams = [engine.submit(PROMPT, SamplingParams(max_tokens=3, temperature=0))
                       for _ in range(2)]
            for stream in streams:
                assert (await stream.collect()).completion_tokens == 3
        finally:
            await engine.aclose()

    asyncio.run(main())


def test_a_newcomer_joins_the_running_batch_without_a_forward_of_its_own(
    llama: CausalLMRuntime,
) -> None:
    log = StepLog()

    async def main() -> None:
        model = flaky(llama, set())
        engine = GenerationEngine(model, model="tiny", on_step=log)
        await engine.start()
        try:
            first = engine.submit(PROMPT, SamplingParams(max_tokens=8, temperature=0))
            await log.steps(3)
            later = engine.submit([3, *PROMPT], SamplingParams(max_tokens=4, temperature=0))
            results = [await first.collect(), await later.collect()]
            joined = [r for r in log.reports if r.prefilled == (later.request_id,)]
            assert joined and joined[0].decoded == (first.request_id,)  # in one step
            assert model.model.calls == engine.statistics().steps  # one forward per step
            assert list(results[0].token_ids) == reference_greedy(llama, PROMPT, 8)
            assert list(results[1].token_ids) == reference_greedy(llama, [3, *PROMPT], 4)
        finally:
            await engine.aclose()

    asyncio.run(main())


def test_a_bad_newcomer_does_not_disturb_the_running_batch(llama: CausalLMRuntime) -> None:
    poison = 7
    log = StepLog()
    # References first: during a step the engine's model is its worker's alone.
    expected_good = reference_greedy(llama, [3, *PROMPT], 3)
    expected_running = reference_greedy(llama, PROMPT, 8)

    async def main() -> None:
        model = flaky(llama, set(), poison=poison)
        engine = GenerationEngine(model, model="tiny", on_step=log)
        await engine.start()
        try:
            running = engine.submit(PROMPT, SamplingParams(max_tokens=8, temperature=0))
            await log.steps(2)
            # Both join the running sequence's step, which fails; the step is redone without
            # them and each is then prefilled alone.
            bad = engine.submit([poison, *PROMPT], SamplingParams(max_tokens=3, temperature=0))
            good = engine.submit([3, *PROMPT], SamplingParams(max_tokens=3, temperature=0))
            with pytest.raises(RuntimeFailure, match="poison token 7"):
                await bad.collect()
            assert list((await good.collect()).token_ids) == expected_good
            assert list((await running.collect()).token_ids) == expected_running
        finally:
            await engine.aclose()

    asyncio.run(main())


def test_failed_decode_fails_the_batch_and_the_engine_goes_on(llama: CausalLMRuntime) -> None:
    async def main() -> None:
        engine = GenerationEngine(flaky(llama, {3}), model="tiny")  # 2 prefills, then decode
        await engine.start()
        try:
            first = [engine.submit(PROMPT, LONG) for _ in range(2)]
            for stream in first:
                with pytest.raises(RuntimeFailure):
                    await stream.collect()
            later = engine.submit(PROMPT, SamplingParams(max_tokens=4, temperature=0))
            assert (await later.collect()).completion_tokens == 4
            assert engine.statistics().finished["error"] == 2
        finally:
            await engine.aclose()

    asyncio.run(main())


def test_token_ids_outside_the_vocabulary_are_refused(llama: CausalLMRuntime) -> None:
    async def scenario(engine: GenerationEngine) -> None:
        with pytest.raises(InvalidRequest, match="vocabulary"):
            engine.submit([1, llama.vocab_size], LONG)

    run_engine(llama, scenario)
