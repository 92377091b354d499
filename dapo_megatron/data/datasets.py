"""Prompt datasets: DAPO-Math-17K, AIME-style and plain {problem, answer} rows.

Readable inputs (jsonl or parquet, see `rowio`):
- DAPO-Math-17K: ``prompt`` (a chat list of {role, content}), ``reward_model.ground_truth``
  (a nested struct or one flattened dotted column), ``data_source``, ``extra_info``;
- AIME 2024 as shipped here: ``question``, ``reward_model.ground_truth``, a ``prompt`` that
  uses a \\boxed{} instruction (re-templated by the default ``template="dapo"``), ``id``...;
- plain rows ``{"problem": ..., "answer": ...}``.

``template="dapo"`` builds the prompt from the question with the DAPO template (rows with
no question column keep a prompt that already is in the DAPO template); ``"as-is"`` uses
the ``prompt`` column as given (or the bare question as one user message).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from dapo_megatron.data.rowio import MISSING, RawRow, RowIssue, get_field, iter_rows, text_field
from dapo_megatron.data.templates import dapo_prompt, dapo_question, user_message

logger = logging.getLogger(__name__)

TEMPLATES = ("dapo", "as-is")


@dataclass
class PromptExample:
    """One training or evaluation prompt with its reference answer.

    messages: the chat prompt, ``[{"role": ..., "content": ...}, ...]``.
    ground_truth: the reference answer as text (an integer string for DAPO-Math-17K).
    index: position in the loaded dataset (0-based), stable across runs of the same file.
    metadata: the row's other columns (``extra_info``, ``id``...) plus ``location``.
    """

    messages: list[dict[str, str]]
    ground_truth: str
    data_source: str = ""
    index: int = 0
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def prompt_text(self) -> str:
        """The content of the last user message (the whole prompt for one-turn chats)."""
        for message in reversed(self.messages):
            if message["role"] == "user":
                return message["content"]
        return self.messages[-1]["content"]


@dataclass(frozen=True)
class PromptFields:
    """Column names; dotted names reach into structs (``reward_model.ground_truth``).

    When a configured key is absent from a row, the fallbacks are tried in order, so that
    plain {problem, answer} rows load with the defaults.
    """

    prompt_key: str = "prompt"
    question_key: str = "question"
    answer_key: str = "reward_model.ground_truth"
    data_source_key: str = "data_source"
    question_fallbacks: tuple[str, ...] = ("problem",)
    answer_fallbacks: tuple[str, ...] = ("answer",)


@dataclass
class PromptDataset:
    """The good examples of one file and the issues of its bad rows."""

    path: str
    examples: list[PromptExample]
    issues: list[RowIssue]

    @property
    def num_bad_rows(self) -> int:
        return sum(1 for issue in self.issues if issue.fatal)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> PromptExample:
        return self.examples[i]


def load_prompt_dataset(
    path: str | os.PathLike, fields: PromptFields = PromptFields(), template: str = "dapo"
) -> PromptDataset:
    """Read every good row of ``path`` as a `PromptExample`; bad rows become issues.

    Raises ValueError for an unknown template, or when the file holds no good row at all
    (the message shows the first issues, which usually name a wrong column key).
    """
    if template not in TEMPLATES:
        raise ValueError(f"data.template must be one of {TEMPLATES}, got {template!r}")
    examples: list[PromptExample] = []
    issues: list[RowIssue] = []
    for item in iter_rows(path):
        if isinstance(item, RowIssue):
            issues.append(item)
            continue
        example, row_issues = _example_from_row(item, fields, template, len(examples), Path(path).stem)
        issues.extend(row_issues)
        if example is not None:
            examples.append(example)
    dataset = PromptDataset(str(path), examples, issues)
    if dataset.num_bad_rows:
        shown = "; ".join(str(i) for i in issues if i.fatal)[:1000]
        logger.warning("%s: skipped %d bad rows: %s", path, dataset.num_bad_rows, shown)
    if not examples:
        raise ValueError(
            f"{path}: no usable rows (checked keys prompt={fields.prompt_key!r}, "
            f"question={fields.question_key!r}, answer={fields.answer_key!r}); first issues: "
            + "; ".join(str(i) for i in issues[:5])
        )
    logger.info("%s: loaded %d prompts (%d bad rows)", path, len(examples), dataset.num_bad_rows)
    return dataset


def _first_present(data: dict, keys: Sequence[str]) -> str:
    for key in keys:
        if get_field(data, key) is not MISSING:
            return key
    return keys[0]


def _example_from_row(
    row: RawRow, fields: PromptFields, template: str, index: int, default_source: str
) -> tuple[PromptExample | None, list[RowIssue]]:
    issues: list[RowIssue] = []
    answer_key = _first_present(row.data, (fields.answer_key, *fields.answer_fallbacks))
    answer, issue = text_field(row, answer_key, coerce_numbers=True)
    if issue:
        issues.append(issue)
    messages, prompt_issue = _messages(row, fields, template)
    if prompt_issue:
        issues.append(prompt_issue)
    if answer is None or messages is None:
        return None, issues
    source = get_field(row.data, fields.data_source_key)
    metadata = {k: v for k, v in row.data.items() if k != fields.prompt_key}
    metadata["location"] = row.location
    example = PromptExample(
        messages=messages,
        ground_truth=answer.strip(),
        data_source=source if isinstance(source, str) and source else default_source,
        index=index,
        metadata=metadata,
    )
    return example, issues


def _messages(row: RawRow, fields: PromptFields, template: str) -> tuple[list | None, RowIssue | None]:
    question_key = _first_present(row.data, (fields.question_key, *fields.question_fallbacks))
    has_question = get_field(row.data, question_key) is not MISSING
    has_prompt = get_field(row.data, fields.prompt_key) is not MISSING
    if has_question and (template == "dapo" or not has_prompt):
        question, issue = text_field(row, question_key)
        if question is None:
            return None, issue
        return user_message(dapo_prompt(question) if template == "dapo" else question), None
    messages, issue = _chat_field(row, fields.prompt_key)
    if messages is None or template == "as-is":
        return messages, issue
    # template "dapo" without a question column: only a prompt already in the DAPO
    # template is usable; any other instruction cannot be split from its question.
    last_user = [m for m in messages if m["role"] == "user"]
    if last_user and dapo_question(last_user[-1]["content"]) is not None:
        return messages, None
    return None, RowIssue(
        row.location, row.row_number, "missing_field", fields.question_key,
        "no question column, and the prompt is not in the DAPO template (use data.template=as-is "
        "or set data.question_key)",
    )


def _chat_field(row: RawRow, key: str) -> tuple[list | None, RowIssue | None]:
    """A chat prompt: a list of {role, content} string dicts, or one string (a user turn)."""
    value = get_field(row.data, key)
    if isinstance(value, str):
        text, issue = text_field(row, key)
        return (user_message(text) if text is not None else None), issue

    def bad(detail: str) -> tuple[None, RowIssue]:
        reason = "missing_field" if value is MISSING or value is None else "non_string_field"
        return None, RowIssue(row.location, row.row_number, reason, key, detail)

    if value is MISSING or value is None:
        return bad("absent" if value is MISSING else "null")
    if not isinstance(value, (list, tuple)) or not value:
        return bad("not a non-empty list of {role, content} messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            return bad(f"message {i} is a {type(message).__name__}, not a {{role, content}} object")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not isinstance(content, str) or not content.strip():
            return bad(f"message {i} needs string 'role' and non-empty string 'content'")
        try:
            content.encode("utf-8")
        except UnicodeEncodeError:
            return None, RowIssue(row.location, row.row_number, "bad_encoding", key, f"message {i} content")
        messages.append({"role": role, "content": content})
    return messages, None


def drop_long_prompts(
    examples: Sequence[PromptExample], count_tokens: Callable[[PromptExample], int], max_length: int
) -> tuple[list[PromptExample], int]:
    """Keep the examples whose prompt is at most ``max_length`` tokens (data.max_prompt_length).

    ``count_tokens`` is the tokenizer's measure of a prompt with its chat template.
    Returns (kept examples, number dropped); a drop is logged, never silent.
    """
    kept = [e for e in examples if count_tokens(e) <= max_length]
    dropped = len(examples) - len(kept)
    if dropped:
        logger.warning("dropped %d of %d prompts longer than %d tokens", dropped, len(examples), max_length)
    return kept, dropped
