"""Row-level reading and writing of jsonl and parquet files that never loses a good row.

A bad row (undecodable bytes, broken JSON, a missing or non-string field) becomes a
`RowIssue` naming its file, line (jsonl) or row (parquet, both 1-based) and field, so the
callers can count and report it and carry on with the rest of the file.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Union

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()  # returned by `get_field` for an absent key, distinct from None


@dataclass(frozen=True)
class RowIssue:
    """One problem with one input row.

    reason: bad_encoding | bad_json | not_an_object | missing_field | empty_field |
        non_string_field | coerced_field (the last one is a note: the row is kept).
    """

    location: str  # "train.jsonl line 7" or "train.parquet row 3"
    row_number: int
    reason: str
    field: str | None = None
    detail: str = ""
    fatal: bool = True  # False: the row was kept (a coerced value), only reported

    def __str__(self) -> str:
        where = f"{self.location}, field {self.field!r}" if self.field else self.location
        return f"{where}: {self.reason}" + (f" ({self.detail})" if self.detail else "")


@dataclass(frozen=True)
class RawRow:
    """One decoded input row: a dict of columns (nested structs stay nested dicts)."""

    location: str
    row_number: int
    data: dict


def file_format(path: str | os.PathLike) -> str:
    """'jsonl' or 'parquet' from the file name; a ValueError names any other suffix."""
    suffix = Path(path).suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    raise ValueError(
        f"{path}: unknown data file type {suffix!r}; use one of "
        f"{', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)}"
    )


def iter_rows(path: str | os.PathLike) -> Iterator[Union[RawRow, RowIssue]]:
    """Every row of a jsonl or parquet file in order, or a `RowIssue` in place of a bad one.

    Blank jsonl lines are not rows and are skipped. A file that cannot be opened at all
    raises (OSError, or pyarrow's error for a corrupt parquet file): that is no row's fault.
    """
    if file_format(path) == "jsonl":
        yield from _iter_jsonl(Path(path))
    else:
        yield from _iter_parquet(Path(path))


def _iter_jsonl(path: Path) -> Iterator[Union[RawRow, RowIssue]]:
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            location = f"{path.name} line {line_number}"
            if line_number == 1 and raw.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte-order mark
                raw = raw[3:]
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield RowIssue(location, line_number, "bad_encoding", None, f"not UTF-8: {e.reason} at byte {e.start}")
                continue
            try:
                data = json.loads(text)
            except (json.JSONDecodeError, RecursionError) as e:
                yield RowIssue(location, line_number, "bad_json", None, str(e)[:200])
                continue
            if not isinstance(data, dict):
                yield RowIssue(location, line_number, "not_an_object", None, f"a JSON {type(data).__name__}, not an object")
                continue
            yield RawRow(location, line_number, data)


def _iter_parquet(path: Path) -> Iterator[Union[RawRow, RowIssue]]:
    import pyarrow.parquet as pq

    row_number = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for data in batch.to_pylist():
            row_number += 1
            yield RawRow(f"{path.name} row {row_number}", row_number, data)


def get_field(data: dict, key: str) -> Any:
    """``data[key]``, else the nested path ``key.split('.')``, else `MISSING`.

    The exact key is tried first so that flattened columns (``"reward_model.ground_truth"``
    as one column, as pandas.json_normalize writes) and nested structs both resolve.
    """
    if key in data:
        return data[key]
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return MISSING
        node = node[part]
    return node


def text_field(row: RawRow, key: str, coerce_numbers: bool = False) -> tuple[str | None, RowIssue | None]:
    """The field as text, and the issue with it if any.

    With ``coerce_numbers`` (answers), integers and integral floats are accepted as their
    decimal string with a non-fatal ``coerced_field`` note: an answer of ``42`` written as
    a JSON number is a good row.
    Bytes are decoded as UTF-8. Everything else that is not a non-empty, encodable
    string is a fatal issue and the text is None.
    """
    value = get_field(row.data, key)

    def issue(reason: str, detail: str, fatal: bool = True) -> RowIssue:
        return RowIssue(row.location, row.row_number, reason, key, detail, fatal)

    if value is MISSING or value is None:
        return None, issue("missing_field", "absent" if value is MISSING else "null")
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            return None, issue("bad_encoding", f"not UTF-8: {e.reason} at byte {e.start}")
    if isinstance(value, bool):
        return None, issue("non_string_field", f"a boolean ({value})")
    if isinstance(value, (int, float)) and not coerce_numbers:
        return None, issue("non_string_field", f"a number ({value}), not a string")
    if isinstance(value, int):
        return str(value), issue("coerced_field", f"the number {value} read as text", fatal=False)
    if isinstance(value, float):
        if math.isfinite(value) and value == int(value):
            return str(int(value)), issue("coerced_field", f"the number {value} read as text", fatal=False)
        return None, issue("non_string_field", f"a non-integer number ({value})")
    if not isinstance(value, str):
        return None, issue("non_string_field", f"a {type(value).__name__}, not a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates from a "\udXXX" JSON escape
        return None, issue("bad_encoding", f"unencodable character at {e.start}")
    if not value.strip():
        return None, issue("empty_field", "empty string")
    return value, None


def write_rows(path: str | os.PathLike, rows: Iterable[dict], parquet_schema=None) -> int:
    """Write rows as jsonl or parquet (by suffix), atomically; returns the row count.

    ``parquet_schema`` (a pyarrow schema) keeps column types fixed even for zero rows.
    """
    path = Path(path)
    fmt = file_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    count = 0
    if fmt == "jsonl":
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = list(rows)
        count = len(rows)
        table = pa.Table.from_pylist(rows, schema=parquet_schema)
        pq.write_table(table, tmp)
    os.replace(tmp, path)
    return count
