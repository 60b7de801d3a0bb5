"""int8 weights vs the exported fp32 weights on OpenVINO GenAI, in process, A/B alternated.

The benchmark Llama (``bench.bench_llama``, SmolLM2-135M's shape) is served by the same pipeline
tidegate uses (``bench.genai_ceiling``'s closed loop: N requests in flight, 64 new tokens,
temperature 1.0), in the default precision, with ``weights = "original"`` and ``"int8"``
alternated ``--rounds`` times so that drift on a shared machine hits both alike. Prints tokens/s
per round, the median ratio, each pipeline's weight file size and its load-time probe error.

    python -m bench.genai_weights [--rounds 3] [--duration 8]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.bench_llama import build_bench_llama
from bench.genai_ceiling import measure_pipeline
from tidegate.config import GenerationConfig, default_cache_dir
from tidegate.engines import Precision, Weights

CONCURRENCY = (1, 16)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.genai_weights", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per measurement")
    parser.add_argument("--warmup", type=float, default=2.0)
    args = parser.parse_args(argv)
    generation = GenerationConfig(max_num_seqs=32)
    rates: dict[tuple[Weights, int], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="tidegate-weights-") as work:
        model = build_bench_llama(Path(work) / "bench-llama")
        print(f"model: {model.describe()}", flush=True)
        for round_ in range(args.rounds):
            for weights in (Weights.ORIGINAL, Weights.INT8):
                loads = measure_pipeline(
                    model.path, default_cache_dir(), precision=Precision.AUTO,
                    generation=generation, concurrency=CONCURRENCY, warmup_s=args.warmup,
                    duration_s=args.duration, weights=weights)
                for load in loads:
                    rates.setdefault((weights, load.concurrency), []).append(load.tokens_per_s)
                print(f"round {round_ + 1}, {weights.value} weights ({loads[0].resolved.value}): "
                      + ", ".join(f"{load.concurrency} in flight {load.tokens_per_s:.0f} tokens/s"
                                  for load in loads), flush=True)
    for n in CONCURRENCY:
        ratios = [b / a for a, b in zip(rates[(Weights.ORIGINAL, n)], rates[(Weights.INT8, n)],
                                        strict=True)]
        print(f"{n} in flight: int8 / original weights = {statistics.median(ratios):.2f} "
              f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
