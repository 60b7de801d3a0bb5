"""What ``POST /tokenize`` and ``POST /detokenize`` use of a local model's own tokenizer.

Two capabilities, one type each: every local model with a tokenizer (embedding models and
causal LMs) is a :class:`TextTokenizer`; a causal LM, which has a chat format, is also a
:class:`ChatTokenizer`. Echo and python runtimes have neither.

The methods block for as long as the tokenizer works: the API calls them on the event loop for
short inputs and in a thread for long ones, so they must be safe to call from several threads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

__all__ = ["ChatTokenizer", "FileTokenizer", "TextTokenizer"]


@runtime_checkable
class TextTokenizer(Protocol):
    """A model's tokenizer as the model itself uses it, without truncation."""

    @property
    def max_model_len(self) -> int:
        """The longest input the model takes: a causal LM's context length, an embedding
        model's ``max_input_tokens`` (it truncates longer inputs)."""
        ...

    @property
    def max_token_id(self) -> int:
        """The largest id the tokenizer can decode (added tokens included)."""
        ...

    def tokenize(self, text: str, *, add_special_tokens: bool) -> list[int]: ...

    def detokenize(self, token_ids: Sequence[int]) -> str:
        """The text of ``token_ids``, special tokens written out (as the tokenizer's
        ``decode`` does by default). Every id must be within ``max_token_id``."""
        ...

    def token_strs(self, token_ids: Sequence[int]) -> list[str]:
        """Each id's entry in the vocabulary (byte-level tokens as the vocabulary spells
        them, e.g. ``Ġworld``)."""
        ...


class ChatTokenizer(TextTokenizer, Protocol):
    """A tokenizer with a chat format: its chat template, else tidegate's default one."""

    def tokenize_chat(self, messages: Sequence[Mapping[str, str]], *,
                      add_generation_prompt: bool = True,
                      add_special_tokens: bool | None = None) -> list[int]:
        """The ids chat ``messages`` become; with the defaults, exactly those a chat completion
        prompts the model with. ``add_special_tokens=None``: none for a chat template (it
        writes its own), the model's usual ones for the default format."""
        ...


class FileTokenizer:
    """A :class:`TextTokenizer` over a ``tokenizer.json`` (the ``tokenizers`` library), with
    its truncation and padding turned off: what embedding models and cross-encoders report.
    Their own encoding (truncating, pairing) uses another instance."""

    def __init__(self, tokenizer_file: Path, *, max_model_len: int) -> None:
        from tokenizers import Tokenizer

        self._tokenizer: Any = Tokenizer.from_file(str(tokenizer_file))
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.max_model_len = max_model_len
        self.max_token_id: int = max(self._tokenizer.get_vocab(with_added_tokens=True).values())

    def tokenize(self, text: str, *, add_special_tokens: bool) -> list[int]:
        ids: list[int] = self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        return ids

    def detokenize(self, token_ids: Sequence[int]) -> str:
        text: str = self._tokenizer.decode(list(token_ids), skip_special_tokens=False)
        return text

    def token_strs(self, token_ids: Sequence[int]) -> list[str]:
        return [self._tokenizer.id_to_token(i) or "" for i in token_ids]
