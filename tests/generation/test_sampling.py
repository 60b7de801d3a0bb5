"""The logits arithmetic of penalties and masks, and logprobs, on small hand-made tensors."""

from __future__ import annotations

import math

import torch

from tidegate.generation import SamplingParams, TokenLogprob
from tidegate.generation.sampling import (
    apply_penalties,
    mask_tokens,
    next_tokens,
    token_logprobs,
)


def test_penalties_follow_openai_arithmetic_exactly() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0],
                           [0.5, 0.5, 0.5, 0.5],
                           [9.0, 8.0, 7.0, 6.0]])
    counts = torch.tensor([[0.0, 1.0, 3.0, 0.0],
                           [2.0, 0.0, 0.0, 1.0]])
    params = [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
              SamplingParams(presence_penalty=-1.0, frequency_penalty=2.0)]
    apply_penalties(logits, [0, 2], counts, params)
    # logits[t] -= presence * (count[t] > 0) + frequency * count[t]
    assert logits.tolist() == [
        [1.0, 2.0 - 0.5 - 0.25, 3.0 - 0.5 - 0.75, 4.0],
        [0.5, 0.5, 0.5, 0.5],  # not a penalized row
        [9.0 + 1.0 - 4.0, 8.0, 7.0, 6.0 + 1.0 - 2.0],
    ]


def test_a_penalty_changes_the_greedy_choice() -> None:
    logits = torch.tensor([[1.0, 1.2, 0.0]])
    counts = torch.tensor([[0.0, 1.0, 0.0]])
    greedy = [SamplingParams(temperature=0, presence_penalty=0.5)]
    assert next_tokens(logits, greedy, [torch.Generator()]) == [1]
    apply_penalties(logits, [0], counts, greedy)
    assert next_tokens(logits, greedy, [torch.Generator()]) == [0]


def test_masked_tokens_are_never_chosen() -> None:
    logits = torch.tensor([[5.0, 1.0, 0.0, 4.0], [5.0, 1.0, 0.0, 4.0]])
    mask_tokens(logits, [0], [0, 3])
    assert logits[0].tolist() == [-math.inf, 1.0, 0.0, -math.inf]
    assert logits[1].tolist() == [5.0, 1.0, 0.0, 4.0]
    params = [SamplingParams(temperature=1.0, seed=i) for i in range(2)]
    for seed in range(50):
        generators = [torch.Generator().manual_seed(seed) for _ in range(2)]
        assert next_tokens(logits[:1], params[:1], generators[:1])[0] in (1, 2)


def test_token_logprobs_are_log_softmax_of_the_raw_logits() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, 3.0], [0.0, 0.0, 1.0, -1.0], [1.0, 2.0, 3.0, 4.0]])
    found = token_logprobs(logits, [0, 2], [1, 3], [2, 0])
    expected = torch.log_softmax(logits, dim=-1)
    first, second = found
    assert math.isclose(first.logprob, expected[0, 1].item(), abs_tol=1e-7)
    assert [token for token, _ in first.top] == [3, 0]  # most likely first
    assert [lp for _, lp in first.top] == expected[0, [3, 0]].tolist()
    assert second == TokenLogprob(expected[2, 3].item(), ())
    # No alternatives asked for by any row: none computed.
    assert token_logprobs(logits, [1], [2], [0]) == [TokenLogprob(expected[1, 2].item())]
