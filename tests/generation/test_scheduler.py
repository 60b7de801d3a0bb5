from __future__ import annotations

from tidegate.generation.scheduler import Admission, admit, retry_after_s


def plan(tokens: list[int], *, running: int = 0, seqs: int = 8, budget: int = 100) -> Admission:
    return admit(waiting_prompt_tokens=tokens, running=running, max_num_seqs=seqs,
                 max_prefill_tokens=budget)


def test_admits_in_order_within_free_slots() -> None:
    assert plan([10, 10, 10], running=6) == Admission(2, 20, budget_bound=False)
    assert plan([10], running=8) == Admission(0, 0, budget_bound=False)
    assert plan([]) == Admission(0, 0, budget_bound=False)


def test_token_budget_stops_admission_without_skipping() -> None:
    # The third would fit the budget but the second does not: first come, first served.
    assert plan([60, 50, 10], budget=100) == Admission(1, 60, budget_bound=True)
    assert plan([50, 50, 1], budget=100) == Admission(2, 100, budget_bound=True)


def test_a_prompt_over_the_whole_budget_goes_alone() -> None:
    assert plan([500, 1], budget=100) == Admission(1, 500, budget_bound=True)


def test_retry_after_estimates_queue_drain_time() -> None:
    assert retry_after_s(waiting=10, mean_completion_tokens=0, tokens_per_s=0) == 1
    assert retry_after_s(waiting=10, mean_completion_tokens=50, tokens_per_s=100) == 5
    assert retry_after_s(waiting=0, mean_completion_tokens=50, tokens_per_s=100) == 1
