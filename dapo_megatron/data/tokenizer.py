"""Tokenizers behind one small interface: the embedded task's character tokenizer and HF's.

The controller only needs `encode`, `decode`, `eos_id`, `pad_id`, `vocab_size`,
`stop_ids` (every token that ends a response) and `encode_prompt` (a chat prompt or plain
text to the ids the policy is conditioned on).
"""

from __future__ import annotations

import json
import logging
import os
import string
from typing import Any, Protocol, Sequence, Union

logger = logging.getLogger(__name__)

PromptLike = Union[str, Sequence[dict]]


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int
    pad_id: int
    stop_ids: tuple[int, ...]

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
        self.stop_ids = (self.eos_id,)
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
    through the model's chat template with the generation prompt appended.

    Generation stops on every end token of the model (`stop_ids`): the tokenizer's eos,
    the chat template's end-of-turn token (ChatML's `<|im_end|>`, Llama 3's `<|eot_id|>`)
    and every id of `eos_token_id` in generation_config.json (of `path`, or of
    `model_dir`), which is what `transformers`' generate stops on.
    """

    def __init__(self, path: str, model_dir: str | None = None) -> None:
        from transformers import AutoTokenizer

        self.path = path  # a trainer checkpoint carries its files (convert/hf_io.py)
        try:
            self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"data.tokenizer: cannot load a tokenizer from {path!r}: {e}") from None
        if self.tok.eos_token_id is None:
            raise ValueError(f"data.tokenizer: the tokenizer at {path!r} has no eos token")
        self.eos_id = int(self.tok.eos_token_id)
        self.pad_id = int(self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id)
        self.vocab_size = len(self.tok)
        self.stop_ids = self._stop_ids(path, model_dir)
        logger.info("generation stops on token ids %s",
                    ", ".join(f"{i} {self.tok.convert_ids_to_tokens(i)!r}" for i in self.stop_ids))

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def encode_prompt(self, prompt: PromptLike) -> list[int]:
        if isinstance(prompt, str):
            return self.tok.encode(prompt, add_special_tokens=True)
        if getattr(self.tok, "chat_template", None):
            out = self.tok.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
            return token_ids(out)
        return self.tok.encode("\n".join(m["content"] for m in prompt), add_special_tokens=True)

    def end_of_turn_id(self) -> int | None:
        """The token the chat template puts right after an assistant message, if it is a
        special token (it is what a chat model emits when its turn is over)."""
        if not getattr(self.tok, "chat_template", None):
            return None
        marker = "MARKER7c1f"
        try:
            text = self.tok.apply_chat_template(
                [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}],
                tokenize=False)
        except Exception:  # noqa: BLE001 - a template without an assistant role
            return None
        if not isinstance(text, str) or marker not in text:
            return None
        after = self.encode(text.split(marker, 1)[1])
        special = set(self.tok.all_special_ids) | set(getattr(self.tok, "added_tokens_decoder", {}))
        return after[0] if after and after[0] in special else None

    def _stop_ids(self, path: str, model_dir: str | None) -> tuple[int, ...]:
        ids = [self.eos_id]
        turn = self.end_of_turn_id()
        if turn is not None:
            ids.append(turn)
        for d in dict.fromkeys(x for x in (path, model_dir) if x):
            ids.extend(generation_eos_ids(d))
        return tuple(dict.fromkeys(int(i) for i in ids))


def token_ids(out: Any) -> list[int]:
    """The ids of one sequence from `apply_chat_template(..., tokenize=True)`, whatever it
    returns: a list of ids (transformers 4.x), a dict or a `BatchEncoding` (transformers
    5 returns a BatchEncoding, a UserDict and not a dict), possibly batched or a tensor."""
    if hasattr(out, "keys") and "input_ids" in out.keys():
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    out = list(out)
    if len(out) == 1 and isinstance(out[0], (list, tuple)):
        out = list(out[0])
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in out):
        raise TypeError(f"apply_chat_template returned {type(out).__name__} of "
                        f"{sorted({type(i).__name__ for i in out})}, not token ids")
    return out


def generation_eos_ids(model_dir: str) -> list[int]:
    """`eos_token_id` (an int or a list) of `model_dir`'s generation_config.json, else of
    its config.json; [] when neither names one."""
    for name in ("generation_config.json", "config.json"):
        path = os.path.join(model_dir, name)
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as f:
            value = json.load(f).get("eos_token_id")
        if value is None:
            continue
        return [int(v) for v in (value if isinstance(value, list) else [value])]
    return []


def load_tokenizer(path: str, model_dir: str | None = None) -> Tokenizer:
    """`path` empty or "char": the embedded character tokenizer; else an HF tokenizer dir
    (`model_dir`: the model's HF dir, for its generation_config.json's eos ids)."""
    if not path or path == "char":
        return CharTokenizer()
    return HFTokenizer(path, model_dir)
