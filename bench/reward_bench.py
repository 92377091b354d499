"""Benchmark the DAPO math reward against HF math-verify on the same labelled cases.

Usage (from the repository root, after the README's dev install)::

    python bench/reward_bench.py [--workers 2] [--timeout 5] [--repeats 3] [--show-errors]

Both verifiers score every case of ``bench/reward_cases.py`` in the same run and print
one column each: accuracy, false positives (overall and on the wrong-answer categories,
where a false positive is a reward hack), false negatives, and answers/s.

Throughput is batch throughput: this project scores the whole suite with one
``RewardPool.score`` call (``--workers`` processes, hard per-item timeout; pool start-up
is reported separately and not counted, as a trainer keeps its pool); math-verify has no
batch API, so it is timed both as documented (serial ``verify(parse(gold),
parse(response))`` with its own 5 s timeouts) and over a ``multiprocessing.Pool`` of the
same ``--workers`` processes. Throughput is also given without the adversarial cases,
whose timeouts dominate math-verify's time.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import statistics
import sys
import time
from collections import Counter, defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from reward_cases import WRONG_ANSWER_CATEGORIES, cases  # noqa: E402

from dapo_megatron.reward import RewardPool  # noqa: E402


def _math_verify_one(item: tuple[str, str]) -> bool:
    """math-verify's documented usage: gold in $...$, the whole response as prediction."""
    from math_verify import parse, verify

    response, gold = item
    try:
        return bool(verify(parse(f"${gold}$"), parse(response)))
    except Exception:  # noqa: BLE001 - a crash is a wrong answer for the peer too
        return False


def _quiet_math_verify() -> None:
    """Silence math-verify's per-timeout log lines and import it (worker initializer)."""
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    logging.getLogger("latex2sympy2_extended").setLevel(logging.CRITICAL)
    _math_verify_one(("$1$", "1"))  # imports and warms its parsers outside the timing


def _metrics(predictions: list[bool], suite: list[dict]) -> dict:
    fp = sum(p and not c["expected"] for p, c in zip(predictions, suite))
    fn = sum(c["expected"] and not p for p, c in zip(predictions, suite))
    fp_wrong = sum(
        p and not c["expected"] and c["category"] in WRONG_ANSWER_CATEGORIES
        for p, c in zip(predictions, suite)
    )
    per_cat: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for p, c in zip(predictions, suite):
        per_cat[c["category"]][0] += p == c["expected"]
        per_cat[c["category"]][1] += 1
    return {
        "accuracy": sum(p == c["expected"] for p, c in zip(predictions, suite)) / len(suite),
        "false_positives": fp,
        "false_positives_wrong_answer_cases": fp_wrong,
        "false_negatives": fn,
        "per_category": {k: v[0] / v[1] for k, v in sorted(per_cat.items())},
    }


def _ours(suite, workers: int, timeout: float, repeats: int):
    responses = [c["response"] for c in suite]
    gts = [c["ground_truth"] for c in suite]
    times, startups, results = [], [], None
    for _ in range(repeats):  # a fresh pool each time: no answer cache carried over
        t0 = time.perf_counter()
        pool = RewardPool(num_workers=workers, timeout_s=timeout).start()
        startups.append(time.perf_counter() - t0)
        try:
            t0 = time.perf_counter()
            results = pool.score(responses, gts)
            times.append(time.perf_counter() - t0)
            timeouts = pool.timeouts
        finally:
            pool.close()
    return [r.correct for r in results], statistics.median(times), statistics.median(startups), timeouts


def _ours_subset_time(suite, workers, timeout, repeats):
    responses = [c["response"] for c in suite]
    gts = [c["ground_truth"] for c in suite]
    times = []
    for _ in range(repeats):
        pool = RewardPool(num_workers=workers, timeout_s=timeout).start()
        try:
            t0 = time.perf_counter()
            pool.score(responses, gts)
            times.append(time.perf_counter() - t0)
        finally:
            pool.close()
    return statistics.median(times)


def _math_verify_serial(suite):
    _quiet_math_verify()
    t0 = time.perf_counter()
    out = [_math_verify_one((c["response"], c["ground_truth"])) for c in suite]
    return out, time.perf_counter() - t0


