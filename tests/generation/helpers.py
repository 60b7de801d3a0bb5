"""Helpers shared by the generation tests: a step log to wait on, and reference generation."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import torch

from tidegate.generation.engine import StepReport
from tidegate.runtimes.causal_lm import CausalLMRuntime


class StepLog:
    """The engine's ``on_step`` hook: records every report and wakes waiters."""

    def __init__(self) -> None:
        self.reports: list[StepReport] = []
        self._changed = asyncio.Event()

    def __call__(self, report: StepReport) -> None:
        self.reports.append(report)
        self._changed.set()

    async def until(self, predicate: Callable[[], bool], timeout_s: float = 30.0) -> None:
        """Wait, step by step, until ``predicate`` holds; fail after ``timeout_s``."""
        try:
            async with asyncio.timeout(timeout_s):
                while not predicate():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            last = self.reports[-1] if self.reports else None
            raise AssertionError(
                f"condition not met after {timeout_s}s ({len(self.reports)} steps; last: {last})"
            ) from None

    async def steps(self, count: int) -> None:
        await self.until(lambda: len(self.reports) >= count)


def reference_greedy(runtime: CausalLMRuntime, prompt: Sequence[int], max_new: int) -> list[int]:
    """The request alone through ``model.generate``: what the engine must reproduce."""
    ids = torch.tensor([list(prompt)], dtype=torch.long)
    eos = min(runtime.eos_token_ids)
    with torch.inference_mode():
        out = runtime.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
            pad_token_id=eos,
        )
    tokens: list[int] = out[0, len(prompt):].tolist()
    return tokens


def random_prompts(count: int, lengths: Sequence[int], vocab: int, *, avoid: set[int],
                   seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    prompts = []
    for i in range(count):
        length = lengths[i % len(lengths)]
        ids = torch.randint(0, vocab, (length,), generator=generator).tolist()
        prompts.append([t if t not in avoid else t + 1 for t in ids])
    return prompts
