"""Answer text is data: nothing in the data package may run it as code."""

from __future__ import annotations

import re
from pathlib import Path

import dapo_megatron.data

FORBIDDEN = re.compile(r"\beval\s*\(|\bexec\s*\(|sympify|parse_expr|literal_eval|__import__|(?<!re\.)\bcompile\s*\(")


def test_data_package_never_evaluates_text():
    package = Path(dapo_megatron.data.__file__).parent
    tool = package.parents[1] / "tools" / "transform_dataset.py"
    files = sorted(package.glob("*.py")) + [tool]
    assert len(files) >= 8
    hits = [f"{f.name}:{n}: {line.strip()}" for f in files
            for n, line in enumerate(f.read_text().splitlines(), 1) if FORBIDDEN.search(line)]
    assert hits == []
