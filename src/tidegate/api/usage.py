"""What an API key is charged for an answer tidegate relays (a remote model's upstream, or a
model's Ray replica): the ``usage`` the model reports, or, for a stream that ends before its
usage event (the client hung up, the drain cut it, the upstream failed), what it delivered.

A key's ``tokens_per_minute`` would be easy to evade if a stream's client could leave before the
usage event, or simply not ask for it. So with a key, a relayed stream is always asked for its
usage (:func:`ask_for_usage`), and :class:`StreamUsage` reads the stream as it passes: it finds
the usage event, removes it again when the client did not ask for one, and counts the content
events it let through, which are charged as completion tokens if no usage ever came. Prompt
tokens are then what the stream's :data:`PROMPT_TOKENS_HEADER` says (tidegate sends it with a
local model's stream, so a Ray replica's or a tidegate upstream's prompt is charged), or 0 (any
other upstream tokenized the prompt itself).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable
from typing import Any

import orjson

from tidegate.auth.keyring import ApiKey

__all__ = [
    "PROMPT_TOKENS_HEADER",
    "StreamUsage",
    "ask_for_usage",
    "charge_answer",
    "prompt_tokens_of",
    "usage_tokens",
]

PROMPT_TOKENS_HEADER = "x-tidegate-prompt-tokens"
"""Sent with a local model's stream: its prompt's tokens, known before the first event, so a
relay in front (the Ray ingress, a tidegate gateway) can charge them if the stream ends before
its usage event."""

_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
"""Where one SSE event ends: a blank line, with any of the three line endings the format
allows (not mixed within one boundary)."""
_CONTENT = re.compile(rb'"(?:content|text)"\s*:\s*"')
"""A chat delta's ``content`` or a completion chunk's ``text``: one content event."""
_LONGEST_EVENT = 65536
"""An unfinished event longer than this is not one worth reading for usage (no usage event is
this long): it is relayed, not held."""


def usage_tokens(data: object) -> tuple[int, int] | None:
    """(prompt, completion) tokens from an answer's ``usage``; None without one. A reranker's
    ``total_tokens`` counts as prompt tokens, as the single-process server charges them; a
    field of the wrong type counts as 0 (an odd replica is not fatal)."""
    if not isinstance(data, dict) or not isinstance(data.get("usage"), dict):
        return None
    usage = data["usage"]
    prompt = usage.get("prompt_tokens", usage.get("total_tokens"))
    completion = usage.get("completion_tokens", 0)
    return (prompt if isinstance(prompt, int) and not isinstance(prompt, bool) else 0,
            completion if isinstance(completion, int) and not isinstance(completion, bool)
            else 0)


def prompt_tokens_of(headers: Iterable[tuple[str, str]]) -> int:
    """The prompt tokens a stream's :data:`PROMPT_TOKENS_HEADER` says; 0 without a valid one."""
    for name, value in headers:
        if name.lower() == PROMPT_TOKENS_HEADER:
            digits = value.strip()
            return int(digits) if digits.isascii() and digits.isdigit() and len(digits) < 10 else 0
    return 0


def charge_answer(key: ApiKey, content: bytes) -> None:
    """Charge ``key`` the usage of a whole (not streamed) JSON answer, if it reports one."""
    with contextlib.suppress(orjson.JSONDecodeError):
        found = usage_tokens(orjson.loads(content))
        if found is not None:
            key.record(*found)


def ask_for_usage(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` (a streamed completion's) with ``stream_options.include_usage`` set, so the
    model reports what the stream cost."""
    options = body.get("stream_options")
    options = dict(options) if isinstance(options, dict) else {}
    return {**body, "stream_options": {**options, "include_usage": True}}


class StreamUsage:
    """Reads one relayed SSE stream for what its key is charged.

    :meth:`feed` takes the bytes as they arrive, however they were split, and returns what to
    relay now: the same bytes unchanged, or with ``strip`` the complete events without the usage
    event (``choices`` empty, ``usage`` set), a partial event held until its end arrives.
    :meth:`close` returns what is still held, and :meth:`charge` charges the key once.
    """

    __slots__ = ("_charged", "_held", "_prompt_tokens", "_strip", "delivered", "usage")

    def __init__(self, *, strip: bool, prompt_tokens: int = 0) -> None:
        """``prompt_tokens``: what the stream's prompt is charged if no usage comes."""
        self._strip = strip
        self._prompt_tokens = prompt_tokens
        self._held = b""  # the start of an event whose end has not arrived
        self._charged = False
        self.usage: tuple[int, int] | None = None
        """The last usage the stream reported (a model reporting usage on every chunk reports
        the running total)."""
        self.delivered = 0
        """Content events relayed: completion tokens, if no usage ever comes."""

    def feed(self, chunk: bytes) -> bytes:
        data = self._held + chunk
        end = 0
        for match in _EVENT_END.finditer(data):
            end = match.end()
        complete, self._held = data[:end], data[end:]
        kept = self._read(complete) if complete else complete
        if len(self._held) > _LONGEST_EVENT:  # not an event we read: relayed as it is
            if self._strip:
                kept += self._held
            self._held = b""
        return kept if self._strip else chunk

    def close(self) -> bytes:
        """What is still held (a last event without its blank line), to relay as it is."""
        held, self._held = self._held, b""
        if not held:
            return b""
        kept = self._read(held)
        return kept if self._strip else b""

    def charge(self, key: ApiKey | None) -> None:
        """Charge ``key`` (once): the usage reported, or the prompt's tokens (as far as known)
        and one completion token per content event delivered."""
        if key is None or self._charged:
            return
        self._charged = True
        if self.usage is not None:
            key.record(*self.usage)
        else:
            key.record(self._prompt_tokens, self.delivered)

    def _read(self, complete: bytes) -> bytes:
        if b'"usage"' not in complete:
            self.delivered += len(_CONTENT.findall(complete))
            return complete
        kept: list[bytes] = []
        position = 0
        for match in _EVENT_END.finditer(complete):
            event = complete[position:match.end()]
            position = match.end()
            if self._is_usage_event(event):
                continue
            kept.append(event)
        if position < len(complete):  # a last event without its blank line (close)
            event = complete[position:]
            if not self._is_usage_event(event):
                kept.append(event)
        return b"".join(kept)

    def _is_usage_event(self, event: bytes) -> bool:
        """Read ``event``'s usage, if any; True if it is the usage event to strip."""
        self.delivered += len(_CONTENT.findall(event))
        if b'"usage"' not in event:
            return False
        for line in event.splitlines():
            if not line.startswith(b"data:"):
                continue
            with contextlib.suppress(orjson.JSONDecodeError):
                data = orjson.loads(line[5:])
                found = usage_tokens(data)
                if found is not None:
                    self.usage = found
                    return (self._strip and isinstance(data, dict)
                            and data.get("choices") == [])
        return False
