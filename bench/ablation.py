"""The DAPO paper's ablation (Table 1) in miniature, on the embedded task.

Six cumulative settings, in the paper's order, each a handful of config values:

    grpo            naive GRPO: seq-mean loss, symmetric clip 0.2, no filtering, no shaping
    +overlong_filter  mask truncated samples out of the loss
    +clip_higher    eps_high 0.28
    +soft_overlong  soft overlong punishment R_len
    +token_loss     token-level loss (normalise by all tokens of the batch)
    dapo            + dynamic sampling (full DAPO)

Every run is the real trainer (`dapo_megatron.cli train`, one subprocess per run) on
`examples/tiny_cpu.yaml`, with the same budget of generated responses per run
(`trainer.sample_budget`: every response the engines generate, kept, dropped, aborted or
left unscored), so dynamic sampling pays for the groups it drops. The task is
made to exercise every switch: `algo.max_response_length` is tight enough that some
responses are truncated, and the prompts mix easy and hard problems, so some groups are
all-correct or all-wrong.

    python bench/ablation.py --configs grpo,dapo --seeds 2 --out runs/ablation/results.jsonl
    python bench/ablation.py --summarize runs/ablation/results.jsonl   # table + PNG only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Paper, Table 1: AIME 2024 avg@32 of Qwen2.5-32B.
PAPER = {"grpo": 30, "+overlong_filter": 36, "+clip_higher": 38, "+soft_overlong": 41,
         "+token_loss": 42, "dapo": 50}

NAIVE = ["algo.loss_agg=seq-mean-token-mean", "algo.eps_high=0.2", "algo.dynamic_sampling=false",
         "algo.overlong_filter=false", "algo.soft_overlong=false", "algo.kl_coef=0.0"]
STEPS = [
    ("grpo", []),
    ("+overlong_filter", ["algo.overlong_filter=true"]),
    ("+clip_higher", ["algo.eps_high=0.28"]),
    ("+soft_overlong", ["algo.soft_overlong=true"]),
    ("+token_loss", ["algo.loss_agg=token-mean"]),
    ("dapo", ["algo.dynamic_sampling=true"]),
]
# Shared by every setting: the ablation's task and budget (not tuned per row).
COMMON = ["algo.max_response_length=28", "algo.overlong_buffer=6", "eval.every=5",
          "checkpoint.save_every=0", "checkpoint.resume=false", "trainer.max_steps=1000"]


def settings() -> dict[str, list[str]]:
    out, acc = {}, list(NAIVE)
    for name, extra in STEPS:
        acc = acc + extra
        out[name] = list(acc)
    return out


def run_one(name: str, overrides: list[str], seed: int, out_dir: str, config: str, budget: int) -> dict:
    run_dir = os.path.join(out_dir, f"{name.lstrip('+')}_seed{seed}")
    args = [sys.executable, "-m", "dapo_megatron.cli", "train", config, *COMMON, *overrides,
            f"trainer.seed={seed}", f"trainer.run_dir={run_dir}", f"trainer.sample_budget={budget}"]
    t0 = time.perf_counter()
    with open(os.path.join(out_dir, f"{name.lstrip('+')}_seed{seed}.log"), "w") as log:
        proc = subprocess.run(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{name} seed {seed} failed (exit {proc.returncode}); see {log.name}")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    evals = [(r["step"], r["eval/avg@k"]) for r in records if r.get("eval/avg@k") is not None]
    train = [r for r in records if r["step"] > 0]

    def last(key):
        vals = [r[key] for r in train if r.get(key) is not None]
        return vals[-1] if vals else None

    return {
        "setting": name, "seed": seed, "paper_aime_avg32": PAPER[name],
        "initial_accuracy": evals[0][1] if evals else None,
        "final_accuracy": evals[-1][1] if evals else None,
        "best_accuracy": max(v for _, v in evals) if evals else None,
        "entropy": last("actor/entropy"), "response_length": last("response/length_mean"),
        "truncated_frac": last("response/truncated_frac"),
        "generated_groups": sum(r.get("dynamic_sampling/generated", 0) for r in train),
        "kept_groups": sum(r.get("dynamic_sampling/kept", 0) for r in train),
        # The budget's count (every response the engines generated) and the part trained on.
        "generated_responses": last("rollout/generated_samples_total"),
        "used_responses": sum(r.get("rollout/used_responses", 0) for r in train),
        "steps": len(train), "seconds": seconds,
        "curve": [{"step": r["step"], "eval": r.get("eval/avg@k"), "entropy": r.get("actor/entropy")}
                  for r in records],
    }


def summarize(path: str) -> str:
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    names = [n for n, _ in STEPS if any(r["setting"] == n for r in rows)]
    lines = ["| setting | final held-out avg@k (mean ± std) | best | runs | entropy | truncated | kept/generated groups "
             "| responses generated/trained on | paper (AIME avg@32) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        rs = [r for r in rows if r["setting"] == n]
        fin = [r["final_accuracy"] for r in rs]
        mean = sum(fin) / len(fin)
        std = math.sqrt(sum((x - mean) ** 2 for x in fin) / max(1, len(fin) - 1)) if len(fin) > 1 else 0.0
        best = sum(r["best_accuracy"] for r in rs) / len(rs)
        ent = sum(r["entropy"] or 0 for r in rs) / len(rs)
        trunc = sum(r["truncated_frac"] or 0 for r in rs) / len(rs)
        kept = sum(r["kept_groups"] for r in rs) / len(rs)
        gen = sum(r["generated_groups"] for r in rs) / len(rs)
        # Records made before every response was counted lack these fields.
        true = [r for r in rs if r.get("used_responses")]
        responses = (f"{sum(r['generated_responses'] for r in true) / len(true):,.0f}/"
                     f"{sum(r['used_responses'] for r in true) / len(true):,.0f}") if true else "not recorded"
        lines.append(f"| {n} | {100 * mean:.1f} ± {100 * std:.1f} | {100 * best:.1f} | {len(rs)} | "
                     f"{ent:.3f} | {100 * trunc:.1f}% | {kept:.0f}/{gen:.0f} | {responses} | {PAPER[n]} |")
    table = "\n".join(lines)
    with open(os.path.splitext(path)[0] + "_table.md", "w") as f:
        f.write(table + "\n")
    _plot(rows, names, os.path.splitext(path)[0] + ".png")
    return table


def _plot(rows, names, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, n in enumerate(names):
        for j, r in enumerate(r for r in rows if r["setting"] == n):
            ev = [(c["step"], c["eval"]) for c in r["curve"] if c["eval"] is not None]
            en = [(c["step"], c["entropy"]) for c in r["curve"] if c["entropy"] is not None]
            label = n if j == 0 else None
            if ev:
                ax1.plot(*zip(*ev), color=colors[i % len(colors)], alpha=0.8, marker="o", ms=2, label=label)
            if en:
                ax2.plot(*zip(*en), color=colors[i % len(colors)], alpha=0.8, label=label)
    ax1.set_title("held-out avg@k")
    ax2.set_title("policy entropy (train batch)")
    for ax in (ax1, ax2):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default=",".join(n for n, _ in STEPS),
                   help="comma-separated subset of: " + ", ".join(n.lstrip("+") for n, _ in STEPS))
    p.add_argument("--seeds", type=int, default=3, help="seeds per setting: first-seed .. first-seed+N-1")
    p.add_argument("--first-seed", type=int, default=1)
    p.add_argument("--budget", type=int, default=8192,
                   help="responses the engines may generate per run (trainer.sample_budget)")
    p.add_argument("--config", default="examples/tiny_cpu.yaml")
    p.add_argument("--out", default="runs/ablation/results.jsonl")
    p.add_argument("--summarize", metavar="JSONL", help="only rebuild the table and plot")
    args = p.parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return 0
    table = settings()
    wanted = [c if c in table else "+" + c for c in args.configs.split(",")]
    for c in wanted:
        if c not in table:
            p.error(f"--configs: unknown setting {c.lstrip('+')!r}")
    out_dir = os.path.dirname(os.path.abspath(args.out)) or "."
    os.makedirs(out_dir, exist_ok=True)
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for name in wanted:
            print(f"[ablation] {name} seed {seed} ...", flush=True)
            rec = run_one(name, table[name], seed, out_dir, args.config, args.budget)
            print(f"[ablation] {name} seed {seed}: held-out {rec['initial_accuracy']:.3f} -> "
                  f"{rec['final_accuracy']:.3f} (best {rec['best_accuracy']:.3f}) in {rec['seconds']:.0f}s",
                  flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(rec) + "\n")
    print(summarize(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
