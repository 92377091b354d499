"""Rewrite free-form math answers as integer answers, DAPO-Math-17K style (issue 9).

An integer answer passes through. A closed-form answer (fractions, k+m\\sqrt{n},
(a+b\\sqrt{c})/d, a\\sqrt{b}/c, k\\pi, k\\pi/m, sums of these) is canonicalised, its form
stated in the problem ("The original answer is in the form k-m\\sqrt{n}, where k, m, and
n are integers. Please find the value of k+m+n."), and its answer becomes the sum of the
form's parameters. Everything else is dropped and counted by reason. Output rows are in
the DAPO-Math-17K format that `datasets.load_prompt_dataset` reads.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from dapo_megatron.data.answer_forms import AnswerForm, build_form
from dapo_megatron.data.closed_form import ClosedForm, UnsupportedForm, split_square
from dapo_megatron.data.latex_answer import UNSUPPORTED, AnswerRejected, classify_answer
from dapo_megatron.data.rowio import RawRow, RowIssue, get_field, iter_rows, text_field, write_rows
from dapo_megatron.data.templates import dapo_prompt, user_message

logger = logging.getLogger(__name__)

ROUND_TRIP = "round_trip_failure"  # never expected: a bug in the form builder if counted
UNCHANGED, TRANSFORMED, DROPPED = "unchanged", "transformed", "dropped"


@dataclass(frozen=True)
class TransformOptions:
    """Knobs of `transform_file` (and of tools/transform_dataset.py, which reads these defaults)."""

    problem_key: str = "problem"
    answer_key: str = "answer"
    data_source_key: str = "data_source"
    data_source: str = ""  # empty: the row's data_source column, else the input file's stem
    state_conditions: bool = False  # append "Here n is square-free ..." to the form sentence


@dataclass(frozen=True)
class AnswerOutcome:
    """What happens to one answer.

    status: unchanged | transformed | dropped. kind: "integer" (an integer written another
    way, e.g. \\frac{8}{2}) or a form kind, for transformed answers. reason: the drop reason.
    """

    status: str
    ground_truth: str | None = None
    kind: str | None = None
    form: AnswerForm | None = None
    reason: str | None = None
    detail: str = ""


def transform_answer(answer: str) -> AnswerOutcome:
    """Classify and rewrite one answer string."""
    s = answer.strip()
    if re.fullmatch(r"[+-]?\d+", s):
        return AnswerOutcome(UNCHANGED, str(int(s)))
    try:
        value = classify_answer(s)
    except AnswerRejected as e:
        return AnswerOutcome(DROPPED, reason=e.reason, detail=e.detail)
    if value.is_integer():
        return AnswerOutcome(TRANSFORMED, str(int(value.as_fraction())), kind="integer")
    try:
        form = build_form(value)
    except UnsupportedForm as e:
        return AnswerOutcome(DROPPED, reason=UNSUPPORTED, detail=str(e))
    problem = round_trip_problem(form, value)
    if problem:
        return AnswerOutcome(DROPPED, reason=ROUND_TRIP, detail=problem)
    return AnswerOutcome(TRANSFORMED, str(form.integer), kind=form.kind, form=form)


def round_trip_problem(form: AnswerForm, value: ClosedForm) -> str | None:
    """Why ``form`` does not faithfully encode ``value``, or None when it does.

    The parameters are recovered from the instantiated LaTeX by matching the template
    (not taken from the builder), must be canonical (positive, square-free radicands,
    denominators above 1, the form rebuilt from its own LaTeX), must rebuild the same
    value, and must sum to the new answer.
    """
    latex = form.instantiate()
    # A name is a letter standing alone: not part of a command such as \sqrt or \pi.
    name_re = r"(?<![A-Za-z\\])(" + "|".join(form.names) + r")(?![A-Za-z])"
    pattern = "".join(
        "([0-9]+)" if piece in form.names else re.escape(piece)
        for piece in re.split(name_re, form.template) if piece
    )
    match = re.fullmatch(pattern, latex)
    if match is None:
        return f"{latex!r} does not match its template {form.template!r}"
    recovered = [int(g) for g in match.groups()]
    params = dict(zip(form.names, recovered))
    if any(v <= 0 for v in recovered):
        return f"non-positive parameter in {params}"
    for name in form.radicands:
        if params[name] < 2 or split_square(params[name])[0] != 1:
            return f"radicand {name}={params[name]} is not square-free"
    for name in form.denominators:
        if params[name] < 2:
            return f"denominator {name}={params[name]} below 2"
    try:
        read_back = classify_answer(latex)
    except AnswerRejected as e:
        return f"{latex!r} does not read back: {e}"
    if read_back != value:
        return f"{latex!r} reads back as another value"
    if build_form(read_back) != form:  # canonical means a fixed point (lowest terms too)
        return f"{latex!r} is not in canonical form"
    if sum(recovered) != form.integer:
        return f"parameters sum to {sum(recovered)}, not {form.integer}"
    return None


def transform_problem(problem: str, outcome: AnswerOutcome, state_conditions: bool = False) -> str:
    """The problem text with the form sentence appended (unchanged when there is no form)."""
    if outcome.form is None:
        return problem.strip()
    return f"{problem.strip()} {outcome.form.sentence(state_conditions)}"


@dataclass
class TransformSummary:
    """Counts over one input file; every row read lands in exactly one bucket.

    rows_read = kept_unchanged + sum(transformed) + sum(dropped) + sum(malformed).
    """

    rows_read: int = 0
    kept_unchanged: int = 0
    transformed: Counter = field(default_factory=Counter)  # by kind
    dropped: Counter = field(default_factory=Counter)  # by reason
    malformed: Counter = field(default_factory=Counter)  # by reason
    malformed_rows: list[RowIssue] = field(default_factory=list)
    notes: list[RowIssue] = field(default_factory=list)  # kept rows with a coerced field

    @property
    def rows_written(self) -> int:
        return self.kept_unchanged + sum(self.transformed.values())

    def format(self, max_listed: int = 20) -> str:
        lines = [
            f"rows read:        {self.rows_read}",
            f"rows written:     {self.rows_written}",
            f"kept unchanged:   {self.kept_unchanged}",
            f"transformed:      {sum(self.transformed.values())}",
        ]
        lines += [f"  {kind:<16}{n}" for kind, n in sorted(self.transformed.items())]
        lines.append(f"dropped:          {sum(self.dropped.values())}")
        lines += [f"  {reason:<16}{n}" for reason, n in sorted(self.dropped.items())]
        lines.append(f"malformed:        {sum(self.malformed.values())}")
        lines += [f"  {reason:<16}{n}" for reason, n in sorted(self.malformed.items())]
        for issue in (self.malformed_rows + self.notes)[:max_listed]:
            lines.append(f"  {'kept, ' if not issue.fatal else ''}{issue}")
        hidden = len(self.malformed_rows) + len(self.notes) - max_listed
        if hidden > 0:
            lines.append(f"  ... and {hidden} more (see the report file)")
        return "\n".join(lines)


# Fixed column types keep parquet output readable even with zero rows.
def output_schema():
    import pyarrow as pa

    return pa.schema([
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
        ("extra_info", pa.struct([
            ("index", pa.int64()), ("question", pa.string()), ("original_answer", pa.string()),
            ("form", pa.string()), ("form_parameters", pa.string()), ("transform", pa.string()),
            ("source", pa.string()),
        ])),
    ])


def output_row(index: int, problem: str, answer: str, outcome: AnswerOutcome, data_source: str,
               location: str, state_conditions: bool = False) -> dict:
    """One DAPO-Math-17K row: DAPO-template chat prompt, integer ground truth, provenance."""
    question = transform_problem(problem, outcome, state_conditions)
    form = outcome.form
    return {
        "data_source": data_source,
        "prompt": user_message(dapo_prompt(question)),
        "ability": "MATH",
        "reward_model": {"ground_truth": outcome.ground_truth, "style": "rule"},
        "extra_info": {
            "index": index,
            "question": question,
            "original_answer": answer,
            "form": form.template if form else "",
            "form_parameters": ",".join(f"{k}={v}" for k, v in form.parameters().items()) if form else "",
            "transform": outcome.kind or outcome.status,
            "source": location,
        },
    }


def transform_rows(path: str | os.PathLike, options: TransformOptions, summary: TransformSummary,
                   report: list[dict] | None = None) -> Iterator[dict]:
    """Output rows for the good rows of ``path``, in order, filling ``summary`` as it goes.

    ``report`` (if given) receives one dict per dropped, malformed or coerced row.
    """
    default_source = options.data_source or Path(path).stem
    for item in iter_rows(path):
        summary.rows_read += 1
        if isinstance(item, RowIssue):
            _malformed(summary, report, [item])
            continue
        problem, problem_issue = text_field(item, options.problem_key)
        answer, answer_issue = text_field(item, options.answer_key, coerce_numbers=True)
        issues = [i for i in (problem_issue, answer_issue) if i is not None]
        if problem is None or answer is None:
            _malformed(summary, report, issues)
            continue
        for note in issues:  # non-fatal: a number read as text
            summary.notes.append(note)
            if report is not None:
                report.append(_report_entry("note", note.location, note.reason, note.field, note.detail, answer))
        outcome = transform_answer(answer)
        if outcome.status == DROPPED:
            summary.dropped[outcome.reason] += 1
            if report is not None:
                report.append(_report_entry("dropped", item.location, outcome.reason, options.answer_key,
                                            outcome.detail, answer))
            continue
        if outcome.status == UNCHANGED:
            summary.kept_unchanged += 1
        else:
            summary.transformed[outcome.kind] += 1
        source = options.data_source or _row_source(item, options.data_source_key) or default_source
        yield output_row(summary.rows_written - 1, problem, answer, outcome, source, item.location,
                         options.state_conditions)


def _row_source(row: RawRow, key: str) -> str:
    value = get_field(row.data, key)
    return value if isinstance(value, str) else ""


def _malformed(summary: TransformSummary, report: list | None, issues: list[RowIssue]) -> None:
    fatal = [i for i in issues if i.fatal]
    first = fatal[0]
    summary.malformed[first.reason] += 1  # one count per row, by its first fatal issue
    summary.malformed_rows.extend(fatal)
    if report is not None:
        for issue in fatal:
            report.append(_report_entry("malformed", issue.location, issue.reason, issue.field, issue.detail, None))


def _report_entry(status, location, reason, field_name, detail, answer) -> dict:
    return {"status": status, "location": location, "reason": reason, "field": field_name,
            "detail": detail, "answer": answer}


def transform_file(in_path: str | os.PathLike, out_path: str | os.PathLike,
                   options: TransformOptions = TransformOptions(),
                   report_path: str | os.PathLike | None = None) -> TransformSummary:
    """Transform ``in_path`` into ``out_path`` (jsonl or parquet each, by suffix).

    ``report_path`` (jsonl) lists every dropped, malformed and coerced row with its line.
    """
    summary = TransformSummary()
    report: list[dict] = []
    rows = transform_rows(in_path, options, summary, report)
    write_rows(out_path, rows, parquet_schema=output_schema())
    if report_path is not None:
        with open(report_path, "w", encoding="utf-8") as f:
            for entry in report:
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")
    logger.info("transformed %s -> %s: %d of %d rows written", in_path, out_path,
                summary.rows_written, summary.rows_read)
    return summary
