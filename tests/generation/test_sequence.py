"""The per-token decision: text to stream and whether the sequence ends."""

from __future__ import annotations

from typing import Any

from tidegate.generation import GenerationStream, SamplingParams
from tidegate.generation.sequence import SequenceState


def make(tokenizer: Any, *, max_new: int = 100, stop: tuple[str, ...] = ()) -> SequenceState:
    stream = GenerationStream("r", prompt_tokens=1, capacity=8, on_cancel=lambda: None)
    return SequenceState(
        0, "r", (1,), params=SamplingParams(stop=stop), max_new=max_new, stream=stream,
        decoder=tokenizer, eos_token_ids={tokenizer.eos_token_id}, now=0.0,
    )


def feed(seq: SequenceState, ids: list[int]) -> tuple[list[str], str | None]:
    texts = []
    for token in ids:
        text, finished = seq.accept(token)
        texts.append(text)
        if finished:
            return texts, finished
    return texts, None


def test_end_of_sequence_releases_held_text(byte_tokenizer: Any) -> None:
    seq = make(byte_tokenizer, stop=("xyz",))
    ids = byte_tokenizer.encode("ab x", add_special_tokens=False)
    texts, finished = feed(seq, [*ids, byte_tokenizer.eos_token_id])
    assert finished == "stop"
    assert "".join(texts) == "ab x" == seq.result("stop").text
    assert seq.result("stop").completion_tokens == len(ids) + 1


def test_length_releases_held_text_unless_it_completes_a_stop(byte_tokenizer: Any) -> None:
    ids = byte_tokenizer.encode("one tw", add_special_tokens=False)
    seq = make(byte_tokenizer, max_new=len(ids), stop=("two",))
    texts, finished = feed(seq, ids)
    assert (finished, "".join(texts)) == ("length", "one tw")
    # A character split over the last tokens still reaches the reader whole.
    ids = byte_tokenizer.encode("ok 日", add_special_tokens=False)
    seq = make(byte_tokenizer, max_new=len(ids))
    texts, finished = feed(seq, ids)
    assert (finished, "".join(texts)) == ("length", "ok 日")


def test_stop_string_ends_the_sequence_without_itself(byte_tokenizer: Any) -> None:
    ids = byte_tokenizer.encode("Hello END world", add_special_tokens=False)
    seq = make(byte_tokenizer, stop=("END",))
    texts, finished = feed(seq, ids)
    assert finished == "stop"
    assert "".join(texts) == "Hello " == seq.result("stop").text
