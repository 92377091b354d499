"""Per-step metrics: metrics.jsonl, TensorBoard / wandb when asked for, one console line,
and a PNG of the curves that matter for DAPO (reward, accuracy, entropy, response length)."""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

logger = logging.getLogger("dapo_megatron")

# The console line: (metric key, label, format). Missing keys are skipped.
_CONSOLE = (
    ("reward/mean", "reward", "{:+.3f}"),
    ("train/accuracy", "acc", "{:.3f}"),
    ("eval/avg@k", "eval", "{:.3f}"),
    ("dynamic_sampling/kept", "kept", "{:.0f}"),
    ("dynamic_sampling/generated", "gen", "{:.0f}"),
    ("dynamic_sampling/rounds", "rounds", "{:.0f}"),
    # Responses the engines generated this step (the budget's count) vs those trained on.
    ("rollout/generated_responses", "resp gen", "{:.0f}"),
    ("rollout/used_responses", "used", "{:.0f}"),
    ("response/length_mean", "len", "{:.1f}"),
    ("actor/entropy", "ent", "{:.3f}"),
    ("actor/grad_norm", "gnorm", "{:.3f}"),
    ("mismatch/logprob_abs_diff_max", "mism", "{:.1e}"),
    ("time/step", "s", "{:.1f}"),
)


class MetricsLogger:
    """Appends one JSON record per step.

    ``resume_step``: the step of the checkpoint the run resumed from, or None for a run
    that starts from scratch. metrics.jsonl is rewritten from that point: records of
    steps up to ``resume_step`` are kept (one per step, the newest), later ones and, for a
    fresh start, all of them are dropped, because the run is about to log those steps
    again (e.g. after a failed start, which logged step 0 and wrote no checkpoint).
    """

    def __init__(self, run_dir: str, *, tensorboard: bool = False, wandb: bool = False,
                 wandb_project: str = "dapo-megatron", config: dict | None = None,
                 resume_step: int | None = None, max_steps: int | None = None) -> None:
        self.max_steps = max_steps
        self.path = os.path.join(run_dir, "metrics.jsonl")
        os.makedirs(run_dir, exist_ok=True)
        self.records = [] if resume_step is None else _read_records(self.path, upto_step=resume_step)
        # Rewrite so a crash after the last checkpoint leaves no steps that will be redone.
        with open(self.path, "w", encoding="utf-8") as f:
            for rec in self.records:
                f.write(json.dumps(rec) + "\n")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
            except ImportError:
                logger.warning("logging.tensorboard=true but tensorboard is not installed; skipping it")
        self._wandb = None
        if wandb:
            try:
                import wandb as wandb_mod

                self._wandb = wandb_mod.init(project=wandb_project, config=config, resume="allow")
            except ImportError:
                logger.warning("logging.wandb=true but wandb is not installed; skipping it")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(record, step=step)
        logger.info(console_line(step, record, self.max_steps))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def console_line(step: int, record: dict[str, Any], max_steps: int | None = None) -> str:
    parts = [f"step {step}" + (f"/{max_steps}" if max_steps else "")]
    for key, label, fmt in _CONSOLE:
        value = record.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            parts.append(f"{label} {fmt.format(value)}")
    return " | ".join(parts)


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _read_records(path: str, upto_step: int) -> list[dict]:
    if not os.path.exists(path):
        return []
    by_step: dict[int, dict] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash mid-write
            step = rec.get("step", 0)
            if isinstance(step, int) and step <= upto_step:
                by_step[step] = rec  # a step logged twice (an older version's restart): the newest
    return [by_step[s] for s in sorted(by_step)]


def warn_if_no_learning_signal(step: int, batch) -> None:
    """Warn when every advantage of the batch is zero (all rewards equal within every
    group, e.g. with algo.dynamic_sampling=false): such an update moves nothing but weight
    decay, and the console shows only ``gnorm 0.000``. ``batch``: a RolloutBatch."""
    kept = batch.advantages[batch.loss_weights > 0]
    if kept.numel() == 0 or float(kept.abs().max()) < 1e-6:
        logger.warning("step %d: no learning signal: every response's advantage is zero (equal "
                       "rewards within each group), so this update changes nothing; the data is "
                       "too hard or too easy for the model (algo.dynamic_sampling=true drops such "
                       "groups and samples more)", step)


def run_summary(records: list[dict], run_dir: str, checkpoint_dir: str,
                newest_checkpoint: str | None) -> str:
    """The end-of-run summary: steps, held-out accuracy first -> last, where things are."""
    steps = [r["step"] for r in records if isinstance(r.get("step"), int)]
    lines = [f"run finished: {max(steps) if steps else 0} steps"
             + (f" logged ({len(steps)} records)" if steps else "")]
    evals = [(r["step"], r["eval/avg@k"]) for r in records
             if isinstance(r.get("eval/avg@k"), (int, float))]
    if evals:
        (s0, a0), (s1, a1) = evals[0], evals[-1]
        lines.append(f"  held-out avg@k: {a0:.3f} (step {s0})"
                     + (f" -> {a1:.3f} (step {s1})" if s1 != s0 else ""))
    skipped = [r for r in records if r.get("step", 0) > 0 and "actor/grad_norm" not in r]
    if skipped:
        lines.append(f"  steps without an update (no kept group): {len(skipped)}")
    lines.append(f"  metrics: {os.path.join(run_dir, 'metrics.jsonl')}")
    lines.append(f"  plot:    {os.path.join(run_dir, 'metrics.png')}")
    lines.append(f"  checkpoints: {checkpoint_dir}"
                 + (f" (newest: {os.path.basename(newest_checkpoint)})" if newest_checkpoint else " (none)"))
    return "\n".join(lines)


def plot_metrics(records: list[dict], path: str) -> None:
    """Reward, accuracy (train and held-out), entropy and response length over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("reward", ("reward/mean",)),
        ("accuracy", ("train/accuracy", "eval/avg@k")),
        ("entropy", ("actor/entropy",)),
        ("response length", ("response/length_mean", "response/length_max")),
    )
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (title, keys) in zip(axes.flat, panels):
        for key in keys:
            pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if key.startswith("eval") else None, ms=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
