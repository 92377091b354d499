"""Prompt datasets: DAPO-Math-17K, AIME-style and plain rows from jsonl and parquet."""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dapo_megatron.data.datasets import PromptFields, drop_long_prompts, load_prompt_dataset
from dapo_megatron.data.templates import dapo_prompt, dapo_question

BOXED = "\n\nPlease reason step by step, and put your final answer within \\boxed{}."


def test_dapo_prompt_is_the_dapo_math_17k_template():
    assert dapo_prompt("What is 1+1?") == (
        "Solve the following math problem step by step. The last line of your response should be "
        "of the form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
        "What is 1+1?\n\nRemember to put your answer on its own line after \"Answer:\"."
    )
    assert dapo_question(dapo_prompt("  What is 1+1? ")) == "What is 1+1?"
    assert dapo_question("What is 1+1?" + BOXED) is None


def dapo_rows():
    return [
        {"data_source": "math_dapo", "prompt": [{"content": dapo_prompt(f"Problem {i}"), "role": "user"}],
         "ability": "MATH", "reward_model": {"ground_truth": str(10 + i), "style": "rule-lighteval/MATH_v2"},
         "extra_info": {"index": f"id-{i}"}}
        for i in range(3)
    ]


def test_dapo_math_17k_parquet_nested(tmp_path):
    pq.write_table(pa.Table.from_pylist(dapo_rows()), tmp_path / "dapo.parquet")
    ds = load_prompt_dataset(tmp_path / "dapo.parquet")
    assert [e.ground_truth for e in ds] == ["10", "11", "12"]
    assert ds[1].messages == [{"role": "user", "content": dapo_prompt("Problem 1")}]
    assert ds[1].prompt_text == dapo_prompt("Problem 1")
    assert (ds[2].data_source, ds[2].index, ds[2].metadata["extra_info"]) == ("math_dapo", 2, {"index": "id-2"})
    assert ds[0].metadata["location"] == "dapo.parquet row 1"
    assert ds.issues == []


def test_dapo_math_17k_jsonl_flattened_column(tmp_path):
    path = tmp_path / "dapo.jsonl"
    with open(path, "w") as f:
        for r in dapo_rows():
            r["reward_model.ground_truth"] = r.pop("reward_model")["ground_truth"]
            f.write(json.dumps(r) + "\n")
    ds = load_prompt_dataset(path, template="as-is")
    assert [e.ground_truth for e in ds] == ["10", "11", "12"]
    assert ds[0].prompt_text == dapo_prompt("Problem 0")


def aime_table():
    # The layout of /work/shared/data/aime-2024.parquet: reward_model and extra_info structs.
    questions = ["Find the number of minutes.", "Find m+n."]
    return pa.Table.from_pylist([
        {"id": 60 + i, "question": q, "data_source": "aime24",
         "prompt": [{"content": q + BOXED, "role": "user"}],
         "reward_model": {"ground_truth": gt, "style": "rule"},
         "extra_info": {"index": i, "question": q, "split": "val"}}
        for i, (q, gt) in enumerate(zip(questions, ["204", "33"]))
    ])


def test_aime_parquet_retemplated_or_as_given(tmp_path):
    pq.write_table(aime_table(), tmp_path / "aime.parquet")
    ds = load_prompt_dataset(tmp_path / "aime.parquet", template="dapo")
    assert ds[0].messages == [{"role": "user", "content": dapo_prompt("Find the number of minutes.")}]
    assert [e.ground_truth for e in ds] == ["204", "33"]
    assert (ds[1].data_source, ds[1].metadata["id"]) == ("aime24", 61)
    as_is = load_prompt_dataset(tmp_path / "aime.parquet", template="as-is")
    assert as_is[0].prompt_text == "Find the number of minutes." + BOXED


