"""Penalties, min_tokens, ignore_eos and logprobs through the engine, on the tiny random models,
against references computed from the model's own forward over each whole sequence."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from tidegate.generation import Delta, GenerationResult, SamplingParams
from tidegate.generation.detok import TokenDecoder
from tidegate.generation.engine import GenerationEngine
from tidegate.generation.worker import StepWorker
from tidegate.runtimes.causal_lm import CausalLMRuntime

from .conftest import run_engine
from .helpers import random_prompts


@dataclass(frozen=True)
class WithEos:
    """A runtime whose end-of-sequence token is another one: one the model is sure to pick."""

    runtime: CausalLMRuntime
    eos_token_ids: frozenset[int]

    @property
    def model(self) -> Any:
        return self.runtime.model

    @property
    def decoder(self) -> TokenDecoder:
        return self.runtime.decoder

    @property
    def context_length(self) -> int:
        return self.runtime.context_length

    @property
    def vocab_size(self) -> int:
        return self.runtime.vocab_size

    def create_worker(self) -> StepWorker:
        return StepWorker(self.runtime.model, materialized=self.runtime.materialized_cache,
                          eos_token_ids=self.eos_token_ids)


def forward_logits(model: Any, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        logits: torch.Tensor = model(input_ids=torch.tensor([ids])).logits[0].float()
    return logits


def reference(model: Any, prompt: list[int], steps: int, *, presence: float = 0.0,
              frequency: float = 0.0, eos: int | None = None, min_tokens: int = 0
              ) -> list[int]:
    """Greedy decoding one whole forward per token, penalties and masks applied by hand."""
    out: list[int] = []
    for _ in range(steps):
        logits = forward_logits(model, prompt + out)[-1]
        counts = torch.bincount(torch.tensor(out, dtype=torch.long),
                                minlength=logits.shape[-1]).float()
        logits = logits - (presence * (counts > 0).float() + frequency * counts)
        if eos is not None and len(out) < min_tokens:
            logits[eos] = -math.inf
        out.append(int(logits.argmax()))
        if out[-1] == eos:
            break
    return out


def generate(runtime: Any, requests: list[tuple[list[int], SamplingParams]]
             ) -> list[tuple[list[Delta], GenerationResult]]:
    """Run ``requests`` concurrently, reading each as Delta objects."""
    out: list[tuple[list[Delta], GenerationResult]] = []

    async def scenario(engine: GenerationEngine) -> None:
        async def one(prompt: list[int], params: SamplingParams
                      ) -> tuple[list[Delta], GenerationResult]:
            async with engine.submit(prompt, params) as stream:
                deltas = [delta async for delta in stream.deltas()]
            assert stream.result is not None
            return deltas, stream.result

        out.extend(await asyncio.gather(*(one(p, s) for p, s in requests)))

    run_engine(runtime, scenario, max_num_seqs=4)
    return out


def prompts(runtime: CausalLMRuntime, count: int, seed: int = 7) -> list[list[int]]:
    return random_prompts(count, (5, 11, 8, 3), runtime.vocab_size,
                          avoid=set(runtime.eos_token_ids), seed=seed)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_logprobs_are_the_models_raw_log_softmax_at_the_chosen_tokens(
    name: str, request: pytest.FixtureRequest
) -> None:
    runtime: CausalLMRuntime = request.getfixturevalue(name)
    first, second, third = prompts(runtime, 3)
    greedy = SamplingParams(max_tokens=12, temperature=0, logprobs=5, ignore_eos=True)
    # Sampled and penalized: the reported logprobs are still those of the raw logits.
    sampled = SamplingParams(max_tokens=12, temperature=1.5, seed=3, logprobs=20,
                             presence_penalty=1.0, ignore_eos=True)
    plain = SamplingParams(max_tokens=12, temperature=0)
    results = generate(runtime, [(first, greedy), (second, sampled), (third, plain)])
    for prompt, (deltas, result), k in zip((first, second), results, (5, 20), strict=False):
        assert result.logprobs is not None and len(result.logprobs) == 12
        ids = list(result.token_ids)
        expected = torch.log_softmax(forward_logits(runtime.model, prompt + ids[:-1]), dim=-1)
        expected = expected[len(prompt) - 1:]
        for position, (token, got) in enumerate(zip(ids, result.logprobs, strict=True)):
            want = expected[position]
            assert abs(got.logprob - want[token].item()) < 1e-5
            assert len(got.top) == k
            top_ids = [t for t, _ in got.top]
            top_values = [v for _, v in got.top]
            assert top_values == sorted(top_values, reverse=True)
            assert top_ids == want.topk(k).indices.tolist()
            assert max(abs(a - b) for a, b in zip(top_values, want.topk(k).values.tolist(),
                                                 strict=True)) < 1e-5
        # The stream carried the same, each with the text it completed.
        assert [t for d in deltas for t in d.token_ids] == ids
        assert tuple(x for d in deltas for x in d.logprobs) == result.logprobs
        assert "".join(d.text for d in deltas) == result.text
    greedy_result = results[0][1]
    assert greedy_result.logprobs is not None
    assert all(x.top[0][0] == t for x, t in zip(greedy_result.logprobs,
                                                greedy_result.token_ids, strict=True))
    deltas, unasked = results[2]
    assert unasked.logprobs is None and all(not d.token_ids for d in deltas)


def test_penalties_apply_to_the_generated_tokens_before_greedy_choice(
    llama: CausalLMRuntime,
) -> None:
    first, second = prompts(llama, 2, seed=5)
    cases = [(first, 0.0, 1.5), (second, 2.0, 0.0), (first, -0.5, 0.75)]
    requests = [(p, SamplingParams(max_tokens=16, temperature=0, presence_penalty=pp,
                                   frequency_penalty=fp, ignore_eos=True))
                for p, pp, fp in cases]
    requests.append((first, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)))
    results = generate(llama, requests)
    for (prompt, pp, fp), (_, result) in zip(cases, results, strict=False):
        assert list(result.token_ids) == reference(llama.model, prompt, 16, presence=pp,
                                                   frequency=fp)
    # The unpenalized neighbour is untouched, and a penalty did change the greedy text.
    assert list(results[3][1].token_ids) == reference(llama.model, first, 16)
    assert results[0][1].token_ids != results[3][1].token_ids


def test_min_tokens_masks_the_end_of_sequence_then_allows_it(gpt2: CausalLMRuntime) -> None:
    prompt = prompts(gpt2, 1, seed=2)[0]
    free = reference(gpt2.model, prompt, 8)
    # "The end" is a token greedy decoding picks at step k, and not before.
    k = next(i for i in range(1, 8) if free[i] not in free[:i])
    eos = free[k]
    runtime = WithEos(gpt2, frozenset({eos}))
    (_, unmasked), (_, allowed), (_, masked), (_, ignored), (_, both) = generate(runtime, [
        (prompt, SamplingParams(max_tokens=30, temperature=0)),
        (prompt, SamplingParams(max_tokens=30, temperature=0, min_tokens=k)),
        (prompt, SamplingParams(max_tokens=30, temperature=0, min_tokens=k + 1)),
        (prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)),
        (prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                                min_tokens=k + 1)),
    ])
    # After min_tokens tokens, the end-of-sequence token may come, and ends the sequence.
    for result in (unmasked, allowed):
        assert list(result.token_ids) == free[: k + 1] and result.finish_reason == "stop"
    # One more and it is masked at step k: greedy decoding goes elsewhere.
    assert list(masked.token_ids) == reference(gpt2.model, prompt, 30, eos=eos,
                                               min_tokens=k + 1)
    assert eos not in masked.token_ids[: k + 1]
    # ignore_eos: no mask, no end; the end-of-sequence token is kept and counted.
    assert list(ignored.token_ids) == free and ignored.token_ids[k] == eos
    assert (ignored.finish_reason, ignored.completion_tokens) == ("length", 8)
    assert both.token_ids == ignored.token_ids  # ignore_eos masks nothing, min_tokens or not
