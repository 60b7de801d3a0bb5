"""One sequence as the event loop sees it: its tokens, its text, and when it is finished.

:meth:`SequenceState.accept` is the per-token decision, pure and synchronous: detokenize, look
for stop strings, and say whether the sequence ends (end-of-sequence token, stop string,
``max_tokens`` or the context). The engine does the I/O: pushing the text and closing streams.
"""

from __future__ import annotations

from collections.abc import Collection

from tidegate.generation.detok import IncrementalDetokenizer, StopFilter, TokenDecoder
from tidegate.generation.params import FinishReason, SamplingParams
from tidegate.generation.sampling import make_generator
from tidegate.generation.stream import GenerationResult, GenerationStream

__all__ = ["SequenceState"]


class SequenceState:
    __slots__ = ("_detok", "_eos", "_stops", "first_token_at", "generator", "id", "in_batch",
                 "last_token_at", "max_new", "output_ids", "params", "prompt_ids", "request_id",
                 "stream", "submitted_at", "text_parts")

    def __init__(
        self,
        seq_id: int,
        request_id: str,
        prompt_ids: tuple[int, ...],
        *,
        params: SamplingParams,
        max_new: int,
        stream: GenerationStream,
        decoder: TokenDecoder,
        eos_token_ids: Collection[int],
        now: float,
    ) -> None:
        self.id = seq_id
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.max_new = max_new
        """Tokens it may generate: ``max_tokens`` capped by the room left in the context."""
        self.stream = stream
        self.generator = make_generator(params.seed)
        self._detok = IncrementalDetokenizer(decoder, prompt_ids=prompt_ids)
        self._stops = StopFilter(params.stop)
        self._eos = eos_token_ids
        self.submitted_at = now
        self.first_token_at: float | None = None
        self.last_token_at = now
        self.output_ids: list[int] = []
        self.text_parts: list[str] = []
        self.in_batch = False
        """Handed to the worker: its row must be dropped when it ends."""

    def accept(self, token: int) -> tuple[str, FinishReason | None]:
        """Record a generated token: the text to stream now, and the finish reason if this
        token ends the sequence (then the text includes whatever was still held back)."""
        self.output_ids.append(token)
        if token in self._eos:
            return self._settle(self._detok.flush(), "stop")
        text, stopped = self._stops.feed(self._detok.push(token))
        if stopped:
            return self._record(text), "stop"
        emitted = self._record(text)
        if len(self.output_ids) >= self.max_new:
            tail, reason = self._settle(self._detok.flush(), "length")
            return emitted + tail, reason
        return emitted, None

    def _settle(self, text: str, reason: FinishReason) -> tuple[str, FinishReason]:
        """The sequence ends for ``reason``: release held-back text (which may still turn out
        to hold a stop string)."""
        tail, stopped = self._stops.feed(text)
        if not stopped:
            tail += self._stops.flush()
        return self._record(tail), "stop" if stopped else reason

    def _record(self, text: str) -> str:
        if text:
            self.text_parts.append(text)
        return text

    def result(self, reason: FinishReason) -> GenerationResult:
        return GenerationResult(
            request_id=self.request_id,
            text="".join(self.text_parts),
            token_ids=tuple(self.output_ids),
            finish_reason=reason,
            prompt_tokens=len(self.prompt_ids),
        )
