"""A small random-weight GPT-2 and its tokenizer, built offline into a local directory.

The generation benchmark measures the engine, not the model: a 4-layer, 256-wide GPT-2 with
seeded random weights keeps each decode step cheap enough on a CPU that scheduling, batching and
streaming costs show. The tokenizer is a byte-level BPE trained on the benchmark's own seeded
sentences, so nothing is downloaded. Its alphabet is only the bytes those (ASCII) sentences
contain, so every token decodes to whole characters and each sampled token streams as text at
once (a full 256-byte alphabet would let the random model sample lone UTF-8 continuation bytes
that the server rightly holds back).

Run alone with ``python -m bench.tiny_gpt2 DIR`` to write the model to ``DIR``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.workload import make_sentences

__all__ = ["EOS_TOKEN", "TinyGpt2", "build_tiny_gpt2"]

EOS_TOKEN = "<|endoftext|>"
_TRAINING_SENTENCES = 400
_VOCAB_SIZE = 1024
_SEED = 1234


@dataclass(frozen=True, kw_only=True, slots=True)
class TinyGpt2:
    path: Path
    vocab_size: int
    parameters: int
    n_layer: int
    n_embd: int
    n_positions: int

    def describe(self) -> str:
        return (
            f"random-weight GPT-2: {self.n_layer} layers, n_embd {self.n_embd}, "
            f"context {self.n_positions}, vocab {self.vocab_size} (byte-level BPE), "
            f"{self.parameters / 1e6:.1f} M parameters"
        )


def _train_tokenizer(sentences: Sequence[str]) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE, special_tokens=[EOS_TOKEN], show_progress=False
    )
    tokenizer.train_from_iterator(sentences, trainer=trainer)
    wrapper: Any = PreTrainedTokenizerFast  # transformers' constructors are untyped
    return wrapper(
        tokenizer_object=tokenizer, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
        model_max_length=512,
    )


def build_tiny_gpt2(
    path: Path, *, n_layer: int = 4, n_embd: int = 256, n_head: int = 4, n_positions: int = 512
) -> TinyGpt2:
    """Write a seeded random GPT-2 and its tokenizer to ``path`` (``save_pretrained`` layout)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = _train_tokenizer(make_sentences(_TRAINING_SENTENCES, seed=_SEED))
    vocab_size = len(tokenizer)
    eos_id = tokenizer.eos_token_id
    config = GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions,
        vocab_size=vocab_size, bos_token_id=eos_id, eos_token_id=eos_id,
    )
    torch.manual_seed(_SEED)
    model: Any = GPT2LMHeadModel(config)
    model.eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return TinyGpt2(
        path=path, vocab_size=vocab_size,
        parameters=sum(p.numel() for p in model.parameters()),
        n_layer=n_layer, n_embd=n_embd, n_positions=n_positions,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tiny_gpt2", description=__doc__)
    parser.add_argument("path", type=Path, help="directory to write the model into")
    args = parser.parse_args(argv)
    model = build_tiny_gpt2(args.path)
    print(f"{model.path}: {model.describe()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
