"""DAPO's four mechanisms, each isolated by one switch, on the chains task where length matters.

Every run is the real trainer (`dapo_megatron.cli train`, one subprocess) on
`examples/tiny_chains.yaml` (full DAPO) plus the one switch its setting names; nothing else
differs between runs, and all runs train for the same number of steps (`--steps`), as the
paper's figures compare them. The full-DAPO run of each seed is the shared side of every pair:

    mechanism   settings (the switch)
    clip        dapo (eps_high 0.28)     sym_clip (algo.eps_high=0.2)
    loss        dapo (token-mean)        seq_mean (algo.loss_agg=seq-mean-token-mean)
    overlong    dapo (soft punishment)   no_shaping (soft_overlong=false)
                                         overlong_filter (soft_overlong=false, overlong_filter=true)
    dynamic     dapo (on, equal steps)   dyn_off (dynamic_sampling=false)
                                         dapo_equal_samples (on, stopped once it has generated
                                         the responses dyn_off generates in its steps: not run,
                                         cut from the dapo run of the same seed, see below)
    cumulative  the paper's six, from bench/ablation.py (grpo ... dapo), on this task

Each finished run is appended to the jsonl at once (setting, seed, the overrides, summary
figures and per-step curves), and a rerun skips the (setting, seed) pairs already there,
so an interrupted study resumes. `--summarize` rebuilds the tables and plots only.

A run is a deterministic function of its config and seed, and `trainer.max_steps` and
`trainer.sample_budget` only decide where it stops (constant LR: `optimizer.lr_decay`), so
dynamic sampling at dyn_off's budget is the dapo run of that seed up to the step at which it
has generated as many responses (the trainer's stopping rule, `_budget_spent` in
controller/loop.py): `equal_samples_rows` cuts it there instead of training it again.

`--set KEY=VALUE` adds a config change shared by every run of a study (recorded in each
record's "common"); `--jobs 2` runs two at once. The second study (runs/mech2/RULE.txt):

    S="--set algo.group_size=4 --set trainer.train_batch_size=16 --set trainer.mini_batch_size=2 --set algo.overlong_buffer=24"
    python bench/mechanisms.py --groups clip,loss,overlong,dynamic --seeds 3 --steps 100 --eval-every 10 \
        --eval-prompts 200 --jobs 2 $S --out runs/mech2/results.jsonl
    python bench/mechanisms.py --groups cumulative --seeds 3 --steps 100 --eval-every 10 \
        --eval-prompts 200 --jobs 2 $S --out runs/mech2/results.jsonl
    python bench/mechanisms.py --summarize runs/mech2/results.jsonl --plots docs/

The third study (runs/mech3/RULE.txt: the two misses over an early window, seeds 4-6):

    python bench/mechanisms.py --groups clip,loss --only dapo,sym_clip,seq_mean --first-seed 4 \
        --seeds 3 --steps 50 --eval-every 10 --eval-prompts 200 --jobs 2 $S --out runs/mech3/results.jsonl
    python bench/mechanisms.py --warm-start-report   # what RL starts from, by chain length
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.ablation import PAPER
from bench.ablation import settings as cumulative_settings  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "examples/tiny_chains.yaml"
RETRIES = 3  # runs whose Ray cluster failed to start


def common_overrides(steps: int, eval_every: int, eval_prompts: int, shared: list[str] = ()) -> list[str]:
    """Shared by every run (not tuned per setting): `steps` training steps, held-out eval of
    `eval_prompts` problems every `eval_every` steps, and the study's shared config changes
    (`--set`), which come before the setting's own switch."""
    return ["checkpoint.save_every=0", "checkpoint.resume=false", f"eval.every={eval_every}",
            f"eval.max_prompts={eval_prompts}", f"trainer.max_steps={steps}", *shared]


def _samples_per_step(config: str) -> int:
    """Responses one step generates without dynamic sampling: train_batch_size x group_size."""
    from dapo_megatron.config import load_config

    cfg = load_config(os.path.join(ROOT, config))
    return cfg.trainer.train_batch_size * cfg.algo.group_size


