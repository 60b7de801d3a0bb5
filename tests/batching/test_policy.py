from __future__ import annotations

import pytest

from tidegate.batching.policy import Decision, DispatchReason, batch_ends_s, decide, fill_batch

LIMITS = {"max_inflight": 2, "batch_size": 4, "max_batch_tokens": 100, "max_wait_s": 0.010}


def at(now: float, tokens: list[int], *, inflight: int, oldest: float = 0.0) -> Decision:
    return decide(now=now, oldest_enqueued_at=oldest if tokens else None, head_tokens=tokens,
                  inflight=inflight, **LIMITS)  # type: ignore[arg-type]


def test_empty_queue_waits_for_an_event() -> None:
    assert at(0.0, [], inflight=0) == Decision(None)


def test_idle_model_dispatches_a_lone_request_at_once() -> None:
    assert at(0.0, [5], inflight=0) == Decision(DispatchReason.IDLE, 1)


def test_busy_model_waits_for_more_until_max_wait() -> None:
    decision = at(0.004, [5], inflight=1)
    assert decision.reason is None
    assert abs(decision.wake_after_s - 0.006) < 1e-12  # type: ignore[operator]
    assert at(0.010, [5, 5], inflight=1) == Decision(DispatchReason.TIMEOUT, 2)


def test_full_batch_dispatches_without_waiting() -> None:
    assert at(0.0, [1] * 9, inflight=1) == Decision(DispatchReason.FULL, 4)


def test_token_budget_bounds_the_batch() -> None:
    assert at(0.0, [40, 40, 40, 1], inflight=1) == Decision(DispatchReason.TOKENS, 2)
    assert at(0.0, [60, 40], inflight=1) == Decision(DispatchReason.TOKENS, 2)


def test_a_lone_input_above_the_token_budget_still_dispatches() -> None:
    assert fill_batch([500, 1], 4, 100) == (1, True)


def test_no_dispatch_while_every_slot_computes() -> None:
    assert at(1.0, [1] * 9, inflight=2) == Decision(None)


def test_fill_batch_counts_inputs_not_requests() -> None:
    assert fill_batch([1] * 50, 64, 10_000) == (50, False)
    assert fill_batch([1] * 70, 64, 10_000) == (64, False)


def ends(batch: int, items: int, inflight: list[tuple[int, float]], slots: int = 1) -> float:
    """A batch of n inputs takes 0.1 + 0.01 n seconds; full batches hold 10 (0.2 s)."""
    return batch_ends_s(batch=batch, items=items, batch_size=10, max_inflight=slots,
                        fixed_s=0.1, item_s=0.01, inflight=inflight)


def test_batch_ends_on_an_idle_model_after_its_own_compute() -> None:
    assert ends(0, 5, []) == pytest.approx(0.15)


def test_batch_ends_after_what_the_running_batch_has_left() -> None:
    assert ends(0, 5, [(10, 0.05)]) == pytest.approx(0.15 + 0.15)
    assert ends(0, 5, [(10, 0.5)]) == pytest.approx(0.15)  # overdue: counts as ending now


def test_batch_ends_after_whole_batches_ahead() -> None:
    """Inputs ahead are counted as full batches, not as a fraction of a rate: the third batch
    waits for the running one and two full ones."""
    assert ends(2, 3, [(10, 0.0)]) == pytest.approx(0.2 + 2 * 0.2 + 0.13)


def test_batch_ends_with_slots_computing_at_once() -> None:
    # two slots, one free: batch 0 starts now, batch 1 when the running one ends
    assert ends(0, 10, [(10, 0.1)], slots=2) == pytest.approx(0.2)
    assert ends(1, 10, [(10, 0.1)], slots=2) == pytest.approx(0.1 + 0.2)
    # batch 2 runs on the free slot after batch 0's full round
    assert ends(2, 10, [(10, 0.1)], slots=2) == pytest.approx(0.2 + 0.2)