def _math_verify_pool(suite, workers: int):
    items = [(c["response"], c["ground_truth"]) for c in suite]
    with mp.get_context("forkserver").Pool(workers, initializer=_quiet_math_verify) as pool:
        t0 = time.perf_counter()
        out = pool.map(_math_verify_one, items, chunksize=8)
        return out, time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="processes for both batch scorers")
    parser.add_argument("--timeout", type=float, default=5.0, help="our per-item timeout (s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of our pool (median)")
    parser.add_argument("--show-errors", action="store_true", help="list every misjudged case")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)

    suite = cases()
    plain = [c for c in suite if c["category"] != "adversarial"]
    print(f"{len(suite)} cases: {dict(Counter(c['category'] for c in suite))}", flush=True)

    ours, ours_t, ours_start, ours_timeouts = _ours(suite, args.workers, args.timeout, args.repeats)
    ours_plain_t = _ours_subset_time(plain, args.workers, args.timeout, args.repeats)
    print(f"ours done ({ours_t:.2f}s)", flush=True)
    mv, mv_t = _math_verify_serial(suite)
    _, mv_plain_t = _math_verify_serial(plain)
    print(f"math-verify serial done ({mv_t:.2f}s)", flush=True)
    mv_par, mv_par_t = _math_verify_pool(suite, args.workers)
    _, mv_par_plain_t = _math_verify_pool(plain, args.workers)

    m_ours, m_mv = _metrics(ours, suite), _metrics(mv, suite)
    n, n_plain = len(suite), len(plain)
    # math-verify does not know DAPO's "Answer:" line; this subset is its home ground.
    boxed = [k for k, c in enumerate(suite)
             if "answer:" not in c["response"].lower() and c["category"] != "adversarial"]
    acc_boxed = [
        sum(preds[k] == suite[k]["expected"] for k in boxed) / len(boxed) for preds in (ours, mv)
    ]
    rows = [
        ("cases", n, n),
        ("accuracy", f"{m_ours['accuracy']:.1%}", f"{m_mv['accuracy']:.1%}"),
        (f"accuracy, no Answer: line, no adversarial ({len(boxed)})", f"{acc_boxed[0]:.1%}",
         f"{acc_boxed[1]:.1%}"),
        ("false positives (all)", m_ours["false_positives"], m_mv["false_positives"]),
        ("false positives (wrong-answer cases)", m_ours["false_positives_wrong_answer_cases"],
         m_mv["false_positives_wrong_answer_cases"]),
        ("false negatives", m_ours["false_negatives"], m_mv["false_negatives"]),
        (f"answers/s, batch of {n}, {args.workers} processes", f"{n / ours_t:,.0f}", f"{n / mv_par_t:,.0f}"),
        (f"answers/s, batch, no adversarial ({n_plain})", f"{n_plain / ours_plain_t:,.0f}",
         f"{n_plain / mv_par_plain_t:,.0f}"),
        ("answers/s, serial in one process", "-", f"{n / mv_t:,.0f}"),
        ("answers/s, serial, no adversarial", "-", f"{n_plain / mv_plain_t:,.0f}"),
        ("timeouts", ours_timeouts, "-"),
        ("pool start-up (s, not counted)", f"{ours_start:.2f}", "-"),
    ]
    print()
    print("| metric | dapo_megatron.reward | math-verify |")
    print("|---|---:|---:|")
    for name, a, b in rows:
        print(f"| {name} | {a} | {b} |")
    print()
    print("| category | ours | math-verify |")
    print("|---|---:|---:|")
    for cat in m_ours["per_category"]:
        print(f"| {cat} | {m_ours['per_category'][cat]:.1%} | {m_mv['per_category'][cat]:.1%} |")
    if mv_par != mv:
        print(f"note: math-verify pool and serial runs disagree on {sum(a != b for a, b in zip(mv, mv_par))} cases")
    if args.show_errors:
        for name, preds in (("ours", ours), ("math-verify", mv)):
            for p, c in zip(preds, suite):
                if p != c["expected"]:
                    print(f"[{name}] {c['category']} expected={c['expected']} gt={c['ground_truth']!r} "
                          f"response tail={c['response'][-70:]!r}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"ours": m_ours, "math_verify": m_mv, "rows": rows}, fh, indent=1, default=str)
    ok = (
        m_ours["accuracy"] >= m_mv["accuracy"]
        and m_ours["false_positives_wrong_answer_cases"] == 0
        and n / ours_t >= max(n / mv_par_t, n / mv_t)  # the peer's better timing
    )
    print("acceptance:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
