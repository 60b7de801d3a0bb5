"""A random-weight Llama of SmolLM2-135M's shape and its tokenizer, built offline.

The generation benchmark compares engines on a model whose decode step costs what a real small
model's does: SmolLM2-135M's shape (30 layers, 576 wide, 9 heads over 3 KV heads, a 49,152
vocabulary, tied embeddings) with seeded random weights, so nothing is downloaded and every run
serves the same bytes (and so hits the same export cache entry).

A model with random weights samples any id of its vocabulary, so the tokenizer must decode every
one of them to text: a word-level vocabulary of the benchmark's own words (``bench.workload``,
lower-case and capitalized, with the sentences' full stop) padded with synthetic syllable words
to 49,152 entries, one of them the end-of-sequence token. A word-level model keeps each sampled
token one whole word, so each streams as text at once.

Run alone with ``python -m bench.bench_llama DIR`` to write the model to ``DIR``.
"""

from __future__ import annotations

import argparse
import itertools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.workload import WORDS

__all__ = ["EOS_TOKEN", "BenchLlama", "LlamaShape", "build_bench_llama"]

EOS_TOKEN = "<|endoftext|>"
_SEED = 135
_CONSONANTS = "bcdfghjklmnprstvwz"
_VOWELS = "aeiou"


@dataclass(frozen=True, kw_only=True, slots=True)
class LlamaShape:
    """SmolLM2-135M's configuration, the numbers that set a decode step's cost."""

    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    vocab_size: int = 49_152
    max_position_embeddings: int = 2048
    rope_theta: float = 100_000.0


@dataclass(frozen=True, kw_only=True, slots=True)
class BenchLlama:
    path: Path
    shape: LlamaShape
    parameters: int

    def describe(self) -> str:
        s = self.shape
        return (
            f"random-weight Llama of SmolLM2-135M's shape: {s.num_hidden_layers} layers, hidden "
            f"{s.hidden_size}, intermediate {s.intermediate_size}, {s.num_attention_heads} heads "
            f"/ {s.num_key_value_heads} KV heads, vocab {s.vocab_size:,} (word-level), tied "
            f"embeddings, context {s.max_position_embeddings}, rope theta {s.rope_theta:g}, "
            f"{self.parameters / 1e6:.1f} M parameters, fp32"
        )


def _synthetic_words() -> Iterator[str]:
    """Pronounceable words of two syllables, then three, in a fixed order."""
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    for count in itertools.count(2):
        for parts in itertools.product(syllables, repeat=count):
            yield "".join(parts)


def vocabulary(size: int) -> list[str]:
    """``size`` distinct tokens: the end-of-sequence token, the workload's words, fillers."""
    words = [EOS_TOKEN, ".", *WORDS, *(w.capitalize() for w in WORDS)]
    seen = set(words)
    fillers = (w for w in _synthetic_words() if w not in seen)
    return [*words, *itertools.islice(fillers, size - len(words))]


def _tokenizer(size: int) -> Any:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(vocabulary(size))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=EOS_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    # WordPiece's decoder joins tokens with spaces (no token here starts with its "##").
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer.add_special_tokens([AddedToken(EOS_TOKEN, special=True)])
    wrapper: Any = PreTrainedTokenizerFast  # transformers' constructors are untyped
    return wrapper(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                   model_max_length=LlamaShape().max_position_embeddings)


def build_bench_llama(path: Path, shape: LlamaShape | None = None) -> BenchLlama:
    """Write the seeded random Llama and its tokenizer to ``path`` (``save_pretrained``)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = shape or LlamaShape()
    tokenizer = _tokenizer(shape.vocab_size)
    eos_id = tokenizer.eos_token_id
    config = LlamaConfig(
        hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads, vocab_size=shape.vocab_size,
        max_position_embeddings=shape.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta},
        tie_word_embeddings=True, bos_token_id=eos_id, eos_token_id=eos_id,
        hidden_act="silu", rms_norm_eps=1e-5, initializer_range=0.02,
    )
    torch.manual_seed(_SEED)
    model: Any = LlamaForCausalLM(config)
    model.train(False)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return BenchLlama(path=path, shape=shape,
                      parameters=sum(p.numel() for p in model.parameters()))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_llama", description=__doc__)
    parser.add_argument("path", type=Path, help="directory to write the model into")
    args = parser.parse_args(argv)
    model = build_bench_llama(args.path)
    print(f"{model.path}: {model.describe()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
