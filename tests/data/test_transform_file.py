"""transform_file and tools/transform_dataset.py: malformed rows, formats, the summary."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dapo_megatron.data.datasets import load_prompt_dataset
from dapo_megatron.data.transform import TransformOptions, transform_file

REPO = Path(__file__).resolve().parents[2]


def write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"\n".join(lines) + b"\n")


def row(problem, answer) -> bytes:
    return json.dumps({"problem": problem, "answer": answer}).encode()


def test_malformed_jsonl_rows_are_counted_by_line_and_good_rows_survive(tmp_path):
    src = tmp_path / "in.jsonl"
    write_lines(src, [
        row("good 1", r"\frac{4}{6}"),                      # line 1
        json.dumps({"answer": "3"}).encode(),               # line 2: no problem
        json.dumps({"problem": "no answer"}).encode(),      # line 3
        row("null answer", None),                           # line 4
        row("list answer", ["1", "2"]),                     # line 5
        row("bool answer", True),                           # line 6
        row("float answer", 2.5),                           # line 7
        row("good 2, int answer", 42),                      # line 8: kept, coerced
        b'{"problem": "bad bytes \xff\xfe", "answer": "1"}',  # line 9: not UTF-8
        b'{"problem": "broken json", "answer": ',           # line 10
        b"[1, 2, 3]",                                       # line 11: not an object
        b"",                                                # line 12: blank, not a row
        b'{"problem": "lone surrogate", "answer": "\\udc80"}',  # line 13
        row("empty answer", "  "),                          # line 14
        row("good 3, float integral", 7.0),                 # line 15: kept, coerced
        row("good 4", r"11-2\sqrt{6}"),                     # line 16
        row(123, "5"),                                      # line 17: problem not a string
    ])
    out = tmp_path / "out.jsonl"
    summary = transform_file(src, out, TransformOptions())
    rows = [json.loads(l) for l in out.read_text(encoding="utf-8").splitlines()]
    assert [r["extra_info"]["question"].split(" The original")[0] for r in rows] == [
        "good 1", "good 2, int answer", "good 3, float integral", "good 4"]
    assert [r["reward_model"]["ground_truth"] for r in rows] == ["5", "42", "7", "19"]
    assert [r["extra_info"]["index"] for r in rows] == [0, 1, 2, 3]
    found = {(i.row_number, i.reason, i.field) for i in summary.malformed_rows}
    assert found == {
        (2, "missing_field", "problem"), (3, "missing_field", "answer"), (4, "missing_field", "answer"),
        (5, "non_string_field", "answer"), (6, "non_string_field", "answer"),
        (7, "non_string_field", "answer"), (9, "bad_encoding", None), (10, "bad_json", None),
        (11, "not_an_object", None), (13, "bad_encoding", "answer"), (14, "empty_field", "answer"),
        (17, "non_string_field", "problem"),
    }
    assert {(n.row_number, n.reason) for n in summary.notes} == {(8, "coerced_field"), (15, "coerced_field")}
    assert all(i.location == f"in.jsonl line {i.row_number}" for i in summary.malformed_rows)
    assert summary.rows_read == 16
    assert summary.malformed == Counter(missing_field=3, non_string_field=4, bad_encoding=2, bad_json=1,
                                        not_an_object=1, empty_field=1)
    assert summary.rows_read == (summary.kept_unchanged + sum(summary.transformed.values())
                                 + sum(summary.dropped.values()) + sum(summary.malformed.values()))
    text = summary.format()
    assert "rows read:        16" in text and "in.jsonl line 9: bad_encoding" in text


def test_parquet_in_nested_and_flattened_keys_parquet_out(tmp_path):
    nested = pa.table({
        "extra_info": [{"question": "Find sin 60."}, {"question": "Find x."}, {"question": "Find y."}],
        "reward_model": [{"ground_truth": r"\frac{\sqrt{3}}{2}"}, {"ground_truth": None},
                         {"ground_truth": "[1, 2]"}],
        "data_source": ["src_a", "src_b", "src_c"],
    })
    pq.write_table(nested, tmp_path / "nested.parquet")
    options = TransformOptions(problem_key="extra_info.question", answer_key="reward_model.ground_truth")
    summary = transform_file(tmp_path / "nested.parquet", tmp_path / "out.parquet", options)
    out = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert len(out) == 1 and out[0]["reward_model"]["ground_truth"] == "5"
    assert out[0]["data_source"] == "src_a"
    assert [(i.location, i.reason) for i in summary.malformed_rows] == [("nested.parquet row 2", "missing_field")]
    assert summary.dropped == Counter(interval=1)

    flat = pa.table({"question": ["Q1", "Q2"], "reward_model.ground_truth": ["3/8", "12"]})
    pq.write_table(flat, tmp_path / "flat.parquet")
    options = TransformOptions(problem_key="question", answer_key="reward_model.ground_truth")
    summary = transform_file(tmp_path / "flat.parquet", tmp_path / "flat_out.jsonl", options)
    assert (summary.transformed, summary.kept_unchanged) == (Counter(fraction=1), 1)

    # A binary column with bytes that are not UTF-8: that row only.
    binary = pa.table({"problem": ["P1", "P2"], "answer": pa.array([b"7", b"\xff"], pa.binary())})
    pq.write_table(binary, tmp_path / "binary.parquet")
    summary = transform_file(tmp_path / "binary.parquet", tmp_path / "b.jsonl")
    assert summary.kept_unchanged == 1
    assert [(i.row_number, i.reason, i.field) for i in summary.malformed_rows] == [(2, "bad_encoding", "answer")]


def test_output_is_read_by_the_prompt_loader(tmp_path):
    src = tmp_path / "in.jsonl"
    write_lines(src, [row("Find the golden ratio.", r"\frac{1+\sqrt{5}}{2}"), row("Count.", "12")])
    transform_file(src, tmp_path / "train.parquet", TransformOptions(data_source="mine"))
    ds = load_prompt_dataset(tmp_path / "train.parquet")  # the trainer's defaults
    assert [e.ground_truth for e in ds.examples] == ["8", "12"]
    assert [e.data_source for e in ds.examples] == ["mine", "mine"]
    assert ds.examples[0].prompt_text.endswith(
        "Please find the value of k+m+n.\n\nRemember to put your answer on its own line after \"Answer:\".")


def test_all_dropped_still_writes_a_typed_parquet(tmp_path):
    src = tmp_path / "in.jsonl"
    write_lines(src, [row("P", r"\text{yes}")])
    summary = transform_file(src, tmp_path / "out.parquet")
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.num_rows == 0 and "reward_model" in table.column_names
    assert summary.rows_written == 0 and summary.dropped == Counter(text=1)


def test_command_line_tool(tmp_path):
    src = tmp_path / "in.jsonl"
    write_lines(src, [row("Find the smaller root of x^2-22x+97.", r"11-2\sqrt{6}"), b"{oops", row("P", "1, 2")])
    out, report = tmp_path / "out.jsonl", tmp_path / "report.jsonl"
    tool = [sys.executable, str(REPO / "tools" / "transform_dataset.py")]
    done = subprocess.run(tool + [str(src), str(out), "--report", str(report)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "rows read:        3" in done.stdout and "in.jsonl line 2: bad_json" in done.stdout
    assert json.loads(out.read_text())["reward_model"]["ground_truth"] == "19"
    entries = [json.loads(l) for l in report.read_text().splitlines()]
    assert [(e["location"], e["status"], e["reason"]) for e in entries] == [
        ("in.jsonl line 2", "malformed", "bad_json"), ("in.jsonl line 3", "dropped", "non_unique")]
    missing = subprocess.run(tool + [str(tmp_path / "nope.jsonl"), str(out)], capture_output=True,
                             text=True, cwd=tmp_path, timeout=120)
    assert missing.returncode == 2 and "nope.jsonl" in missing.stderr