def test_plain_problem_answer_rows(tmp_path):
    path = tmp_path / "plain.jsonl"
    path.write_text(json.dumps({"problem": "Add 2 and 3.", "answer": "5"}) + "\n"
                    + json.dumps({"problem": "Halve 9.", "answer": "\\frac{9}{2}"}) + "\n")
    ds = load_prompt_dataset(path)
    assert ds[0].messages == [{"role": "user", "content": dapo_prompt("Add 2 and 3.")}]
    assert [e.ground_truth for e in ds] == ["5", "\\frac{9}{2}"]
    assert ds[0].data_source == "plain"  # the file name when the rows name no source
    as_is = load_prompt_dataset(path, template="as-is")
    assert as_is[1].messages == [{"role": "user", "content": "Halve 9."}]


def test_configurable_field_names(tmp_path):
    path = tmp_path / "custom.jsonl"
    path.write_text(json.dumps({"chat": [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "2+2?"}],
                                "meta": {"gold": "4"}, "origin": "mine"}) + "\n")
    fields = PromptFields(prompt_key="chat", answer_key="meta.gold", data_source_key="origin")
    ds = load_prompt_dataset(path, fields, template="as-is")
    assert (ds[0].prompt_text, ds[0].ground_truth, ds[0].data_source) == ("2+2?", "4", "mine")
    assert len(ds[0].messages) == 2


def test_bad_rows_are_reported_by_line_and_good_rows_kept(tmp_path, caplog):
    path = tmp_path / "mixed.jsonl"
    good = dapo_rows()
    lines = [
        json.dumps(good[0]),                                                   # 1 good
        "{not json",                                                           # 2
        json.dumps({"prompt": good[1]["prompt"]}),                             # 3 no answer
        json.dumps({**good[1], "prompt": "just a string prompt"}),             # 4 not DAPO template
        json.dumps({**good[1], "prompt": [{"role": "user"}]}),                 # 5 no content
        json.dumps({**good[2], "reward_model": {"ground_truth": 12}}),         # 6 good, coerced
    ]
    path.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\n")          # 7 bad bytes
    with caplog.at_level(logging.WARNING):
        ds = load_prompt_dataset(path)
    assert [e.ground_truth for e in ds] == ["10", "12"]
    assert [e.index for e in ds] == [0, 1]
    fatal = [(i.row_number, i.reason, i.field) for i in ds.issues if i.fatal]
    assert fatal == [(2, "bad_json", None), (3, "missing_field", "reward_model.ground_truth"),
                     (4, "missing_field", "question"), (5, "non_string_field", "prompt"),
                     (7, "bad_encoding", None)]
    assert [(i.row_number, i.reason) for i in ds.issues if not i.fatal] == [(6, "coerced_field")]
    assert ds.num_bad_rows == 5
    assert "skipped 5 bad rows" in caplog.text and "mixed.jsonl line 2" in caplog.text
    # The same file read as given keeps the plain-string prompt of line 4.
    assert len(load_prompt_dataset(path, template="as-is")) == 3


def test_no_usable_rows_and_bad_template_raise(tmp_path):
    path = tmp_path / "wrong.jsonl"
    path.write_text(json.dumps({"question": "Q", "solution": "5"}) + "\n")
    with pytest.raises(ValueError, match="no usable rows.*answer='reward_model.ground_truth'"):
        load_prompt_dataset(path)
    assert load_prompt_dataset(path, PromptFields(answer_key="solution"))[0].ground_truth == "5"
    with pytest.raises(ValueError, match="data.template"):
        load_prompt_dataset(path, template="boxed")
    with pytest.raises(ValueError, match="unknown data file type"):
        load_prompt_dataset(tmp_path / "data.csv")


def test_drop_long_prompts(tmp_path):
    path = tmp_path / "plain.jsonl"
    path.write_text("".join(json.dumps({"problem": "w " * n, "answer": "1"}) + "\n" for n in (1, 50, 3)))
    ds = load_prompt_dataset(path, template="as-is")
    kept, dropped = drop_long_prompts(ds.examples, lambda e: len(e.prompt_text.split()), 10)
    assert [e.index for e in kept] == [0, 2] and dropped == 1
