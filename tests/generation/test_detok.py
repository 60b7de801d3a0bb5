"""Incremental detokenization with a byte-level BPE tokenizer, and stop-string hold-back."""

from __future__ import annotations

from typing import Any

import torch

from tidegate.generation.detok import IncrementalDetokenizer, StopFilter, fast_decoder

from ..conftest import build_tokenizer

TEXT = "Café déjà vu: 日本語 🙂🚀 naïve Zürich"


def stream(tokenizer: Any, ids: list[int], prompt: list[int] | None = None) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=prompt or [])
    deltas = [detok.push(token) for token in ids]
    deltas.append(detok.flush())
    return deltas


def test_multibyte_characters_are_never_split(byte_tokenizer: Any) -> None:
    ids = byte_tokenizer.encode(TEXT, add_special_tokens=False)
    # The test is only meaningful if some tokens carry part of a character.
    assert any("\ufffd" in byte_tokenizer.decode([token]) for token in ids)
    deltas = stream(byte_tokenizer, ids)
    assert "".join(deltas) == TEXT
    assert all("\ufffd" not in delta for delta in deltas)
    assert "" in deltas  # some tokens had to wait for the rest of their character


def test_prompt_context_does_not_leak_into_the_output(byte_tokenizer: Any) -> None:
    prompt = byte_tokenizer.encode("Über ", add_special_tokens=False)
    ids = byte_tokenizer.encode("日本 ok", add_special_tokens=False)
    assert "".join(stream(byte_tokenizer, ids, prompt)) == "日本 ok"


def test_invalid_bytes_are_emitted_after_a_bounded_wait(byte_tokenizer: Any) -> None:
    # A lone continuation byte never completes: it must not hold the stream forever.
    continuation = next(
        t for t in range(len(byte_tokenizer)) if byte_tokenizer.decode([t]) == "\ufffd"
    )
    detok = IncrementalDetokenizer(byte_tokenizer)
    deltas = [detok.push(continuation) for _ in range(4)]
    assert deltas[:3] == ["", "", ""]
    assert "\ufffd" in deltas[3]
    assert detok.push(byte_tokenizer.encode("a", add_special_tokens=False)[0]) == "a"


def test_special_tokens_are_skipped(byte_tokenizer: Any) -> None:
    ids = [*byte_tokenizer.encode("hi", add_special_tokens=False), byte_tokenizer.eos_token_id]
    assert "".join(stream(byte_tokenizer, ids)) == "hi"


def feed_all(stops: list[str], deltas: list[str]) -> tuple[list[str], bool]:
    stop_filter = StopFilter(stops)
    out = []
    for delta in deltas:
        text, stopped = stop_filter.feed(delta)
        out.append(text)
        if stopped:
            return out, True
    out.append(stop_filter.flush())
    return out, False


def test_stop_string_split_across_deltas_is_never_streamed() -> None:
    out, stopped = feed_all(["END"], ["Hello E", "N", "D and more"])
    assert stopped
    assert out == ["Hello ", "", ""]


def test_held_text_is_released_when_it_turns_out_not_to_be_a_stop() -> None:
    out, stopped = feed_all(["END"], ["Hello E", "N", "o"])
    assert not stopped
    assert out == ["Hello ", "", "ENo", ""]
    out, stopped = feed_all(["END"], ["tail E"])
    assert (out, stopped) == (["tail ", "E"], False)


def test_earliest_of_several_stops_wins() -> None:
    out, stopped = feed_all(["world", "lo"], ["hello world"])
    assert (out, stopped) == (["hel"], True)


def test_no_stops_passes_text_through() -> None:
    assert feed_all([], ["a", "b"]) == (["a", "b", ""], False)


def test_the_fast_decoder_decodes_exactly_as_the_tokenizer(byte_tokenizer: Any) -> None:
    fast = fast_decoder(byte_tokenizer)
    assert fast is not byte_tokenizer  # the backend path is the one under test
    generator = torch.Generator().manual_seed(3)
    special = byte_tokenizer.eos_token_id
    for _ in range(300):
        ids = torch.randint(0, len(byte_tokenizer), (int(torch.randint(0, 9, (1,))),),
                            generator=generator).tolist()
        if ids and int(torch.randint(0, 3, (1,), generator=generator)) == 0:
            ids[0] = special
        for skip in (True, False):
            assert fast.decode(ids, skip_special_tokens=skip) == byte_tokenizer.decode(
                ids, skip_special_tokens=skip)
    ids = byte_tokenizer.encode(TEXT, add_special_tokens=False)
    assert "".join(stream(fast, ids)) == TEXT


def test_clean_up_of_tokenization_spaces_is_decoded_as_the_tokenizer_does() -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = build_tokenizer()
    bpe.clean_up_tokenization_spaces = True  # transformers skips it for BPE models
    text = "a , b . c ' d ?"
    ids = bpe.encode(text, add_special_tokens=False)
    assert fast_decoder(bpe) is not bpe
    assert fast_decoder(bpe).decode(ids, skip_special_tokens=True) == bpe.decode(
        ids, skip_special_tokens=True)

    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()
    backend.train_from_iterator(
        [text] * 4, trainers.WordPieceTrainer(special_tokens=["[UNK]"], show_progress=False))
    wordpiece = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend, unk_token="[UNK]", clean_up_tokenization_spaces=True)
    assert wordpiece.decode(wordpiece.encode(text)) != backend.decode(wordpiece.encode(text))
    assert fast_decoder(wordpiece) is wordpiece  # its clean-up changes the text: keep it