MECHANISMS: dict[str, dict[str, list[str]]] = {
    "clip": {"dapo": [], "sym_clip": ["algo.eps_high=0.2"]},
    "loss": {"dapo": [], "seq_mean": ["algo.loss_agg=seq-mean-token-mean"]},
    "overlong": {"dapo": [], "no_shaping": ["algo.soft_overlong=false"],
                 "overlong_filter": ["algo.soft_overlong=false", "algo.overlong_filter=true"]},
    "dynamic": {"dapo": [], "dyn_off": ["algo.dynamic_sampling=false"], "dapo_equal_samples": [],
                # Added after the second study's seed-1 runs (not in its rule): both switches off,
                # paired with no_shaping, shows what dynamic sampling does without the soft
                # overlong term, whose length-only rewards give uniform groups an advantage.
                "dyn_off_no_shaping": ["algo.dynamic_sampling=false", "algo.soft_overlong=false"]},
    "cumulative": {"cum_" + name.lstrip("+"): over for name, over in cumulative_settings().items()},
}
DERIVED = {"dapo_equal_samples"}  # cut from other runs' records (equal_samples_rows), not run

# Per-step keys kept in each record's curve: the trainer's own metric names.
CURVE_KEYS = ("eval/avg@k", "eval/length_mean", "eval/length_max", "eval/truncated_frac",
              "actor/entropy", "response/length_mean", "response/length_max", "response/truncated_frac",
              "actor/clip_frac_low", "actor/clip_frac_high", "train/accuracy",
              "rollout/generated_samples_total", "dynamic_sampling/kept", "dynamic_sampling/generated")


