"""OpenAI's logprobs objects, from the engine's :class:`~tidegate.generation.TokenLogprob`.

Completions use the legacy shape, ``{"tokens", "token_logprobs", "top_logprobs",
"text_offset"}``; chat uses ``{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}``. A
token's string is the tokenizer's decoding of that one id, special tokens included (a byte of a
split character decodes to U+FFFD, as with OpenAI); ``text_offset`` adds up those strings'
lengths, as vLLM does. A logprob of ``-inf`` is reported as -9999.0 (JSON has no infinity).
The legacy ``top_logprobs`` are keyed by string, so alternatives that decode alike collapse.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tidegate.api.generation_params import Endpoint
from tidegate.generation.detok import TokenDecoder
from tidegate.generation.params import TokenLogprob

__all__ = ["LogprobEncoder"]

_FLOOR = -9999.0


class LogprobEncoder:
    """The logprobs of one request's tokens, chunk after chunk (offsets carry over)."""

    __slots__ = ("_decoder", "_endpoint", "_offset", "_strings")

    def __init__(self, decoder: TokenDecoder, endpoint: Endpoint) -> None:
        self._decoder = decoder
        self._endpoint = endpoint
        self._strings: dict[int, str] = {}
        self._offset = 0

    def _string(self, token_id: int) -> str:
        text = self._strings.get(token_id)
        if text is None:
            text = self._decoder.decode([token_id], skip_special_tokens=False)
            self._strings[token_id] = text
        return text

    def encode(self, token_ids: Sequence[int], logprobs: Sequence[TokenLogprob]
               ) -> dict[str, Any]:
        """The ``logprobs`` object of a choice carrying these tokens."""
        if self._endpoint == "chat":
            return {"content": [self._chat_entry(token_id, logprob)
                                for token_id, logprob in zip(token_ids, logprobs, strict=True)]}
        return self._legacy(token_ids, logprobs)

    def _chat_entry(self, token_id: int, logprob: TokenLogprob) -> dict[str, Any]:
        text = self._string(token_id)
        return {
            "token": text, "logprob": max(logprob.logprob, _FLOOR),
            "bytes": list(text.encode()),
            "top_logprobs": [
                {"token": (alt := self._string(alt_id)), "logprob": max(value, _FLOOR),
                 "bytes": list(alt.encode())}
                for alt_id, value in logprob.top
            ],
        }

    def _legacy(self, token_ids: Sequence[int], logprobs: Sequence[TokenLogprob]
                ) -> dict[str, Any]:
        tokens = [self._string(token_id) for token_id in token_ids]
        offsets = []
        for text in tokens:
            offsets.append(self._offset)
            self._offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [max(logprob.logprob, _FLOOR) for logprob in logprobs],
            "top_logprobs": [self._legacy_top(logprob) for logprob in logprobs],
            "text_offset": offsets,
        }

    def _legacy_top(self, logprob: TokenLogprob) -> dict[str, float]:
        """Alternatives keyed by their string: two ids with the same string (bytes of split
        characters all read U+FFFD) keep the likelier one, as the shape allows no more."""
        top: dict[str, float] = {}
        for alt_id, value in logprob.top:
            top.setdefault(self._string(alt_id), max(value, _FLOOR))
        return top
