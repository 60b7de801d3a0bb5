"""Decode-step time of random-weight Llama models with ``nn.Linear`` vs the converted layers.

``python -m bench.linear_layout`` (about 30 s; not part of ``make bench``). For each model size
it prefills 1 and 16 sequences through tidegate's own :class:`StepWorker`, then times greedy
decode steps, first with the model as transformers builds it, then after
:func:`tidegate.runtimes.linear_layout.convert_linears` (what the causal-LM runtime does to fp32
models at load). The README quotes these numbers.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch

from tidegate.generation import SamplingParams
from tidegate.generation.sampling import make_generator
from tidegate.generation.worker import PrefillRequest, StepPlan, StepWorker
from tidegate.runtimes.linear_layout import convert_linears

SIZES = {
    "4 layers, 256 wide": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
                           "num_attention_heads": 4, "num_key_value_heads": 2,
                           "vocab_size": 512},
    "8 layers, 1024 wide": {"hidden_size": 1024, "intermediate_size": 2816,
                            "num_hidden_layers": 8, "num_attention_heads": 16,
                            "num_key_value_heads": 4, "vocab_size": 32000},
}


def step_ms(model: torch.nn.Module, rows: int, steps: int) -> float:
    worker = StepWorker(model)
    prompt = tuple(range(5, 18))
    params = SamplingParams(max_tokens=steps + 8, temperature=0)
    worker.step(StepPlan(drop=(), prefill=tuple(
        PrefillRequest(i, prompt, params, make_generator(i)) for i in range(rows))))
    for _ in range(3):
        worker.step(StepPlan(drop=(), prefill=()))
    started = time.perf_counter()
    for _ in range(steps):
        worker.step(StepPlan(drop=(), prefill=()))
    return (time.perf_counter() - started) / steps * 1000


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.linear_layout", description=__doc__)
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps per cell")
    args = parser.parse_args(argv)
    from transformers import LlamaConfig, LlamaForCausalLM

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32")
    print("| model | rows | nn.Linear ms/step | converted ms/step |")
    print("|---|---:|---:|---:|")
    for name, shape in SIZES.items():
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=1024, **shape)).eval()
        before = {rows: step_ms(model, rows, args.steps) for rows in (1, 16)}
        convert_linears(model)
        after = {rows: step_ms(model, rows, args.steps) for rows in (1, 16)}
        for rows in (1, 16):
            print(f"| {name} | {rows} | {before[rows]:.2f} | {after[rows]:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
