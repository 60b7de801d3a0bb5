"""Pick each sequence's next token from its logits: greedy, or temperature + top-p sampling.

Greedy rows take the argmax, exactly as ``model.generate(do_sample=False)`` does. Sampled rows
draw from their own ``torch.Generator``, so a seeded request gets the same tokens whatever else
shares its batch. Before either, :func:`apply_penalties` and :func:`mask_tokens` adjust the
rows that ask for it; :func:`token_logprobs` reports log-probabilities of the raw logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tidegate.generation.params import SamplingParams, TokenLogprob

__all__ = [
    "apply_penalties",
    "make_generator",
    "mask_tokens",
    "next_tokens",
    "sample_row",
    "token_logprobs",
]


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed``, or from OS entropy when it is ``None``."""
    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token from a 1-D row of logits, by temperature and nucleus (top-p) sampling."""
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True, stable=True)
        # Keep a token while the mass of the tokens ranked above it is still short of top_p:
        # the most likely token is always kept.
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(before >= params.top_p, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice].item())
    return int(torch.multinomial(probs, 1, generator=generator).item())


def next_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
) -> list[int]:
    """The next token of each row of ``logits`` (shape ``[rows, vocab]``).

    Greedy rows take the argmax. Sampled rows are drawn together by inverse-CDF sampling: each
    row draws one uniform number from its own generator (so a seeded request gets the same
    tokens whatever else shares its batch), and softmax, the top-p cut and the search run once
    for all rows. One small draw per row is much cheaper than one ``multinomial`` per row.
    """
    tokens: list[int] = logits.argmax(dim=-1).tolist()
    sampled = [row for row, p in enumerate(params) if not p.greedy]
    if not sampled:
        return tokens
    temperatures = torch.tensor([params[row].temperature for row in sampled]).unsqueeze(1)
    probs = torch.softmax(logits[sampled].float() / temperatures, dim=-1)
    top_ps = [params[row].top_p for row in sampled]
    order: torch.Tensor | None = None
    if any(top_p < 1.0 for top_p in top_ps):
        probs, order = torch.sort(probs, descending=True, dim=-1, stable=True)
        before = torch.cumsum(probs, dim=-1) - probs
        # A row without nucleus sampling gets a limit no cumulative mass reaches.
        limits = torch.tensor([p if p < 1.0 else 2.0 for p in top_ps]).unsqueeze(1)
        probs = probs.masked_fill(before >= limits, 0.0)
    uniforms = torch.cat([torch.rand(1, generator=generators[row]) for row in sampled])
    cdf = torch.cumsum(probs, dim=-1)
    targets = (uniforms.unsqueeze(1) * cdf[:, -1:]).contiguous()
    picks = torch.searchsorted(cdf, targets, right=True).clamp_(max=probs.shape[-1] - 1)
    if order is not None:
        picks = order.gather(1, picks)
    for row, token in zip(sampled, picks.squeeze(1).tolist(), strict=True):
        tokens[row] = int(token)
    return tokens


def apply_penalties(
    logits: torch.Tensor, rows: Sequence[int], counts: torch.Tensor,
    params: Sequence[SamplingParams],
) -> None:
    """OpenAI's presence and frequency penalties, in place: for each of ``rows``,
    ``logits[t] -= presence_penalty * (count[t] > 0) + frequency_penalty * count[t]``, where
    ``counts`` (shape ``[len(rows), vocab]``) holds how often each token was generated so far."""
    presence = torch.tensor([p.presence_penalty for p in params],
                            dtype=logits.dtype).unsqueeze(1)
    frequency = torch.tensor([p.frequency_penalty for p in params],
                             dtype=logits.dtype).unsqueeze(1)
    index = torch.tensor(rows, dtype=torch.long)
    penalty = presence * (counts > 0).to(logits.dtype) + frequency * counts.to(logits.dtype)
    logits.index_put_((index,), logits[index] - penalty)


def mask_tokens(logits: torch.Tensor, rows: Sequence[int], tokens: Sequence[int]) -> None:
    """Make ``tokens`` impossible in ``rows``, in place (``-inf``: neither argmax nor sampling
    can pick them)."""
    logits[torch.tensor(rows, dtype=torch.long).unsqueeze(1),
           torch.tensor(tokens, dtype=torch.long).unsqueeze(0)] = float("-inf")


def token_logprobs(
    logits: torch.Tensor, rows: Sequence[int], chosen: Sequence[int], tops: Sequence[int]
) -> list[TokenLogprob]:
    """For each of ``rows``: the log-probability of its ``chosen`` token and its ``tops`` most
    likely tokens, from ``log_softmax`` of ``logits`` as the model gave them (the distribution
    OpenAI and vLLM report, whatever temperature or penalties picked the token)."""
    logprobs = torch.log_softmax(logits[list(rows)].float(), dim=-1)
    picked = logprobs.gather(1, torch.tensor(chosen, dtype=torch.long).unsqueeze(1))
    values: list[float] = picked.squeeze(1).tolist()
    most = max(tops)
    if not most:
        return [TokenLogprob(value) for value in values]
    top_values, top_ids = torch.topk(logprobs, most, dim=-1)
    ranked = zip(top_ids.tolist(), top_values.tolist(), strict=True)
    return [
        TokenLogprob(value, tuple(zip(ids[:k], lps[:k], strict=True)))
        for value, k, (ids, lps) in zip(values, tops, ranked, strict=True)
    ]
