"""Tokenizers behind one small interface: the embedded task's character tokenizer and HF's.

The controller only needs `encode`, `decode`, `eos_id`, `pad_id`, `vocab_size` and
`encode_prompt` (a chat prompt or plain text to the ids the policy is conditioned on).
"""

from __future__ import annotations

import string
from typing import Protocol, Sequence, Union

PromptLike = Union[str, Sequence[dict]]


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def encode_prompt(self, prompt: PromptLike) -> list[int]: ...


class CharTokenizer:
    """One token per character of a fixed printable alphabet, plus <pad>, <bos>, <eos>.

    The embedded default's tokenizer: nothing to download or train, and every id is
    readable, which makes sampling bugs visible in logs. Characters outside the alphabet
    map to '?', so no input ever fails to encode.
    """

    SPECIALS = ("<pad>", "<bos>", "<eos>")
    ALPHABET = string.digits + string.ascii_letters + " +-*/=()[]{}<>.,;:!?$^_\\'\"\n"

    def __init__(self) -> None:
        self.itos = list(self.SPECIALS) + list(self.ALPHABET)
        self.stoi = {ch: i for i, ch in enumerate(self.itos) if i >= len(self.SPECIALS)}
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.vocab_size = len(self.itos)
        self._unknown = self.stoi["?"]

    def encode(self, text: str) -> list[int]:
        return [self.stoi.get(ch, self._unknown) for ch in text]

    def decode(self, ids: Sequence[int]) -> str:
        specials = len(self.SPECIALS)
        return "".join(self.itos[i] for i in ids if specials <= i < self.vocab_size)

    def encode_prompt(self, prompt: PromptLike) -> list[int]:
        text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
        return [self.bos_id] + self.encode(text)


class HFTokenizer:
    """A `transformers` tokenizer from a local directory (no downloads); chat prompts go
    through the model's chat template with the generation prompt appended."""

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except OSError as e:
            raise ValueError(f"data.tokenizer: cannot load a tokenizer from {path!r}: {e}") from None
        if self.tok.eos_token_id is None:
            raise ValueError(f"data.tokenizer: the tokenizer at {path!r} has no eos token")
        self.eos_id = int(self.tok.eos_token_id)
        self.pad_id = int(self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id)
        self.vocab_size = len(self.tok)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def encode_prompt(self, prompt: PromptLike) -> list[int]:
        if isinstance(prompt, str):
            return self.tok.encode(prompt, add_special_tokens=True)
        if getattr(self.tok, "chat_template", None):
            ids = self.tok.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if isinstance(ids, dict) else ids)
        return self.tok.encode("\n".join(m["content"] for m in prompt), add_special_tokens=True)


def load_tokenizer(path: str) -> Tokenizer:
    """`path` empty or "char": the embedded character tokenizer; else an HF tokenizer dir."""
    if not path or path == "char":
        return CharTokenizer()
    return HFTokenizer(path)
