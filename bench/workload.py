"""The benchmark workload: deterministic ~12-word sentences and request bodies built from them.

Every measurement (in-process ceilings and HTTP load) draws from the same seeded sentences, so
their numbers are comparable.
"""

from __future__ import annotations

import random

import orjson

__all__ = ["DEFAULT_SEED", "WORDS", "embedding_bodies", "make_sentences"]

DEFAULT_SEED = 20240611

WORDS: tuple[str, ...] = (
    "the", "quick", "river", "carries", "light", "across", "a", "quiet", "valley", "where",
    "old", "bridges", "hold", "stories", "of", "travelers", "who", "crossed", "at", "dawn",
    "market", "streets", "fill", "with", "bread", "and", "music", "before", "noon", "children",
    "paint", "bright", "boats", "on", "harbor", "walls", "while", "gulls", "circle", "above",
    "engineers", "measure", "tides", "to", "plan", "new", "gates", "for", "storm", "season",
    "every", "evening", "lanterns", "glow", "along", "stone", "paths", "near", "library",
    "students", "read", "maps", "about", "distant", "islands", "mountains", "forests", "deserts",
    "weather", "changes", "slowly", "in", "autumn", "when", "leaves", "turn", "gold", "red",
    "farmers", "gather", "apples", "pears", "from", "orchards", "under", "clear", "skies",
    "machines", "learn", "patterns", "data", "server", "answers", "requests", "quickly",
    "batches", "vectors", "sentences", "meaning", "search", "results", "improve", "each", "day",
)

_MIN_WORDS = 10
_MAX_WORDS = 14


def make_sentences(count: int, *, seed: int = DEFAULT_SEED) -> list[str]:
    """``count`` sentences of 10-14 words (12 on average), the same for the same ``seed``."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(count):
        words = rng.choices(WORDS, k=rng.randint(_MIN_WORDS, _MAX_WORDS))
        sentences.append(" ".join(words).capitalize() + ".")
    return sentences


def embedding_bodies(model: str, sentences: list[str]) -> list[bytes]:
    """One ``POST /v1/embeddings`` JSON body per sentence, each with a single string input."""
    return [orjson.dumps({"model": model, "input": sentence}) for sentence in sentences]
