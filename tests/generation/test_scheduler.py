from __future__ import annotations

from tidegate.generation.scheduler import Admission, admit, expected_steps, retry_after_s


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


def test_expected_steps_on_a_free_slot_are_the_sequences_own() -> None:
    assert expected_steps(waiting=0, running_left=[5], max_num_seqs=2,
                          mean_completion_tokens=10, own_tokens=3) == 3


def test_expected_steps_wait_for_the_first_slot_to_free() -> None:
    assert expected_steps(waiting=0, running_left=[7, 2], max_num_seqs=2,
                          mean_completion_tokens=10, own_tokens=3) == 2 + 3


def test_expected_steps_count_whole_sequences_ahead() -> None:
    """Two slots freeing after 2 and 7 steps; five waiting ahead of 10 steps each take them in
    turn: the new one gets the slot of the 5th ahead's round (slot 1 after 2 rounds)."""
    assert expected_steps(waiting=5, running_left=[7, 2], max_num_seqs=2,
                          mean_completion_tokens=10, own_tokens=3) == 7 + 2 * 10 + 3
    assert expected_steps(waiting=4, running_left=[7, 2], max_num_seqs=2,
                          mean_completion_tokens=10, own_tokens=3) == 2 + 2 * 10 + 3