def run_one(name: str, overrides: list[str], seed: int, out_dir: str, config: str, common: list[str],
            steps: int) -> dict:
    run_dir = os.path.join(out_dir, f"{name}_seed{seed}")
    args = [sys.executable, "-m", "dapo_megatron.cli", "train", config, *common, *overrides,
            f"trainer.seed={seed}", f"trainer.run_dir={run_dir}"]
    t0 = time.perf_counter()
    log_path = os.path.join(out_dir, f"{name}_seed{seed}.log")
    for attempt in range(RETRIES + 1):
        with open(log_path, "w") as log:
            proc = subprocess.run(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode == 0:
            break
        with open(log_path) as log:
            transient = "timed out during startup" in log.read()
        if not transient or attempt == RETRIES:
            raise RuntimeError(f"{name} seed {seed} failed (exit {proc.returncode}); see {log_path}")
        # Ray waits a hard-coded 30 s for its raylet (ray/_private/node.py, Node.__init__);
        # on an overloaded machine that can lapse: the run never started, so start it again.
        print(f"[mechanisms] {name} seed {seed}: Ray startup timed out, retrying", flush=True)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    curve = [{"step": r["step"], **{k: r[k] for k in CURVE_KEYS if r.get(k) is not None}} for r in records]
    return {"setting": name, "seed": seed, "overrides": overrides, "common": common, "config": config,
            "budget_steps": steps,
            "seconds": time.perf_counter() - t0, "steps": max(r["step"] for r in records),
            "curve": curve, **summary(curve)}


def _fmt(value: float | None) -> str:
    """A figure for the progress line; None where a run had no step that measured it (a
    collapsed run whose last steps found no mixed group trains nothing and logs no entropy)."""
    return "n/a" if value is None else f"{value:.3f}"


def summary(curve: list[dict]) -> dict:
    """The figures the tables compare, from one run's curve."""
    evals = [c for c in curve if "eval/avg@k" in c]
    train = [c for c in curve if c["step"] > 0]
    last = train[-5:]  # the last five steps: one step is too noisy
    lastq = train[-max(5, len(train) // 4):]
    ds = [c for c in train if c.get("dynamic_sampling/generated")]

    def mean(rows, key):
        vals = [r[key] for r in rows if key in r]
        return sum(vals) / len(vals) if vals else None

    return {
        "initial_accuracy": evals[0]["eval/avg@k"], "final_accuracy": evals[-1]["eval/avg@k"],
        # The last two evals together: one eval of a few hundred samples moves by +-2 points.
        "accuracy_last2": mean(evals[-2:], "eval/avg@k"),
        "best_accuracy": max(c["eval/avg@k"] for c in evals),
        "initial_eval_truncated": evals[0]["eval/truncated_frac"],
        "final_eval_truncated": evals[-1]["eval/truncated_frac"],
        "initial_eval_length": evals[0]["eval/length_mean"], "final_eval_length": evals[-1]["eval/length_mean"],
        "entropy_first5": mean(train[:5], "actor/entropy"), "entropy_last5": mean(last, "actor/entropy"),
        "length_mean_last5": mean(last, "response/length_mean"),
        "length_max_last5": mean(last, "response/length_max"),
        "truncated_last5": mean(last, "response/truncated_frac"),
        "train_accuracy_last5": mean(last, "train/accuracy"),
        # Whole-run means: truncation is gone from every setting within ~10 steps (a truncated
        # response has no answer, so it scores -1 with or without shaping), and the paper's
        # figures are curves, not end points.
        "truncated_all": mean(train, "response/truncated_frac"),
        "length_max_all": mean(train, "response/length_max"),
        "entropy_all": mean(train, "actor/entropy"),
        "clip_frac_low": mean(train, "actor/clip_frac_low"), "clip_frac_high": mean(train, "actor/clip_frac_high"),
        "generated_samples": train[-1].get("rollout/generated_samples_total") if train else 0,
        # Over the last quarter of the run (at least 5 steps): the end of a long run's curve.
        "entropy_lastq": mean(lastq, "actor/entropy"), "length_mean_lastq": mean(lastq, "response/length_mean"),
        "length_max_lastq": mean(lastq, "response/length_max"),
        "truncated_lastq": mean(lastq, "response/truncated_frac"),
        "train_accuracy_lastq": mean(lastq, "train/accuracy"),
        "length_mean_all": mean(train, "response/length_mean"),
        # The first 10 steps: while the warm start's rambles are still there (they are gone
        # from every setting by about step 25; third study, runs/mech3/RULE.txt).
        "length_mean_first10": mean(train[:10], "response/length_mean"),
        # The first half of the run: with a warm start that rambles without bound, while its
        # rambles die out (sixth study, runs/mech6/RULE.txt; gone by about step 10 of 40).
        "length_mean_firsthalf": mean(train[:max(1, len(train) // 2)], "response/length_mean"),
        # Held-out accuracy over every evaluation after step 0: the area under the curve of
        # Fig. 6 (reaching an accuracy in fewer steps raises it), less noisy than one or two evals.
        "accuracy_evals_mean": mean(evals[1:], "eval/avg@k"),
        # Share of the groups dynamic sampling examined that it dropped (uniform groups): what
        # the switch has to act on (DAPO sec. 3.2). None when the run has no such counts.
        "dropped_group_share": (1 - sum(c["dynamic_sampling/kept"] for c in ds) /
                                sum(c["dynamic_sampling/generated"] for c in ds)) if ds else None,
    }


def equal_samples_rows(rows: list[dict]) -> list[dict]:
    """Dynamic sampling at the responses dyn_off generated: each seed's dapo record cut at the
    first step whose running total of generated responses reaches dyn_off's total, where a
    run with `trainer.sample_budget` set to that total stops (controller/loop.py)."""
    out = []
    for r in rows:
        off = [d for d in rows if d["setting"] == "dyn_off" and d["seed"] == r["seed"]]
        if r["setting"] != "dapo" or not off:
            continue
        budget = off[0]["generated_samples"]
        stop = next((c["step"] for c in r["curve"]
                     if c.get("rollout/generated_samples_total", 0) >= budget), r["steps"])
        curve = [c for c in r["curve"] if c["step"] <= stop]
        out.append({**{k: r[k] for k in ("seed", "common", "config", "budget_steps")},
                    "setting": "dapo_equal_samples", "derived_from": f"dapo seed {r['seed']}",
                    "sample_budget": budget, "steps": stop, "curve": curve, **summary(curve)})
    return out


# ---------------------------------------------------------------------------- reporting

def _stats(values: list[float]) -> tuple[float, float]:
    """(mean, sample std over seeds; 0 for one seed)."""
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0


TABLE_COLUMNS = (  # (record key, header, scale, format)
    ("accuracy_evals_mean", "held-out avg@4 (mean of evals after step 0)", 100, "{:.1f}"),
    ("final_accuracy", "held-out avg@4 (end)", 100, "{:.1f}"),
    ("entropy_lastq", "entropy (last quarter)", 1, "{:.3f}"),
    ("length_mean_lastq", "train length mean (last quarter)", 1, "{:.1f}"),
    ("length_max_lastq", "train length max (last quarter)", 1, "{:.1f}"),
    ("truncated_all", "train truncated % (all steps)", 100, "{:.2f}"),
    ("clip_frac_low", "clip low %", 100, "{:.2f}"),
    ("clip_frac_high", "clip high %", 100, "{:.3f}"),
    ("dropped_group_share", "groups dropped %", 100, "{:.1f}"),
    ("steps", "steps", 1, "{:.0f}"),
    ("generated_samples", "generated samples", 1, "{:.0f}"),
)


def tables(rows: list[dict]) -> str:
    out = []
    for group, members in MECHANISMS.items():
        present = [n for n in members if any(r["setting"] == n for r in rows)]
        if len(present) < 2:
            continue
        out += [f"### {group}", "",
                "| setting | seeds | " + " | ".join(h for _, h, _, _ in TABLE_COLUMNS) + " |",
                "|---|---|" + "---|" * len(TABLE_COLUMNS)]
        for n in present:
            rs = [r for r in rows if r["setting"] == n]
            cells = []
            for key, _, scale, fmt in TABLE_COLUMNS:
                vals = [scale * r[key] for r in rs if r.get(key) is not None]
                m, s = _stats(vals) if vals else (float("nan"), 0.0)
                cells.append(f"{fmt.format(m)} ± {fmt.format(s)}")
            out.append(f"| {n} | {len(rs)} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


# The paper's claims as paired comparisons: (mechanism, claim, the setting the paper expects to
# be larger, the one expected smaller, record key, scale, format, primary). A difference is
# taken per seed (same seed, same held-out samples at step 0), so "larger minus smaller" > 0 is
# the paper's direction; it counts as reproduced when its mean exceeds twice the std over seeds.
# `primary` marks the one figure per mechanism that the 3-of-4 goal is judged on, fixed
# in runs/mech2/RULE.txt before the study's seeds ran (the 16-step study's primaries were the
# last-5-step figures; its tables are kept as printed in docs/mechanisms16_results_tables.md).
CHECKS = (
    ("clip-higher (Fig. 2)", "entropy (last quarter) higher with eps_high 0.28", "dapo", "sym_clip",
     "entropy_lastq", 1, "{:+.4f}", True),
    ("clip-higher: the switch acts", "upper clip binds (clip high %) more often with eps_high 0.2", "sym_clip",
     "dapo", "clip_frac_high", 100, "{:+.3f}", False),
    ("clip-higher (Fig. 2)", "entropy (mean of all steps) higher with eps_high 0.28", "dapo", "sym_clip",
     "entropy_all", 1, "{:+.4f}", False),
    ("clip-higher (Fig. 2)", "held-out accuracy (mean of evals) higher", "dapo", "sym_clip",
     "accuracy_evals_mean", 100, "{:+.1f}", False),
    ("token-level loss (Fig. 4)", "mean length (last quarter) higher under seq-mean", "seq_mean", "dapo",
     "length_mean_lastq", 1, "{:+.2f}", True),
    ("token-level loss (Fig. 4)", "mean length (steps 1-10) higher under seq-mean", "seq_mean", "dapo",
     "length_mean_first10", 1, "{:+.2f}", False),
    ("token-level loss (Fig. 4)", "mean length (first half of the run) higher under seq-mean", "seq_mean", "dapo",
     "length_mean_firsthalf", 1, "{:+.2f}", False),
    ("token-level loss (Fig. 4)", "truncated % (mean of all steps) higher under seq-mean", "seq_mean", "dapo",
     "truncated_all", 100, "{:+.2f}", False),
    ("token-level loss (Fig. 4)", "max length (last quarter) higher under seq-mean", "seq_mean", "dapo",
     "length_max_lastq", 1, "{:+.1f}", False),
    ("token-level loss (Fig. 4)", "entropy (last quarter) higher under seq-mean", "seq_mean", "dapo",
     "entropy_lastq", 1, "{:+.4f}", False),
    ("token-level loss (Fig. 4)", "held-out accuracy (mean of evals) higher with token-mean", "dapo", "seq_mean",
     "accuracy_evals_mean", 100, "{:+.1f}", False),
    ("soft overlong punishment (Fig. 5)", "truncated % (mean of all steps) lower with punishment", "no_shaping",
     "dapo", "truncated_all", 100, "{:+.2f}", True),
    ("soft overlong punishment (Fig. 5)", "truncated % (last 5) lower with punishment", "no_shaping", "dapo",
     "truncated_last5", 100, "{:+.2f}", False),
    ("soft overlong punishment (Fig. 5)", "mean length (mean of all steps) lower with punishment", "no_shaping",
     "dapo", "length_mean_all", 1, "{:+.2f}", False),
    ("soft overlong punishment (Fig. 5)", "max length (mean of all steps) lower with punishment", "no_shaping",
     "dapo", "length_max_all", 1, "{:+.1f}", False),
    ("soft overlong punishment (Fig. 5)", "held-out accuracy (mean of evals) higher with punishment", "dapo",
     "no_shaping", "accuracy_evals_mean", 100, "{:+.1f}", False),
    ("overlong filtering (Fig. 5)", "held-out accuracy (mean of evals) higher with the filter", "overlong_filter",
     "no_shaping", "accuracy_evals_mean", 100, "{:+.1f}", False),
    ("overlong filtering (Fig. 5)", "entropy (last quarter) lower (steadier) with the filter", "no_shaping",
     "overlong_filter", "entropy_lastq", 1, "{:+.4f}", False),
    ("overlong filtering: the switch acts", "truncated % (mean of all steps) higher: truncated samples leave the "
     "loss, so nothing shortens them", "overlong_filter", "no_shaping", "truncated_all", 100, "{:+.2f}", False),
    ("dynamic sampling (Fig. 6)", "held-out accuracy (mean of evals after step 0) higher at equal steps", "dapo",
     "dyn_off", "accuracy_evals_mean", 100, "{:+.1f}", True),
    ("dynamic sampling (Fig. 6)", "held-out accuracy (last 2 evals) higher at equal steps", "dapo", "dyn_off",
     "accuracy_last2", 100, "{:+.1f}", False),
    ("dynamic sampling (Fig. 6)", "held-out accuracy (last eval) at equal generated samples", "dapo_equal_samples",
     "dyn_off", "final_accuracy", 100, "{:+.1f}", False),
    ("dynamic sampling, no shaping (post hoc)", "held-out accuracy (mean of evals) higher at equal steps, both "
     "without soft punishment", "no_shaping", "dyn_off_no_shaping", "accuracy_evals_mean", 100, "{:+.1f}", False),
    ("dynamic sampling, no shaping (post hoc)", "mean length (last quarter): what the soft term does to uniform "
     "groups", "dyn_off_no_shaping", "dyn_off", "length_mean_lastq", 1, "{:+.2f}", False),
) + tuple(
    ("cumulative (Table 1)", f"held-out accuracy (last 2 evals) of {n} above naive GRPO", n, "cum_grpo",
     "accuracy_last2", 100, "{:+.1f}", False)
    for n in MECHANISMS["cumulative"] if n != "cum_grpo")


def paired(rows: list[dict], larger: str, smaller: str, key: str) -> list[float]:
    """Per seed, `larger`'s figure minus `smaller`'s, over the seeds both have."""
    by = {(r["setting"], r["seed"]): r.get(key) for r in rows}
    seeds = sorted({s for (n, s) in by if n == larger} & {s for (n, s) in by if n == smaller})
    return [by[(larger, s)] - by[(smaller, s)] for s in seeds
            if by[(larger, s)] is not None and by[(smaller, s)] is not None]


# The four mechanisms the 3-of-4 goal counts, by the `--groups` name: their rows in CHECKS.
PRIMARY_MECHANISMS = {"clip": "clip-higher (Fig. 2)", "loss": "token-level loss (Fig. 4)",
                      "overlong": "soft overlong punishment (Fig. 5)", "dynamic": "dynamic sampling (Fig. 6)"}


def primaries(choices: list[str]) -> dict[str, str]:
    """`--primary GROUP=KEY` choices as {CHECKS mechanism: record key}; every choice must name one
    of CHECKS' rows for that mechanism."""
    out = {}
    for choice in choices:
        group, _, key = choice.partition("=")
        if group not in PRIMARY_MECHANISMS:
            raise ValueError(f"--primary {choice!r}: group must be one of {', '.join(PRIMARY_MECHANISMS)}")
        mech = PRIMARY_MECHANISMS[group]
        keys = [c[4] for c in CHECKS if c[0] == mech]
        if key not in keys:
            raise ValueError(f"--primary {choice!r}: {mech} has rows for {', '.join(keys)}")
        out[mech] = key
    return out


def check_table(rows: list[dict], primary: dict[str, str] | None = None) -> str:
    """The paired differences. `primary` ({mechanism: record key}) moves a mechanism's bold row
    to another of its figures: a later study's rule may judge on another figure than the
    second study's (runs/mech2/RULE.txt), which CHECKS marks."""
    primary = primary or {}
    out = ["| mechanism | claim (the paper's, or what the switch itself does) | larger - smaller (per seed) "
           "| mean ± std | expected direction | > 2 std |", "|---|---|---|---|---|---|"]
    for mech, claim, larger, smaller, key, scale, fmt, bold in CHECKS:
        diffs = [scale * d for d in paired(rows, larger, smaller, key)]
        if not diffs:
            continue
        m, sd = _stats(diffs)
        per_seed = ", ".join(fmt.format(d) for d in diffs)
        if mech in primary:
            bold = key == primary[mech]
        name = f"**{mech}**" if bold else mech
        out.append(f"| {name} | {claim} | {larger} - {smaller}: {per_seed} | {fmt.format(m)} ± "
                   f"{fmt.format(sd).lstrip('+')} | {'yes' if m > 0 else 'no'} | "
                   f"{'yes' if m > 0 and m > 2 * sd and len(diffs) > 1 else 'no'} |")
    return "\n".join(out)


def cumulative_table(rows: list[dict]) -> str:
    """The paper's Table 1 on this task: each cumulative setting's held-out accuracy (mean of
    the last two evaluations) and its paired difference from naive GRPO, beside the paper's."""
    by = {(r["setting"], r["seed"]): r for r in rows}
    out = ["| setting | seeds | held-out avg@4, step 0 | held-out avg@4, last 2 evals | minus GRPO, per seed "
           "| minus GRPO, mean ± std | entropy (last 5) | truncated %, all steps | paper (AIME avg@32) |",
           "|---|---|---|---|---|---|---|---|---|"]

    def ms(vals, fmt="{:.1f}"):
        m, sd = _stats(vals)
        return f"{fmt.format(m)} ± {fmt.replace('+', '').format(sd)}"

    for name, paper in PAPER.items():
        n = "cum_" + name.lstrip("+")
        seeds = sorted(s for (k, s) in by if k == n)
        if not seeds:
            continue
        rs = [by[(n, s)] for s in seeds]
        diffs = [100 * (by[(n, s)]["accuracy_last2"] - by[("cum_grpo", s)]["accuracy_last2"])
                 for s in seeds if ("cum_grpo", s) in by]
        per_seed, mean_sd = ("", "") if n == "cum_grpo" or not diffs else (
            ", ".join(f"{d:+.1f}" for d in diffs), ms(diffs, "{:+.1f}"))
        out.append(f"| {name} | {len(rs)} | {ms([100 * r['initial_accuracy'] for r in rs])} "
                   f"| {ms([100 * r['accuracy_last2'] for r in rs])} | {per_seed} | {mean_sd} "
                   f"| {ms([r['entropy_last5'] for r in rs], '{:.3f}')} "
                   f"| {ms([100 * r['truncated_all'] for r in rs])} | {paper} |")
    return "\n".join(out) if len(out) > 2 else ""


SAMPLES_X = "eval/avg@k by samples"  # the panel whose x axis is the responses generated so far
PANELS = (("eval/avg@k", "held-out avg@4"), ("actor/entropy", "entropy (train batch)"),
          ("response/length_mean", "response length, mean"), ("response/length_max", "response length, max"),
          ("response/truncated_frac", "truncated share (train batch)"),
          ("actor/clip_frac_high", "clip fraction high (A>0, r>1+eps_high)"),
          ("actor/clip_frac_low", "clip fraction low (A<0, r<1-eps_low)"),
          ("eval/truncated_frac", "truncated share (held-out)"),
          ("train/accuracy", "accuracy (train batch)"),
          (SAMPLES_X, "held-out avg@4 vs responses generated"))


def plot(rows: list[dict], group: str, path: str) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [n for n in MECHANISMS[group] if any(r["setting"] == n for r in rows)]
    if len(present) < 2:
        return False
    per_step = _samples_per_step(rows[0]["config"])
    fig, axes = plt.subplots(2, 5, figsize=(22, 7))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, title) in zip(axes.flat, PANELS):
        for i, n in enumerate(present):
            runs = [r for r in rows if r["setting"] == n]
            if key == SAMPLES_X:
                # Each seed on its own (their x values differ): held-out accuracy against the
                # responses generated so far, in units of one step without dynamic sampling,
                # the comparison at equal samples (Fig. 6).
                for j, r in enumerate(runs):
                    pts = [(c.get("rollout/generated_samples_total", 0.0) / per_step, c["eval/avg@k"])
                           for c in r["curve"] if "eval/avg@k" in c]
                    ax.plot(*zip(*pts), color=colors[i % len(colors)], alpha=0.6, marker="o", ms=3,
                            label=n if j == 0 else None)
                continue
            by_step: dict[int, list[float]] = {}
            for r in runs:
                for c in r["curve"]:
                    if key in c:
                        by_step.setdefault(c["step"], []).append(c[key])
            steps = sorted(by_step)
            if not steps:
                continue
            means = [sum(by_step[s]) / len(by_step[s]) for s in steps]
            ax.plot(steps, means, color=colors[i % len(colors)], label=f"{n} ({len(runs)} seeds)",
                    marker="o" if key.startswith("eval/") else None, ms=3)
            ax.fill_between(steps, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps],
                            color=colors[i % len(colors)], alpha=0.15)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(f"responses generated / {per_step}" if key == SAMPLES_X else "step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    budgets = sorted({r["budget_steps"] for r in rows if r["setting"] in present})
    configs = sorted({r.get("config", CONFIG) for r in rows if r["setting"] in present})
    fig.suptitle(f"{group}: mean over seeds, band = min..max ({', '.join(configs)}, "
                 f"{'/'.join(map(str, budgets))} steps per run)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def summarize(path: str, plot_dir: str, primary: dict[str, str] | None = None) -> str:
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    # The figures from each record's curve again, so a figure added to `summary` covers old records.
    rows = [{**r, **summary(r["curve"])} for r in rows]
    rows += equal_samples_rows(rows)
    text = tables(rows) + "\n### paired differences (bold: the figure the 3-of-4 goal is judged on)\n\n" + \
        check_table(rows, primary)
    cumulative = cumulative_table(rows)
    if cumulative:
        text += "\n\n### cumulative (Table 1): held-out accuracy against naive GRPO, paired by seed\n\n" + cumulative
    with open(os.path.splitext(path)[0] + "_tables.md", "w") as f:
        f.write(text + "\n")
    os.makedirs(plot_dir, exist_ok=True)
    for group in MECHANISMS:
        plot(rows, group, os.path.join(plot_dir, f"mechanisms_{group}.png"))
    return text


def warm_start_report(config: str, samples: int = 8, seed: int = 1) -> str:
    """What RL starts from: the config's warm start on the whole held-out split, `samples`
    responses per problem at the eval temperature, by chain length n: accuracy, truncated
    share, how many problems' groups are mixed (0 < #correct < samples), the only groups
    that carry a gradient (DAPO sec. 3.2), and the response lengths: their mean and the spread
    within a group (std over a problem's samples, averaged over problems), which is what the
    token-level loss and the overlong shaping act on. A second table sorts the responses into
    those that end without a `check` line, those that re-check and end, and those cut at the
    length limit: whether the long ones are the low-quality ones."""
    from dapo_megatron.config import load_config
    from dapo_megatron.controller.task import load_task
    from dapo_megatron.reward import compute_score
    from dapo_megatron.rollout.embedded import EmbeddedEngine, build_hf_model
    from dapo_megatron.rollout.protocol import SamplingParams
    from safetensors.torch import load_file

    cfg = load_config(os.path.join(ROOT, config))
    task = load_task(cfg)
    tok = task.tokenizer
    model = build_hf_model(cfg.model.hf_config_dict(vocab_size=cfg.model.vocab_size or tok.vocab_size))
    model.load_state_dict(load_file(os.path.join(ROOT, cfg.model.hf_dir, "model.safetensors")), strict=False)
    model.tie_weights()
    model.eval()
    params = SamplingParams(n=samples, max_new_tokens=cfg.algo.max_response_length, temperature=cfg.eval.temperature,
                            top_p=cfg.eval.top_p, stop_token_ids=(tok.eos_id,), seed=seed)
    groups = EmbeddedEngine(model=model, max_batch_size=512).generate(
        [tok.encode_prompt(ex.messages) for ex in task.eval], params)
    by_n: dict[int, list[tuple[list[bool], list[bool]]]] = {}
    kinds: dict[str, list[tuple[bool, int]]] = {"ends without re-checking": [], "re-checks and ends": [],
                                                 "cut at the limit": []}
    for ex, group in zip(task.eval, groups):
        texts = [tok.decode(g.token_ids) for g in group]
        hits = [compute_score(text, ex.ground_truth).correct for text in texts]
        cut = [g.finish_reason == "length" for g in group]
        for text, hit, is_cut, g in zip(texts, hits, cut, group):
            kind = ("cut at the limit" if is_cut else
                    "re-checks and ends" if "check " in text else "ends without re-checking")
            kinds[kind].append((hit, len(g.token_ids)))
        lengths = [len(g.token_ids) for g in group]
        by_n.setdefault(ex.metadata["solution"].count("\n"), []).append((hits, cut, lengths))
    lines = [f"{config}: {cfg.model.hf_dir}, {len(task.eval)} held-out problems x {samples} samples, "
             f"max_response_length {cfg.algo.max_response_length}",
             "| n | problems | accuracy % | truncated % | mixed groups | length mean | length std within a group |",
             "|---|---|---|---|---|---|---|"]
    for n in sorted(by_n) + ["all"]:
        rows = by_n[n] if n != "all" else [x for v in by_n.values() for x in v]
        hits = [h for hs, _, _ in rows for h in hs]
        cut = [c for _, cs, _ in rows for c in cs]
        mixed = sum(0 < sum(hs) < samples for hs, _, _ in rows)
        lens = [x for _, _, ls in rows for x in ls]
        spread = sum(_stats([float(x) for x in ls])[1] for _, _, ls in rows) / len(rows)
        lines.append(f"| {n} | {len(rows)} | {100 * sum(hits) / len(hits):.1f} | {100 * sum(cut) / len(cut):.1f} "
                     f"| {mixed} | {sum(lens) / len(lens):.1f} | {spread:.1f} |")
    lines += ["", "| response | count | accuracy % | length mean |", "|---|---|---|---|"]
    for kind, got in kinds.items():
        if got:
            lines.append(f"| {kind} | {len(got)} | {100 * sum(h for h, _ in got) / len(got):.1f} "
                         f"| {sum(n for _, n in got) / len(got):.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", default="clip,loss,overlong,dynamic",
                   help="comma-separated subset of: " + ", ".join(MECHANISMS))
    p.add_argument("--seeds", type=int, default=3, help="seeds first-seed .. first-seed+N-1")
    p.add_argument("--first-seed", type=int, default=1)
    p.add_argument("--steps", type=int, default=32, help="training steps per run (all runs)")
    p.add_argument("--eval-every", type=int, default=4, help="held-out eval every N steps (all runs)")
    p.add_argument("--eval-prompts", type=int, default=100, help="held-out problems per eval (all runs)")
    p.add_argument("--only", default="", help="comma-separated settings to run (default: all of --groups)")
    p.add_argument("--set", dest="shared", action="append", default=[], metavar="KEY=VALUE",
                   help="a config change shared by every run of the study (repeatable; recorded in each record)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (each its own trainer and Ray cluster)")
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--out", default="runs/mechanisms/results.jsonl")
    p.add_argument("--plots", default=None, help="directory for the PNGs (default: beside --out)")
    p.add_argument("--summarize", metavar="JSONL", help="only rebuild the tables and plots")
    p.add_argument("--primary", action="append", default=[], metavar="GROUP=KEY",
                   help="judge GROUP (clip, loss, overlong, dynamic) on the record figure KEY, as a "
                        "study's rule fixed it (default: the second study's, runs/mech2/RULE.txt)")
    p.add_argument("--warm-start-report", action="store_true",
                   help="only print the warm start's held-out accuracy, truncation and mixed groups by chain length")
    args = p.parse_args(argv)
    try:
        primary = primaries(args.primary)
    except ValueError as e:
        p.error(str(e))
    if args.warm_start_report:
        print(warm_start_report(args.config))
        return 0
    if args.summarize:
        print(summarize(args.summarize, args.plots or os.path.dirname(os.path.abspath(args.summarize)), primary))
        return 0
    groups = args.groups.split(",")
    for g in groups:
        if g not in MECHANISMS:
            p.error(f"--groups: unknown group {g!r} (one of {', '.join(MECHANISMS)})")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    done = set()
    if os.path.exists(args.out):
        with open(args.out) as f:
            done = {(r["setting"], r["seed"]) for r in map(json.loads, filter(str.strip, f))}
    # Seed-major: every pair gets its first seed before any gets its third.
    plan, seen = [], set()
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for g in groups:
            for name, overrides in MECHANISMS[g].items():
                if name in DERIVED or (args.only and name not in args.only.split(",")):
                    continue
                if (name, seed) not in done and (name, seed) not in seen:
                    seen.add((name, seed))
                    plan.append((name, overrides, seed))
    common = common_overrides(args.steps, args.eval_every, args.eval_prompts, args.shared)

    def one(i: int, name: str, overrides: list[str], seed: int) -> dict:
        print(f"[mechanisms] {i}/{len(plan)} {name} seed {seed} ...", flush=True)
        return run_one(name, overrides, seed, out_dir, args.config, common, args.steps)

    # Records are appended as runs finish (in any order); the plan's order only decides what starts first.
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(one, i, *item) for i, item in enumerate(plan, 1)]
        failed = 0
        for fut in concurrent.futures.as_completed(futures):
            try:
                rec = fut.result()
            except RuntimeError as e:  # one failed run must not stop the others; rerun resumes
                print(f"[mechanisms] {e}", flush=True)
                failed += 1
                continue
            with open(args.out, "a") as f:  # the record first: a run's figures are never lost
                f.write(json.dumps(rec) + "\n")
            print(f"[mechanisms] {rec['setting']} seed {rec['seed']}: held-out {_fmt(rec['initial_accuracy'])} -> "
                  f"{_fmt(rec['final_accuracy'])}, entropy {_fmt(rec['entropy_last5'])}, truncated "
                  f"{_fmt(rec['truncated_last5'])}, {rec['steps']} steps in {rec['seconds']:.0f}s", flush=True)
    print(summarize(args.out, args.plots or out_dir, primary))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
