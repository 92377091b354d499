"""Find the final answer in a model response.

The rule, in order:

1. DAPO convention: the prompt template asks for a last line ``Answer: $Answer``, so the
   last occurrence of ``Answer:`` (case-insensitive, optionally in markdown bold,
   ``**Answer:**``) wins; the answer is the rest of that line. If that text holds a
   ``\\boxed{...}``, the box's content is taken.
2. Otherwise (or when a complete box comes after that line: the box is then the later,
   final statement) the content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``),
   with nested braces matched, or ``\\boxed 5`` without braces.
3. Otherwise there is no answer (``None``).

Only the last ``max_scan_chars`` characters of a response are scanned: the answer is at
the end by the template's contract, and a bounded scan keeps a pathological megabyte
response as cheap as a normal one. Text is scanned with ``str.rfind`` and a brace
counter, never with backtracking regular expressions.
"""

from __future__ import annotations

import re

# DAPO responses are at most ~20k tokens; the answer line sits in the last few hundred
# characters, so 16 KiB leaves generous slack for a long boxed expression.
DEFAULT_MAX_SCAN_CHARS = 16384

_SURROGATES = re.compile("[\ud800-\udfff]")
_ANSWER_PREFIX = re.compile(r"^[\s*:]*")  # markdown bold and stray colons


def sanitize_text(text: object) -> str:
    """Coerce a response to a clean ``str``.

    Bytes are decoded as UTF-8 with replacement; lone surrogates (which cannot be encoded
    and break some libraries) become U+FFFD, which no later stage accepts as maths.
    """
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8", errors="replace")
    elif not isinstance(text, str):
        text = "" if text is None else str(text)
    return _SURROGATES.sub("\ufffd", text)


def _last_answer_line(text: str) -> tuple[int, str] | None:
    """(position, text after the last ``Answer:`` marker up to the end of its line)."""
    lowered = text.lower()
    pos = lowered.rfind("answer")
    while pos != -1:
        after = pos + len("answer")
        # "answer" must be a word start ("final answer:" ok, "reanswer:" not).
        word_start = pos == 0 or not lowered[pos - 1].isalpha()
        j = after
        while j < len(text) and text[j] in " \t*_":
            j += 1
        if word_start and j < len(text) and text[j] == ":":
            end = text.find("\n", j)
            line = text[j + 1 :] if end == -1 else text[j + 1 : end]
            line = _ANSWER_PREFIX.sub("", line).strip()
            if line:
                return pos, line
            # An empty "Answer:" line: the answer may be on the next line.
            if end != -1:
                nxt = text.find("\n", end + 1)
                line = text[end + 1 :] if nxt == -1 else text[end + 1 : nxt]
                line = line.strip()
                if line:
                    return pos, line
        pos = lowered.rfind("answer", 0, pos)
    return None


def _braced_content(text: str, open_pos: int) -> str | None:
    """Content of the brace group opening at ``text[open_pos] == '{'``, or None if open."""
    depth = 0
    for k in range(open_pos, len(text)):
        c = text[k]
        if c == "\\":  # an escaped brace \{ does not change the depth
            continue
        if c == "{" and (k == 0 or text[k - 1] != "\\"):
            depth += 1
        elif c == "}" and (k == 0 or text[k - 1] != "\\"):
            depth -= 1
            if depth == 0:
                return text[open_pos + 1 : k]
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}``/``\\fbox{...}`` in ``text``."""
    found = _last_boxed_at(text)
    return None if found is None else found[1]


def _last_boxed_at(text: str) -> tuple[int, str] | None:
    candidates = []
    for marker in ("\\boxed", "\\fbox"):
        pos = text.rfind(marker)
        while pos != -1:
            candidates.append((pos, marker))
            if len(candidates) > 64:  # bound the work on a response full of boxes
                break
            pos = text.rfind(marker, 0, pos)
    for pos, marker in sorted(candidates, reverse=True):
        k = pos + len(marker)
        while k < len(text) and text[k] == " ":
            k += 1
        if k < len(text) and text[k] == "{":
            content = _braced_content(text, k)
            if content is not None:
                return pos, content.strip()
        elif k > pos + len(marker) and k < len(text):
            # "\boxed 5": LaTeX takes the next token.
            end = k
            while end < len(text) and not text[end].isspace() and text[end] not in "$.,":
                end += 1
            if end > k:
                return pos, text[k:end]
    return None


def extract_answer(response: object, max_scan_chars: int = DEFAULT_MAX_SCAN_CHARS) -> str | None:
    """The final answer of ``response`` by the module's rule, or None if there is none.

    Args:
        response: the generated text (``str``; bytes are decoded leniently).
        max_scan_chars: only this many trailing characters are examined.
    Returns:
        The raw answer text (not yet normalised), or None.
    """
    text = sanitize_text(response)
    if len(text) > max_scan_chars:
        text = text[-max_scan_chars:]
    line = _last_answer_line(text)
    boxed = _last_boxed_at(text)
    if line is not None and (boxed is None or boxed[0] < line[0]):
        inner = last_boxed(line[1])
        return inner if inner else line[1]
    return None if boxed is None else boxed[1]
