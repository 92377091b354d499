"""Prompt templates: the DAPO-Math-17K user prompt, built from and split back into a question.

DAPO-Math-17K wraps every problem in one fixed instruction (the paper's dataset card); the
rule reward reads the last ``Answer:`` line that this instruction asks for.
"""

from __future__ import annotations

DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be "
    "of the form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'


def dapo_prompt(question: str) -> str:
    """The DAPO-Math-17K user prompt for ``question`` (whitespace at its ends trimmed)."""
    return f"{DAPO_PREFIX}{question.strip()}{DAPO_SUFFIX}"


def dapo_question(prompt_text: str) -> str | None:
    """The question inside a DAPO-template prompt, or None when the text is not one."""
    if prompt_text.startswith(DAPO_PREFIX) and prompt_text.endswith(DAPO_SUFFIX):
        return prompt_text[len(DAPO_PREFIX) : len(prompt_text) - len(DAPO_SUFFIX)]
    return None


def user_message(content: str) -> list[dict[str, str]]:
    """A one-turn chat prompt: ``[{"role": "user", "content": content}]``."""
    return [{"role": "user", "content": content}]
