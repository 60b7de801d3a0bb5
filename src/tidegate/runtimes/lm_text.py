"""The text side of a causal LM, whatever engine computes it: its Hugging Face tokenizer,
prompt and chat encoding, incremental decoding, end-of-sequence tokens."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tidegate.errors import InvalidRequest
from tidegate.generation.detok import TokenDecoder

__all__ = ["LMText", "backend_encoder", "default_chat_prompt", "eos_token_ids"]

log = logging.getLogger("tidegate.runtimes")

_PROBES = ("Hello, world!", "  two  spaces\tand a tab\n\nnew lines ", "ünïcödé 文字 🙂", "x" * 64)
"""Texts :func:`backend_encoder` checks both paths agree on (with each special token too)."""


def default_chat_prompt(messages: Sequence[Mapping[str, str]], *,
                        add_generation_prompt: bool = True) -> str:
    """The chat format for tokenizers without a chat template: each message as
    ``{role}: {content}`` on its own line, then (``add_generation_prompt``) ``assistant:`` for
    the model to continue::

        system: You are terse.
        user: Hi
        assistant:
    """
    lines = [f"{message['role']}: {message['content']}\n" for message in messages]
    return "".join(lines) + ("assistant:" if add_generation_prompt else "")


def eos_token_ids(generation_config: Any, model_config: Any, tokenizer: Any) -> frozenset[int]:
    """The tokens that end a sequence: the generation config's, else the model config's, and
    the tokenizer's own."""
    ids: set[int] = set()
    configured = getattr(generation_config, "eos_token_id", None)
    if configured is None:
        configured = getattr(model_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, list | tuple):
        ids.update(int(i) for i in configured)
    if isinstance(tokenizer.eos_token_id, int):
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def _call_tokenizer(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def backend_encoder(tokenizer: Any) -> Callable[[str, bool], list[int]] | None:
    """``(text, add_special_tokens) -> ids`` straight from a ``transformers`` fast tokenizer's
    Rust backend (``tokenizers.Tokenizer.encode``), or ``None`` where that could differ from
    calling the tokenizer: a class that overrides how it encodes, special tokens split,
    truncation or padding set on the backend, or any disagreement on probe texts.

    Calling the tokenizer goes through ``encode_batch``, which releases the GIL for the Rust
    call: on the event loop, with OpenVINO GenAI stepping in a thread (its step keeps the GIL),
    each prompt then waited for a step to end before the loop ran again. In one 30 s A/B of the
    overload soak on 2 cores, generation admitted 553 requests/s with the backend's ``encode``
    (which keeps the GIL, ~14 us here against ~25 us for the call) and 400 without."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # another transformers layout: keep its own call
        return None
    cls = type(tokenizer)
    if (backend is None or not isinstance(tokenizer, TokenizersBackend)
            or cls._encode_plus is not TokenizersBackend._encode_plus
            or cls.__call__ is not PreTrainedTokenizerBase.__call__
            or getattr(tokenizer, "split_special_tokens", False)):
        return None
    _call_tokenizer(tokenizer, _PROBES[0], True)  # the call leaves truncation and padding off
    if backend.truncation is not None or backend.padding is not None \
            or backend.encode_special_tokens:
        return None

    def encode(text: str, add_special_tokens: bool) -> list[int]:
        ids: list[int] = backend.encode(text, add_special_tokens=add_special_tokens).ids
        return ids

    specials = [str(token) for token in getattr(tokenizer, "all_special_tokens", [])]
    probes = [*_PROBES, *(f"a {token} b" for token in specials)]
    for text in probes:
        for add in (True, False):
            if encode(text, add) != _call_tokenizer(tokenizer, text, add):
                log.debug("tokenizer %s: its backend encodes %r differently; keeping its call",
                          cls.__name__, text)
                return None
    return encode


class LMText:
    """Prompt encoding for a runtime that sets ``tokenizer`` (a ``transformers`` tokenizer),
    ``decoder`` and ``context_length``. Also the model's
    :class:`~tidegate.runtimes.tokenization.ChatTokenizer` (``/tokenize``, ``/detokenize``)."""

    tokenizer: Any
    decoder: TokenDecoder
    context_length: int

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        """Token ids of a completion prompt, with the model's usual special tokens (BOS)."""
        return self.tokenize(text, add_special_tokens=True)

    def chat_prompt(self, messages: Sequence[Mapping[str, str]], *,
                    add_generation_prompt: bool = True) -> str:
        """The prompt text for chat ``messages`` (``role``/``content`` mappings): the
        tokenizer's chat template with the assistant turn opened (``add_generation_prompt``),
        else :func:`default_chat_prompt`."""
        if self.has_chat_template:
            try:
                text: str = self.tokenizer.apply_chat_template(
                    [dict(m) for m in messages], tokenize=False,
                    add_generation_prompt=add_generation_prompt,
                )
            except Exception as exc:  # the template refused these messages (e.g. role order)
                raise InvalidRequest(
                    f"The model's chat template rejected the messages: {exc}", param="messages"
                ) from exc
            return text
        return default_chat_prompt(messages, add_generation_prompt=add_generation_prompt)

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Token ids of :meth:`chat_prompt`. A chat template writes its own special tokens,
        so none are added to it; the default format gets the usual ones."""
        return self.tokenize_chat(messages)

    # -- ChatTokenizer (POST /tokenize, /detokenize) -----------------------------------------

    @property
    def max_model_len(self) -> int:
        return self.context_length

    @functools.cached_property
    def max_token_id(self) -> int:
        # The vocabulary's largest id, not its size: added tokens may leave gaps.
        largest: int = max(self.tokenizer.get_vocab().values())
        return largest

    def tokenize(self, text: str, *, add_special_tokens: bool) -> list[int]:
        return self._encoder(text, add_special_tokens)

    def choose_encoder(self) -> Callable[[str, bool], list[int]]:
        """The prompt encoder, chosen now if it was not yet: :func:`backend_encoder`'s equality
        probe tokenizes a few texts, which a runtime does at load rather than on its first
        prompt (on the event loop, where every other request would wait for it)."""
        return self._encoder

    @functools.cached_property
    def _encoder(self) -> Callable[[str, bool], list[int]]:
        fast = backend_encoder(self.tokenizer)
        return fast if fast is not None else functools.partial(_call_tokenizer, self.tokenizer)

    def tokenize_chat(self, messages: Sequence[Mapping[str, str]], *,
                      add_generation_prompt: bool = True,
                      add_special_tokens: bool | None = None) -> list[int]:
        text = self.chat_prompt(messages, add_generation_prompt=add_generation_prompt)
        if add_special_tokens is None:
            add_special_tokens = not self.has_chat_template
        return self.tokenize(text, add_special_tokens=add_special_tokens)

    def detokenize(self, token_ids: Sequence[int]) -> str:
        return self.decoder.decode(list(token_ids), skip_special_tokens=False)

    def token_strs(self, token_ids: Sequence[int]) -> list[str]:
        tokens: list[str] = self.tokenizer.convert_ids_to_tokens(list(token_ids))
        return tokens

