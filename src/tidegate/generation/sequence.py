"""One sequence as the event loop sees it: its tokens, its text, and when it is finished.

:meth:`SequenceState.accept` is the per-token decision, pure and synchronous: detokenize, look
for stop strings, and say whether the sequence ends (end-of-sequence token, stop string,
``max_tokens`` or the context). The engine does the I/O: pushing the text and closing streams.

A sequence that reports logprobs also keeps a :class:`_Ledger` of which tokens' text has reached
its reader, so that each token's logprob goes out with the delta that completes its text.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection

from tidegate.generation.detok import IncrementalDetokenizer, StopFilter, TokenDecoder
from tidegate.generation.params import FinishReason, SamplingParams, TokenLogprob
from tidegate.generation.sampling import make_generator
from tidegate.generation.stream import Delta, GenerationResult, GenerationStream

__all__ = ["SequenceState"]

_Token = tuple[int, TokenLogprob]


class _Ledger:
    """Which generated tokens' text the reader has: the detokenizer turns a group of pending
    tokens into one piece of text (a character split over byte tokens, a skipped special token
    followed by text); the stop filter then releases that text, possibly later or cut short.

    A group is released with the delta that reaches its piece's end. When a stop string cuts
    the text, groups with some text before the cut are released and the rest are swallowed.
    """

    __slots__ = ("_decoded", "_groups", "_pending", "_released", "_reported_to", "reported")

    def __init__(self) -> None:
        self._pending: list[_Token] = []
        self._groups: deque[tuple[int, list[_Token]]] = deque()
        """(offset of the end of its piece in the decoded text, its tokens)."""
        self._decoded = 0
        self._released = 0
        self._reported_to = 0  # where the next group's piece starts
        self.reported: list[TokenLogprob] = []

    def add(self, token: int, logprob: TokenLogprob) -> None:
        self._pending.append((token, logprob))

    def decoded(self, chars: int) -> None:
        """The detokenizer turned every pending token into ``chars`` characters of text."""
        self._decoded += chars
        self._groups.append((self._decoded, self._pending))
        self._pending = []

    def release(self, chars: int, *, ended: bool, cut: bool) -> tuple[_Token, ...]:
        """The reader gets ``chars`` more characters: the tokens that completes. ``cut``: a stop
        string starts right after them; ``ended`` (uncut): every token is released."""
        self._released += chars
        out: list[_Token] = []
        groups = self._groups
        if cut:
            while groups and self._reported_to < self._released:
                self._reported_to, tokens = groups.popleft()
                out += tokens
            groups.clear()
            self._pending.clear()
        else:
            while groups and groups[0][0] <= self._released:
                self._reported_to, tokens = groups.popleft()
                out += tokens
            if ended:
                for _, tokens in groups:
                    out += tokens
                groups.clear()
                out += self._pending
                self._pending = []
        self.reported += (logprob for _, logprob in out)
        return tuple(out)


class SequenceState:
    __slots__ = ("_detok", "_eos", "_ledger", "_stops", "expected_s", "first_token_at",
                 "generator", "id", "in_batch", "last_token_at", "max_new", "output_ids",
                 "params", "prompt_ids", "request_id", "stream", "submitted_at", "text_parts")

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
        self._eos = frozenset() if params.ignore_eos else eos_token_ids
        self._ledger = None if params.logprobs is None else _Ledger()
        self.submitted_at = now
        self.first_token_at: float | None = None
        self.last_token_at = now
        self.output_ids: list[int] = []
        self.text_parts: list[str] = []
        self.in_batch = False
        """Handed to the worker: its row must be dropped when it ends."""
        self.expected_s: float | None = None
        """How long it was expected to take when admitted (``max_queue_wait_ms``)."""

    @property
    def reports_logprobs(self) -> bool:
        return self._ledger is not None

    def accept(
        self, token: int, logprob: TokenLogprob | None = None
    ) -> tuple[str | Delta, FinishReason | None]:
        """Record a generated token (with its logprob, which a sequence that reports them
        needs): what to stream now, and the finish reason if this token ends the sequence (then
        it includes whatever was still held back). A sequence that reports logprobs streams
        :class:`Delta` objects, any other plain text."""
        self.output_ids.append(token)
        if self._ledger is not None:
            assert logprob is not None, "a sequence reporting logprobs got a token without"
            self._ledger.add(token, logprob)
        reason: FinishReason | None
        # An end-of-sequence token ends it once min_tokens are generated (the worker masks it
        # before); with ignore_eos, _eos is empty.
        if token in self._eos and len(self.output_ids) > self.params.min_tokens:
            text, reason, cut = self._settle(self._detok.flush(), "stop")
        else:
            text, cut = self._feed(self._detok.push(token))
            reason = "stop" if cut else None
            if not cut and len(self.output_ids) >= self.max_new:
                tail, reason, cut = self._settle(self._detok.flush(), "length")
                text += tail
        if self._ledger is None:
            return text, reason
        tokens = self._ledger.release(len(text), ended=reason is not None, cut=cut)
        return Delta(text, tuple(t for t, _ in tokens), tuple(lp for _, lp in tokens)), reason

    def _feed(self, piece: str) -> tuple[str, bool]:
        """Decoded text through the stop filter: what the reader gets now, and whether a stop
        string was found (right after that text)."""
        if piece and self._ledger is not None:
            self._ledger.decoded(len(piece))
        text, cut = self._stops.feed(piece)
        return self._record(text), cut

    def _settle(self, piece: str, reason: FinishReason) -> tuple[str, FinishReason, bool]:
        """The sequence ends for ``reason``: release held-back text (which may still turn out
        to hold a stop string)."""
        text, cut = self._feed(piece)
        if not cut:
            text += self._record(self._stops.flush())
        return text, "stop" if cut else reason, cut

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
            logprobs=None if self._ledger is None else tuple(self._ledger.reported),
        )
