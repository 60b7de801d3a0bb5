"""The per-token decision: text to stream and whether the sequence ends."""

from __future__ import annotations

from typing import Any

from tidegate.generation import Delta, GenerationStream, SamplingParams, TokenLogprob
from tidegate.generation.sequence import SequenceState


def make(tokenizer: Any, *, max_new: int = 100, stop: tuple[str, ...] = (),
         **params: Any) -> SequenceState:
    stream = GenerationStream("r", prompt_tokens=1, capacity=8, on_cancel=lambda: None)
    return SequenceState(
        0, "r", (1,), params=SamplingParams(stop=stop, **params), max_new=max_new,
        stream=stream, decoder=tokenizer, eos_token_ids={tokenizer.eos_token_id}, now=0.0,
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


def test_ignore_eos_neither_ends_nor_drops_the_token(byte_tokenizer: Any) -> None:
    eos = byte_tokenizer.eos_token_id
    ids = byte_tokenizer.encode("ab", add_special_tokens=False)
    seq = make(byte_tokenizer, max_new=len(ids) + 2, ignore_eos=True)
    texts, finished = feed(seq, [ids[0], eos, *ids[1:], eos])
    assert finished == "length"
    result = seq.result("length")
    assert result.text == "".join(texts) == "ab"
    assert result.token_ids == (ids[0], eos, *ids[1:], eos)
    assert result.completion_tokens == len(ids) + 2


def test_eos_before_min_tokens_does_not_end_the_sequence(byte_tokenizer: Any) -> None:
    # The worker masks it; a worker that cannot still gets no early end.
    eos = byte_tokenizer.eos_token_id
    ids = byte_tokenizer.encode("abc", add_special_tokens=False)
    seq = make(byte_tokenizer, min_tokens=2)
    assert seq.accept(eos) == ("", None)
    assert seq.accept(ids[0])[1] is None
    assert seq.accept(eos) == ("", "stop")  # the third token may end it
    assert seq.result("stop").token_ids == (eos, ids[0], eos)


def lp(index: int) -> TokenLogprob:
    """A recognisable logprob for the index-th generated token."""
    return TokenLogprob(-float(index), ((index, -0.5),))


def feed_logprobs(seq: SequenceState, ids: list[int]) -> tuple[list[Delta], str | None]:
    deltas = []
    for index, token in enumerate(ids):
        delta, finished = seq.accept(token, lp(index))
        assert isinstance(delta, Delta)
        deltas.append(delta)
        if finished:
            return deltas, finished
    return deltas, None


def test_each_logprob_travels_with_the_text_its_token_completes(byte_tokenizer: Any) -> None:
    # "日" and "🙂" are split over byte-level tokens: theirs come with the character.
    text = "ok 日本 🙂!"
    ids = byte_tokenizer.encode(text, add_special_tokens=False)
    seq = make(byte_tokenizer, max_new=len(ids), logprobs=1)
    deltas, finished = feed_logprobs(seq, ids)
    assert finished == "length"
    assert "".join(d.text for d in deltas) == text
    assert [t for d in deltas for t in d.token_ids] == ids
    assert [x for d in deltas for x in d.logprobs] == [lp(i) for i in range(len(ids))]
    sent, streamed = 0, ""
    for delta in deltas:
        # A delta carries exactly the tokens whose text it completes.
        sent += len(delta.token_ids)
        streamed += delta.text
        assert byte_tokenizer.decode(ids[:sent]) == streamed
    assert any(not d.text and not d.token_ids for d in deltas)  # a split character waited
    result = seq.result("length")
    assert result.logprobs == tuple(lp(i) for i in range(len(ids)))


def test_held_back_text_delays_its_logprob_and_eos_is_reported_last(
    byte_tokenizer: Any,
) -> None:
    eos = byte_tokenizer.eos_token_id
    ids = byte_tokenizer.encode("ab x", add_special_tokens=False)
    seq = make(byte_tokenizer, stop=("xyz",), logprobs=0)
    deltas, finished = feed_logprobs(seq, [*ids, eos])
    assert finished == "stop"
    # "x" might start "xyz": it and its token wait for the end, which releases both.
    assert deltas[-2].text == "" and deltas[-2].token_ids == ()
    assert deltas[-1].text.endswith("x")
    assert deltas[-1].token_ids[-2:] == (ids[-1], eos)
    assert [t for d in deltas for t in d.token_ids] == [*ids, eos]
    assert seq.result("stop").logprobs == tuple(lp(i) for i in range(len(ids) + 1))


def test_tokens_swallowed_by_a_stop_string_are_not_reported(byte_tokenizer: Any) -> None:
    ids = byte_tokenizer.encode("Hello END world", add_special_tokens=False)
    seq = make(byte_tokenizer, stop=("END",), logprobs=0)
    deltas, finished = feed_logprobs(seq, ids)
    assert finished == "stop"
    result = seq.result("stop")
    assert result.text == "Hello "
    reported = [t for d in deltas for t in d.token_ids]
    count = len(reported)
    assert reported == ids[:count] and result.logprobs == tuple(lp(i) for i in range(count))
    # Every reported token put text before the stop string; the stop string's own are gone.
    assert byte_tokenizer.decode(ids[:count]).startswith(result.text)
    assert len(byte_tokenizer.decode(ids[: count - 1])) < len(result.text)
    assert "END" not in byte_tokenizer.decode(ids[: count - 1])
    assert count < len(result.token_ids)


def test_a_sequence_without_logprobs_streams_plain_text(byte_tokenizer: Any) -> None:
    seq = make(byte_tokenizer)
    text, _ = seq.accept(byte_tokenizer.encode("a", add_special_tokens=False)[0])
    assert text == "a" and type(text) is str
    assert seq.result("stop").logprobs is None


def test_a_token_cut_by_a_stop_string_is_reported_with_the_text_before_it(
    byte_tokenizer: Any,
) -> None:
    ids = byte_tokenizer.encode("tidegate streams", add_special_tokens=False)
    gate = [byte_tokenizer.decode([i]) for i in ids].index("gate")
    seq = make(byte_tokenizer, stop=("ate s",), logprobs=0)
    deltas, finished = feed_logprobs(seq, ids)
    assert finished == "stop"
    assert seq.result("stop").text == "tideg"
    # "gate" waits while "ate" may begin the stop string, then goes out with its "g".
    assert deltas[gate].text == "g" and deltas[gate].token_ids == ()
    assert deltas[-1].token_ids == (ids[gate],)
    assert [t for d in deltas for t in d.token_ids] == ids[: gate + 1]
