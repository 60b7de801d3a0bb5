"""What a caller of the engine holds: one sequence's stream of text deltas and its result.

Iterating a stream gives ``str`` deltas. A sequence whose params ask for logprobs carries a
:class:`Delta` per push instead (its text and the tokens whose text it completes, with their
logprobs); :meth:`GenerationStream.deltas` reads those. Both iterations read the same buffer, so
a sequence without logprobs costs exactly what a plain text stream costs.

The engine pushes deltas without ever waiting: a stream buffers at most ``capacity`` of them.
Past that, further text is coalesced into an overflow (bounded by the sequence's own length)
and the stream notes since when its reader has not kept up; the engine aborts the sequence if
that lasts longer than its timeout. A read always clears the mark, so a reader that is slow but
moving is never aborted. The final result and an error are delivered after every buffered delta.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType

from tidegate.errors import TidegateError
from tidegate.generation.params import FinishReason, TokenLogprob

__all__ = ["Delta", "GenerationResult", "GenerationStream"]


@dataclass(frozen=True, slots=True)
class Delta:
    """Streamed text and the generated tokens it completes: a token's logprob travels with the
    delta that carries the end of its text (held-back text delays it; tokens whose text a stop
    string swallowed are never reported). A delta may have tokens and no text: an
    end-of-sequence token at the end, say."""

    text: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    """One per token id."""

    @staticmethod
    def join(parts: Sequence[Delta]) -> Delta:
        return Delta(
            "".join(part.text for part in parts),
            tuple(token for part in parts for token in part.token_ids),
            tuple(logprob for part in parts for logprob in part.logprobs),
        )


Item = str | Delta


def _coalesce(parts: Sequence[Item]) -> Item:
    """Several pushes as one (a sequence pushes only ``str`` or only ``Delta``)."""
    deltas = [part for part in parts if isinstance(part, Delta)]
    if deltas:
        return Delta.join(deltas)
    return "".join([part for part in parts if isinstance(part, str)])


@dataclass(frozen=True, slots=True)
class GenerationResult:
    request_id: str
    text: str
    """Everything streamed, concatenated (stop string excluded)."""
    token_ids: tuple[int, ...]
    """Generated tokens, the end-of-sequence token included when it ended the sequence."""
    finish_reason: FinishReason
    prompt_tokens: int
    logprobs: tuple[TokenLogprob, ...] | None = None
    """When asked for: those of the first ``len(logprobs)`` of ``token_ids``, i.e. all but the
    tokens a stop string swallowed."""

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class GenerationStream:
    """Async iterator over one sequence's text deltas (or, with :meth:`deltas`, its
    :class:`Delta` objects); then :attr:`result` is set.

    Use it as an async context manager: leaving the block before the end (client gone,
    exception, cancellation) cancels the sequence, which frees its slot at the next step.
    Iteration raises the sequence's error, if it failed, after yielding what was buffered.
    """

    def __init__(
        self,
        request_id: str,
        *,
        prompt_tokens: int,
        capacity: int,
        on_cancel: Callable[[], None],
    ) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self._capacity = capacity
        self._on_cancel = on_cancel
        self._items: deque[Item] = deque()
        self._overflow: list[Item] = []
        self._result: GenerationResult | None = None
        self._error: TidegateError | None = None
        self._error_raised = False
        self._ready = asyncio.Event()
        self.blocked_since: float | None = None
        """When a delta last found the buffer full with no read since; None while it keeps up."""

    def __repr__(self) -> str:
        state = "done" if self.done else "open"
        return (
            f"<GenerationStream {self.request_id} {state} buffered={len(self._items)}"
            f" overflow={len(self._overflow)}>"
        )

    @property
    def done(self) -> bool:
        """The sequence has ended (finished, failed or cancelled); deltas may remain to read."""
        return self._result is not None or self._error is not None

    @property
    def result(self) -> GenerationResult | None:
        """The final result, once the sequence has finished (None if it failed)."""
        return self._result

    # -- the reader's side ---------------------------------------------------------------------

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> str:
        item = await self._next()
        if item is None:
            raise StopAsyncIteration
        return item if isinstance(item, str) else item.text

    async def deltas(self) -> AsyncIterator[Delta]:
        """The stream as :class:`Delta` objects: with their tokens when the sequence reports
        logprobs, else each text delta with none."""
        while (item := await self._next()) is not None:
            yield item if isinstance(item, Delta) else Delta(item)

    async def _next(self) -> Item | None:
        """The next buffered push; None at the end; raises the sequence's error once."""
        while True:
            if self._items:
                item = self._items.popleft()
                self.blocked_since = None
                if self._overflow:
                    self._items.append(_coalesce(self._overflow))
                    self._overflow.clear()
                return item
            if self._error is not None:
                if self._error_raised:
                    return None
                self._error_raised = True
                raise self._error
            if self._result is not None:
                return None
            self._ready.clear()
            await self._ready.wait()

    async def collect(self) -> GenerationResult:
        """Read the stream to its end and return the result."""
        async for _ in self:
            pass
        if self._result is None:  # failed, and the error was already raised once
            assert self._error is not None
            raise self._error
        return self._result

    def cancel(self) -> None:
        """Stop generating this sequence (idempotent; no effect once it has ended)."""
        if not self.done:
            self._on_cancel()

    async def __aenter__(self) -> GenerationStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cancel()

    # -- the engine's side (event loop thread only) --------------------------------------------

    def push(self, item: Item, now: float) -> None:
        if not item or (isinstance(item, Delta) and not (item.text or item.token_ids)):
            return
        if len(self._items) < self._capacity and not self._overflow:
            self._items.append(item)
        else:
            self._overflow.append(item)
            if self.blocked_since is None:
                self.blocked_since = now
        self._ready.set()

    def finish(self, result: GenerationResult) -> None:
        """End the stream after the text pushed so far."""
        if self._overflow and len(self._items) < self._capacity:
            self._items.append(_coalesce(self._overflow))
            self._overflow.clear()
        self._result = result
        self._ready.set()

    def fail(self, error: TidegateError) -> None:
        """End the stream with an error; text that never made it into the buffer is dropped."""
        self._overflow.clear()
        self._error = error
        self._ready.set()
