"""The text side of a causal LM, whatever engine computes it: its Hugging Face tokenizer,
prompt and chat encoding, incremental decoding, end-of-sequence tokens."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

from tidegate.errors import InvalidRequest
from tidegate.generation.detok import TokenDecoder

__all__ = ["LMText", "default_chat_prompt", "eos_token_ids"]


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
        ids: list[int] = self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        return list(ids)

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

