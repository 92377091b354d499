"""Turn a math dataset's free-form answers into integer answers (DAPO-Math-17K style).

    python tools/transform_dataset.py IN OUT [--problem-key problem] [--answer-key answer]
        [--data-source NAME] [--state-conditions] [--report REPORT.jsonl]

IN and OUT are jsonl or parquet (by suffix). Integer answers pass through; closed forms
(fractions, k+m\\sqrt{n}, (a+b\\sqrt{c})/d, k\\pi/m, sums...) become "find k+m+n" problems;
the rest is dropped. A summary of what happened to every row is printed at the end.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

try:
    import dapo_megatron  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dapo_megatron.data.transform import TransformOptions, transform_file


def main(argv: list[str] | None = None) -> int:
    defaults = TransformOptions()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="input .jsonl or .parquet")
    parser.add_argument("output", help="output .jsonl or .parquet (DAPO-Math-17K format)")
    parser.add_argument("--problem-key", default=defaults.problem_key, help="problem field (dotted for nested)")
    parser.add_argument("--answer-key", default=defaults.answer_key, help="answer field (dotted for nested)")
    parser.add_argument("--data-source-key", default=defaults.data_source_key)
    parser.add_argument("--data-source", default=defaults.data_source,
                        help="data_source of every output row (default: the row's own, else the input file name)")
    parser.add_argument("--state-conditions", action="store_true", default=defaults.state_conditions,
                        help='also say "n is square-free", "the fraction is in lowest terms"')
    parser.add_argument("--report", default=None, help="jsonl listing every dropped or malformed row")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    options = TransformOptions(
        problem_key=args.problem_key, answer_key=args.answer_key, data_source_key=args.data_source_key,
        data_source=args.data_source, state_conditions=args.state_conditions,
    )
    try:
        summary = transform_file(args.input, args.output, options, report_path=args.report)
    except (OSError, ValueError) as e:  # unreadable file, unknown suffix, corrupt parquet
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
