"""Token ids to streamed text: incremental detokenization and stop-string matching.

Both are pure and per sequence. :class:`IncrementalDetokenizer` turns one token at a time into
text deltas that never split a character; :class:`StopFilter` holds back text that could be the
start of a stop string, so a stop string is never streamed, even in part.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, cast

__all__ = ["IncrementalDetokenizer", "StopFilter", "TokenDecoder", "fast_decoder"]

_REPLACEMENT = "\ufffd"
# Tokens of prompt kept as left context: decoders that drop a word's leading space at the start
# of a text (SentencePiece) need something before the first generated token.
_CONTEXT_TOKENS = 4
# A UTF-8 character has at most 4 bytes, so at most 4 byte-level tokens can be waiting for the
# rest of it. Text still undecodable after that many is genuinely invalid: emit it as it is.
_MAX_PENDING_TOKENS = 4


class TokenDecoder(Protocol):
    """The part of a Hugging Face tokenizer the detokenizer uses."""

    def decode(self, token_ids: list[int], *, skip_special_tokens: bool) -> str: ...


class _BackendDecoder:
    """Decodes with a Hugging Face fast tokenizer's Rust backend directly.

    ``PreTrainedTokenizerBase.decode`` converts and inspects its argument on every call, which
    costs several times the decoding itself for the few ids the detokenizer passes, twice per
    generated token, on the event loop.
    """

    __slots__ = ("_backend",)

    def __init__(self, backend: Any) -> None:
        self._backend = backend

    def decode(self, token_ids: list[int], *, skip_special_tokens: bool) -> str:
        text: str = self._backend.decode(token_ids, skip_special_tokens=skip_special_tokens)
        return text


def fast_decoder(tokenizer: Any) -> TokenDecoder:
    """A decoder that gives exactly what ``tokenizer.decode`` gives, through the tokenizer's
    Rust backend where that is all its ``decode`` does (a transformers fast tokenizer that does
    not override decoding and does not clean up tokenization spaces, which transformers never
    does for BPE models); else the tokenizer. The choice is made once: a tokenizer whose
    clean-up setting changes afterwards needs a new decoder."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # pragma: no cover - an older transformers
        return cast(TokenDecoder, tokenizer)
    if not (
        isinstance(tokenizer, TokenizersBackend)
        and type(tokenizer)._decode is TokenizersBackend._decode
        and type(tokenizer).decode is TokenizersBackend.decode
    ):
        return cast(TokenDecoder, tokenizer)
    backend = tokenizer.backend_tokenizer
    # transformers skips the clean-up for BPE models unless forced (it corrupts their text).
    cleans = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False)) and not (
        type(backend.model).__name__ == "BPE"
        and not getattr(tokenizer, _FORCE_BPE_CLEANUP, False)
    )
    return cast(TokenDecoder, tokenizer) if cleans else _BackendDecoder(backend)


_FORCE_BPE_CLEANUP = "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"


class IncrementalDetokenizer:
    """Decode a growing list of token ids into text deltas.

    Each :meth:`push` decodes a short window: a few tokens already emitted (for context) plus
    those not yet emitted. The delta is the window's text minus the text of its context part.
    While the window's text ends in U+FFFD, the newest tokens hold an incomplete multi-byte
    character and nothing is emitted until it completes.
    """

    __slots__ = ("_decoder", "_ids", "_prefix", "_read", "_skip_special")

    def __init__(
        self,
        decoder: TokenDecoder,
        *,
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._decoder = decoder
        self._skip_special = skip_special_tokens
        self._ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0  # start of the context window
        self._read = len(self._ids)  # tokens before this have been emitted

    def _decode(self, start: int, stop: int | None = None) -> str:
        return self._decoder.decode(self._ids[start:stop], skip_special_tokens=self._skip_special)

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text it completes (possibly empty)."""
        self._ids.append(token_id)
        return self._emit(force=False)

    def flush(self) -> str:
        """Emit whatever is pending, complete or not: call when the sequence ends."""
        return self._emit(force=True)

    def _emit(self, *, force: bool) -> str:
        if self._read >= len(self._ids):
            return ""
        context = self._decode(self._prefix, self._read)
        window = self._decode(self._prefix)
        pending = len(self._ids) - self._read
        if not force and window.endswith(_REPLACEMENT) and pending < _MAX_PENDING_TOKENS:
            return ""
        if len(window) <= len(context):
            # Only special tokens (skipped) or a decoder that merged text away: nothing new.
            return ""
        self._prefix = self._read
        self._read = len(self._ids)
        self._trim()
        return window[len(context) :]

    def _trim(self) -> None:
        # Keep the id list from growing with the sequence: only the window is ever decoded.
        if self._prefix > 64:
            del self._ids[: self._prefix]
            self._read -= self._prefix
            self._prefix = 0


class StopFilter:
    """Find stop strings in streamed text, never letting any part of one through.

    :meth:`feed` returns the text that is safe to stream now and whether a stop string was
    found. Text that could begin a stop string is held back until the next delta settles it;
    :meth:`flush` returns it when the sequence ends for another reason.
    """

    __slots__ = ("_held", "_stops")

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stops)
        self._held = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        if not self._stops:
            return delta, False
        text = self._held + delta
        # A stop string lies wholly in held + delta: held text never holds a complete one, and
        # anything emitted before it could not have started one (it would have been held).
        found = [i for i in (text.find(stop) for stop in self._stops) if i >= 0]
        if found:
            self._held = ""
            return text[: min(found)], True
        keep = self._longest_stop_prefix_suffix(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:size]):
                    best = size
                    break
        return best
