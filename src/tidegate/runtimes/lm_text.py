"""The text side of a causal LM, whatever engine computes it: its Hugging Face tokenizer,
prompt and chat encoding, incremental decoding, end-of-sequence tokens."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tidegate.errors import InvalidRequest
from tidegate.generation.detok import TokenDecoder

__all__ = ["LMText", "default_chat_prompt", "eos_token_ids"]


def default_chat_prompt(messages: Sequence[Mapping[str, str]]) -> str:
    """The chat format for tokenizers without a chat template: each message as
    ``{role}: {content}`` on its own line, then ``assistant:`` for the model to continue::

        system: You are terse.
        user: Hi
        assistant:
    """
    lines = [f"{message['role']}: {message['content']}\n" for message in messages]
    return "".join(lines) + "assistant:"


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
    """Prompt encoding for a runtime that sets ``tokenizer`` (a ``transformers`` tokenizer)
    and ``decoder``."""

    tokenizer: Any
    decoder: TokenDecoder

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        """Token ids of a completion prompt, with the model's usual special tokens (BOS)."""
        ids: list[int] = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        return list(ids)

    def chat_prompt(self, messages: Sequence[Mapping[str, str]]) -> str:
        """The prompt text for chat ``messages`` (``role``/``content`` mappings): the
        tokenizer's chat template with the assistant turn opened, else
        :func:`default_chat_prompt`."""
        if self.has_chat_template:
            try:
                text: str = self.tokenizer.apply_chat_template(
                    [dict(m) for m in messages], tokenize=False, add_generation_prompt=True
                )
            except Exception as exc:  # the template refused these messages (e.g. role order)
                raise InvalidRequest(
                    f"The model's chat template rejected the messages: {exc}", param="messages"
                ) from exc
            return text
        return default_chat_prompt(messages)

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Token ids of :meth:`chat_prompt`. A chat template writes its own special tokens,
        so none are added to it; the default format gets the usual ones."""
        text = self.chat_prompt(messages)
        ids: list[int] = self.tokenizer(text, add_special_tokens=not self.has_chat_template)[
            "input_ids"
        ]
        return list(ids)

