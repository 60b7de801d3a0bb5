"""Pick each sequence's next token from its logits: greedy, or temperature + top-p sampling.

Greedy rows take the argmax, exactly as ``model.generate(do_sample=False)`` does. Sampled rows
draw from their own ``torch.Generator``, so a seeded request gets the same tokens whatever else
shares its batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tidegate.generation.params import SamplingParams

__all__ = ["make_generator", "next_tokens", "sample_row"]


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
