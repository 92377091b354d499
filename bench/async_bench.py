"""Asynchronous training against the synchronous loop on the embedded default.

Two settings of `examples/tiny_cpu.yaml`, the same number of steps and seeds each:

    sync    the default (colocated, rollout.max_staleness=0)
    async   rollout.placement=disaggregated rollout.num_engines=1 rollout.max_staleness=1:
            generation of step t+1 overlaps training of step t (controller/async_rollout.py)
    async_tis  async with algo.rollout_correction=token-tis (run with --settings)
    async_engine  async with rollout.old_logprobs=engine: pi_old is the behaviour policy's
            log-probs, no old-log-prob pass on the ranks (run with --settings)

Every run is the real trainer (one subprocess each, run one after another). Reported per
run: wall-clock seconds per step (mean of time/step over steps without an evaluation, and
the run's whole step loop divided by its steps), the engines' and trainers' idle seconds
per step, and the final held-out avg@k (eval.k=4 on the 300 held-out problems).

    nice -n 10 python bench/async_bench.py --steps 20 --seeds 42,43,44 --out runs/async_bench
    python bench/async_bench.py --summarize runs/async_bench/results.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {
    "sync": [],
    "async": ["rollout.placement=disaggregated", "rollout.num_engines=1", "rollout.max_staleness=1"],
    # The same with the one-version gap corrected token by token (truncated IS against the
    # engine's log-probs, algo/correction.py).
    "async_tis": ["rollout.placement=disaggregated", "rollout.num_engines=1", "rollout.max_staleness=1",
                  "algo.rollout_correction=token-tis"],
    # The same with the engine's log-probs as pi_old (PPO's clip around the behaviour policy):
    # no old-log-prob pass on the ranks, so training is shorter than the overlapped generation.
    "async_engine": ["rollout.placement=disaggregated", "rollout.num_engines=1", "rollout.max_staleness=1",
                     "rollout.old_logprobs=engine"],
}


def run_one(name: str, seed: int, steps: int, out_dir: str, config: str) -> dict:
    run_dir = os.path.join(out_dir, f"{name}_seed{seed}")
    args = [sys.executable, "-m", "dapo_megatron.cli", "train", config, *SETTINGS[name],
            f"trainer.seed={seed}", f"trainer.max_steps={steps}", f"eval.every={steps}",
            "checkpoint.resume=false", "checkpoint.save_every=0", f"trainer.run_dir={run_dir}"]
    t0 = time.perf_counter()
    with open(os.path.join(out_dir, f"{name}_seed{seed}.log"), "w") as log:
        proc = subprocess.run(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                              env=dict(os.environ, PYTHONPATH=ROOT))
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{name} seed {seed} failed (exit {proc.returncode}); see {log.name}")
    return {**read_run(run_dir, name, seed), "run_seconds": seconds}


def read_run(run_dir: str, name: str, seed: int) -> dict:
    """The row of one finished run, from its metrics.jsonl."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    train = [r for r in records if r["step"] > 0]
    plain = [r["time/step"] for r in train if r.get("eval/avg@k") is None] or [float("nan")]
    evals = {r["step"]: r["eval/avg@k"] for r in records if r.get("eval/avg@k") is not None}
    return {
        "setting": name, "seed": seed, "steps": len(train),
        "step_seconds_mean": statistics.fmean(plain),
        "step_loop_seconds": sum(r["time/step"] for r in train),
        "engine_idle_mean": statistics.fmean(r["time/engine_idle"] for r in train),
        "trainer_idle_mean": statistics.fmean(r["time/trainer_idle"] for r in train),
        "staleness_mean": statistics.fmean(r.get("staleness/mean", 0.0) for r in train),
        "avg_at_k_start": evals.get(0), "avg_at_k_final": evals.get(max(evals)) if evals else None,
    }


def summarize(rows: list[dict]) -> str:
    def col(name, key):
        vals = [r[key] for r in rows if r["setting"] == name]
        return vals, (f"{statistics.fmean(vals):.3f} ± {statistics.stdev(vals):.3f}" if len(vals) > 1
                      else f"{vals[0]:.3f}")

    lines = ["| setting | seeds | steps | s/step (no-eval steps) | step loop s / step | engine idle s/step | "
             "trainer idle s/step | final avg@4 (per seed) |", "|---|---|---|---|---|---|---|---|"]
    for name in SETTINGS:
        mine = [r for r in rows if r["setting"] == name]
        if not mine:
            continue
        per_seed = ", ".join(f"{r['avg_at_k_final']:.3f}" for r in mine)
        lines.append(
            f"| {name} | {len(mine)} | {mine[0]['steps']} | {col(name, 'step_seconds_mean')[1]} | "
            f"{statistics.fmean(r['step_loop_seconds'] / r['steps'] for r in mine):.3f} | "
            f"{col(name, 'engine_idle_mean')[1]} | {col(name, 'trainer_idle_mean')[1]} | {per_seed} |")
    sync = [r["step_seconds_mean"] for r in rows if r["setting"] == "sync"]
    for name in [n for n in SETTINGS if n != "sync"]:
        other = [r["step_seconds_mean"] for r in rows if r["setting"] == name]
        if sync and other:
            lines.append(f"speed-up (mean s/step, sync / {name}): {statistics.fmean(sync) / statistics.fmean(other):.2f}x")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="examples/tiny_cpu.yaml")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seeds", default="42,43,44")
    ap.add_argument("--settings", default="sync,async")
    ap.add_argument("--out", default="runs/async_bench")
    ap.add_argument("--summarize", default=None, help="print the table of a results.jsonl and exit")
    ap.add_argument("--from-runs", action="store_true",
                    help="print the table of the finished <setting>_seed<N> runs in --out and exit")
    args = ap.parse_args()
    if args.from_runs:
        rows = []
        for entry in sorted(os.listdir(args.out)):
            name, _, seed = entry.rpartition("_seed")
            if name in SETTINGS and os.path.exists(os.path.join(args.out, entry, "metrics.jsonl")):
                try:
                    row = read_run(os.path.join(args.out, entry), name, int(seed))
                except statistics.StatisticsError:  # still at step 0
                    continue
                if row["steps"] == args.steps and row["avg_at_k_final"] is not None:
                    rows.append(row)
        print(summarize(rows))
        return
    if args.summarize:
        with open(args.summarize) as f:
            print(summarize([json.loads(line) for line in f if line.strip()]))
        return
    os.makedirs(args.out, exist_ok=True)
    results = os.path.join(args.out, "results.jsonl")
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for name in args.settings.split(","):  # interleaved: load drifts hit both settings
            row = run_one(name, seed, args.steps, args.out, args.config)
            rows.append(row)
            with open(results, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    print(summarize(rows))


if __name__ == "__main__":
    main()
