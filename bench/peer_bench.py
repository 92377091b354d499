"""Peer benchmark: this trainer against Hugging Face TRL's GRPOTrainer on the embedded default.

Both start from the same warm start (`model.hf_dir`, examples/tiny_warm_start), see the same
training prompts with the same character-token ids (the parent builds them once with
`load_task` and hands TRL the ids), are rewarded by this project's rule reward plus the soft
overlong term (dapo_megatron.reward, dapo_megatron.algo.overlong), and get the same number of
generated responses (`--budget`: our `trainer.sample_budget`, which counts every response the
engines generate, dynamic sampling's dropped groups included; TRL generates exactly
train_batch_size x G per rollout batch, so it gets budget / (train_batch_size x G) of them).

TRL is configured like examples/tiny_cpu.yaml: `loss_type="dapo"` (token-level loss over
the whole batch), epsilon eps_low / epsilon_high eps_high, beta 0 (no KL), G responses per
prompt, the same max response length, temperature and top_p, lr / warmup / weight decay /
AdamW betas / grad clip from `optimizer`, rewards scaled by the group std, and
train_batch_size x G completions per rollout batch split into train/mini-batch optimizer
steps (2 for the yaml), one pass each (num_iterations 1). What TRL does not have is dynamic
sampling; its flat groups simply give no gradient.

Held-out accuracy is one procedure for both: controller/eval_phase.py `evaluate` (avg@k on the
held-out split, eval.k samples at eval.temperature / eval.top_p, scored by the project's
reward). Ours runs it in the loop every `--eval-every` steps and once at the end; TRL's
weights are snapshotted every `--trl-snapshot-every` rollout batches by a callback (the
snapshot's own seconds are not counted) and the parent evaluates each snapshot afterwards by
loading it into the embedded engine (the same engine class our trainer samples with) and
calling the same `evaluate`. A run's clock starts when its process is launched (interpreter,
imports, Ray / model start-up included) and excludes evaluation time on both sides.

Schedules (`--schedule`): side-by-side runs both at once, ours pinned to core 0 and TRL to
core 1 (`taskset`), one thread each; back-to-back runs ours and then TRL, each alone on
core 0. Seeds run one after the other. Per seed the bench prints both curves and
`seed S: ...`; the last line is

    peer wall clock to equal held-out accuracy: dapo-megatron X s, TRL Y s, ratio R

where, per seed, the target is the lower of the two final accuracies and each side's time is
the first evaluation at or above it; X and Y are the means over seeds, R = X / Y.

Before it, each seed's updates to the target and seconds per optimizer update on each side,
and a floor under R (`per_update`): the seconds of our training phase alone, for the updates
ours took to the target, against TRL's seconds to it. No cut to generation, rewards, weight
sync or start-up takes R below that floor; only cheaper updates or fewer of them can.

TRL is an optional bench dependency, never one of the package: it runs in its own
interpreter (`--trl-python`, default /work/trl-venv/bin/python or $PEER_TRL_PYTHON), made with

    python3 -m venv /work/trl-venv
    /work/trl-venv/bin/pip install torch==2.13.0 trl==1.16.0 transformers==5.24.0

(transformers pinned to the version this project's venv runs, which loads the warm start).

    python bench/peer_bench.py                       # side by side, seeds 1,2
    python bench/peer_bench.py --seeds 1 --budget 4096 --schedule back-to-back
    python bench/peer_bench.py --report --out runs/peer_s11   # a finished run's lines again
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DEFAULT_TRL_PYTHON = os.environ.get("PEER_TRL_PYTHON", "/work/trl-venv/bin/python")
LAST_LINE = "peer wall clock to equal held-out accuracy: dapo-megatron {x:.0f} s, TRL {y:.0f} s, ratio {r:.2f}"


# ---------------------------------------------------------------- the TRL configuration
def trl_settings(cfg, *, seed: int, budget: int, snapshot_every: int, out_dir: str) -> dict:
    """GRPOConfig keyword arguments equivalent to our config `cfg` (a DapoConfig).

    Pure: reads only `cfg`, so tests can check the mapping without TRL installed.
    One rollout batch = train_batch_size prompts x G completions; each optimizer step takes
    mini_batch_size x G of them, so steps_per_generation = train/mini updates per batch.
    """
    a, t, o, r, e = cfg.algo, cfg.trainer, cfg.optimizer, cfg.rollout, cfg.eval
    if t.train_batch_size % t.mini_batch_size:
        raise ValueError("trainer.train_batch_size must be a multiple of trainer.mini_batch_size")
    if a.kl_coef or a.loss != "dapo" or a.overlong_filter or a.entropy_coef:
        raise ValueError("the peer bench maps only the DAPO loss without KL, entropy or overlong filtering")
    if o.lr_decay != "constant":
        raise ValueError("the peer bench maps only optimizer.lr_decay=constant")
    updates = t.train_batch_size // t.mini_batch_size
    per_rollout = t.train_batch_size * a.group_size
    rollouts = max(1, -(-budget // per_rollout))
    return dict(
        output_dir=out_dir,
        seed=seed,
        data_seed=seed,
        loss_type="dapo",
        epsilon=a.eps_low,
        epsilon_high=a.eps_high,
        beta=0.0,
        num_generations=a.group_size,
        per_device_train_batch_size=t.mini_batch_size * a.group_size,
        gradient_accumulation_steps=1,
        steps_per_generation=updates,
        num_iterations=1,
        max_steps=rollouts * updates,
        max_completion_length=a.max_response_length,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k if r.top_k > 0 else 0,
        scale_rewards="group",
        mask_truncated_completions=False,
        learning_rate=o.lr,
        lr_scheduler_type="constant_with_warmup" if o.warmup_steps else "constant",
        warmup_steps=o.warmup_steps,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_epsilon=o.adam_eps,
        max_grad_norm=o.clip_grad if o.clip_grad > 0 else 0.0,
        gradient_checkpointing=False,  # TRL's default is True; our CPU trainer does not recompute
        use_cpu=True,
        bf16=False,
        fp16=False,
        save_strategy="no",
        report_to="none",
        logging_steps=updates * snapshot_every,
        log_completions=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    ), dict(snapshot_every_steps=updates * snapshot_every, responses_per_step=per_rollout // updates,
            eval_k=e.k)


def shaped_reward(text: str, length: int, ground_truth: str, algo) -> float:
    """The reward our batch builder gives (controller/batch.py): rule score plus R_len."""
    import torch

    from dapo_megatron.algo.overlong import overlong_penalty
    from dapo_megatron.reward import compute_score

    score = float(compute_score(text, ground_truth).score)
    if algo.soft_overlong:
        score += float(overlong_penalty(torch.tensor([length]), algo.max_response_length,
                                        algo.overlong_buffer, algo.overlong_penalty_factor)[0])
    return score


# ---------------------------------------------------------------- children
def _child_ours(args) -> None:
    """Our trainer in this process (the project's venv), its eval curve to args.curve."""
    t0 = float(os.environ["PEER_T0"])
    from dapo_megatron.config import load_config
    from dapo_megatron.controller import loop, metrics as metrics_mod

    cfg = load_config(args.config, args.overrides)
    eval_total = [0.0]
    # Optimizer updates and seconds of the training phase so far (the step records'
    # actor/updates and time/train), for the per-update figures of `per_update`.
    done = {"updates": 0, "train_s": 0.0}
    curve = open(args.curve, "w", encoding="utf-8")

    def record(step, m):
        done["updates"] += int(m.get("actor/updates", 0))
        done["train_s"] += m.get("time/train", 0.0)
        if "eval/avg@k" not in m:
            return
        eval_total[0] += m.get("time/eval", 0.0)
        curve.write(json.dumps({"step": step, "wall_s": time.time() - t0 - eval_total[0],
                                "eval_s": m.get("time/eval", 0.0), "avg": m["eval/avg@k"],
                                "responses": trainer.generated_samples, **done}) + "\n")
        curve.flush()

    original_log = metrics_mod.MetricsLogger.log

    def log(self, step, m):
        record(step, m)
        return original_log(self, step, m)

    metrics_mod.MetricsLogger.log = log
    trainer = loop.Trainer(cfg)
    try:
        records = trainer.run()
        if not any("eval/avg@k" in rec and rec["step"] == trainer.step for rec in records):
            record(trainer.step, trainer.evaluate())  # the budget ended between evaluations
    finally:
        trainer.shutdown()
        curve.close()


def _child_trl(args) -> None:
    """TRL's GRPOTrainer in this process (the TRL venv); snapshots + times to args.out."""
    t0 = float(os.environ["PEER_T0"])
    import torch
    from datasets import Dataset
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from dapo_megatron.config import load_config

    torch.set_num_threads(1)
    with open(args.task, encoding="utf-8") as f:
        task = json.load(f)
    cfg = load_config(task["config"], task["overrides"])
    kwargs, info = trl_settings(cfg, seed=args.seed, budget=args.budget,
                                snapshot_every=args.trl_snapshot_every, out_dir=args.out)
    tokenizer = char_tokenizer_hf(task["itos"], task["bos_id"], task["eos_id"], task["pad_id"])
    for text, ids in zip(task["prompts"], task["prompt_ids"]):
        got = tokenizer(text, add_special_tokens=False)["input_ids"]
        if got != ids:
            raise SystemExit(f"TRL's tokenizer gives {got} for {text!r}, ours {ids}")
    model = AutoModelForCausalLM.from_pretrained(task["hf_dir"], dtype=torch.float32)
    model.generation_config.eos_token_id = task["eos_id"]
    model.generation_config.pad_token_id = task["pad_id"]
    model.generation_config.bos_token_id = task["bos_id"]
    itos, specials = task["itos"], task["num_specials"]

    def reward(prompts, completions, completion_ids, ground_truth, **_):
        out = []
        for ids, gt in zip(completion_ids, ground_truth):
            text = "".join(itos[i] for i in ids if specials <= i < len(itos))  # CharTokenizer.decode
            out.append(shaped_reward(text, len(ids), gt, cfg.algo))
        return out

    snaps = os.path.join(args.out, "snapshots")
    os.makedirs(snaps, exist_ok=True)
    timeline = open(os.path.join(args.out, "timeline.jsonl"), "w", encoding="utf-8")
    paused = [0.0]

    def snapshot(step):
        t = time.time()
        wall = t - t0 - paused[0]
        state = {k: v.detach().clone().contiguous() for k, v in trainer.model.state_dict().items()
                 if k != "lm_head.weight" or not model.config.tie_word_embeddings}
        path = os.path.join(snaps, f"step_{step}.safetensors")
        save_file(state, path)
        timeline.write(json.dumps({"step": step, "wall_s": wall, "path": path,
                                   "responses": step * info["responses_per_step"]}) + "\n")
        timeline.flush()
        paused[0] += time.time() - t

    class Snapshots(TrainerCallback):
        def on_train_begin(self, _args, state, control, **kw):
            snapshot(0)

        def on_step_end(self, _args, state, control, **kw):
            if state.global_step % info["snapshot_every_steps"] == 0 or state.global_step >= state.max_steps:
                snapshot(state.global_step)

    dataset = Dataset.from_dict({"prompt": task["prompts"], "ground_truth": task["ground_truths"]})
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(**kwargs),
                          train_dataset=dataset, processing_class=tokenizer, callbacks=[Snapshots()])
    trainer.train()
    timeline.close()


def char_tokenizer_hf(itos: list[str], bos_id: int, eos_id: int, pad_id: int):
    """Our CharTokenizer (data/tokenizer.py) as a `transformers` fast tokenizer with the same
    ids: one token per character, the specials matched whole (TRL needs a processing_class)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(itos)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=itos[bos_id], eos_token=itos[eos_id],
                                  pad_token=itos[pad_id], unk_token="?", padding_side="left")
    return tok


# ---------------------------------------------------------------- the parent
def _task_file(cfg_path: str, overrides: list[str], path: str) -> dict:
    """What TRL must see, built once by our own code: prompts (text, with <bos> as our
    tokenizer puts it), their ids, ground truths, the character vocabulary."""
    from dapo_megatron.config import load_config
    from dapo_megatron.controller.task import load_task

    cfg = load_config(cfg_path, overrides)
    task = load_task(cfg)
    tok = task.tokenizer
    if not task.embedded:
        raise SystemExit("the peer bench runs the embedded task (data.train_path must be empty)")
    prompt_ids = [tok.encode_prompt(ex.messages) for ex in task.train]
    prompts = [tok.itos[ids[0]] + tok.decode(ids[1:]) for ids in prompt_ids]
    data = {"config": cfg_path, "overrides": overrides, "hf_dir": os.path.join(ROOT, cfg.model.hf_dir)
            if not os.path.isabs(cfg.model.hf_dir) else cfg.model.hf_dir,
            "prompts": prompts, "prompt_ids": prompt_ids, "ground_truths": [ex.ground_truth for ex in task.train],
            "itos": tok.itos, "num_specials": len(tok.SPECIALS), "bos_id": tok.bos_id, "eos_id": tok.eos_id,
            "pad_id": tok.pad_id}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)
    return data


def _launch(cmd: list[str], core: int, log_path: str, nice: int, pythonpath: str) -> tuple[subprocess.Popen, float]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=pythonpath,
               TOKENIZERS_PARALLELISM="false")
    t0 = time.time()
    env["PEER_T0"] = repr(t0)
    # `nice` adds to this process's niceness; the children get `nice` itself.
    full = ["taskset", "-c", str(core), "nice", "-n", str(max(0, nice - os.nice(0))), *cmd]
    log = open(log_path, "w", encoding="utf-8")
    return subprocess.Popen(full, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), t0


def _wait(procs: dict[str, tuple[subprocess.Popen, float, str]]) -> dict[str, float]:
    """Wait for every process; each one's wall seconds from launch to its own exit."""
    walls: dict[str, float] = {}
    while len(walls) < len(procs):
        for name, (proc, t0, log_path) in procs.items():
            if name in walls or proc.poll() is None:
                continue
            walls[name] = time.time() - t0
            if proc.returncode:
                with open(log_path, encoding="utf-8") as f:
                    tail = f.read()[-3000:]
                for other, _, _ in procs.values():
                    if other.poll() is None:
                        other.kill()
                raise SystemExit(f"{name} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
        time.sleep(0.5)
    return walls


def _evaluate_snapshots(cfg_path: str, overrides: list[str], timeline_path: str, seed: int) -> list[dict]:
    """TRL's snapshots through our eval phase, on the embedded engine, in this process."""
    import torch
    from safetensors.torch import load_file

    from dapo_megatron.config import load_config
    from dapo_megatron.controller.eval_phase import evaluate
    from dapo_megatron.controller.task import load_task
    from dapo_megatron.rollout.embedded import EmbeddedEngine, build_hf_model

    torch.set_num_threads(1)
    cfg = load_config(cfg_path, overrides)
    task = load_task(cfg)
    hf_config = cfg.model.hf_config_dict(vocab_size=cfg.model.vocab_size or task.tokenizer.vocab_size)
    model = build_hf_model(hf_config)
    engine = EmbeddedEngine(model=model, max_batch_size=512)
    engines = _LocalEngines(engine)
    curve = []
    with open(timeline_path, encoding="utf-8") as f:
        points = [json.loads(line) for line in f]
    for p in points:
        missing, unexpected = model.load_state_dict(load_file(p["path"]), strict=False)
        if unexpected or [k for k in missing if k != "lm_head.weight"]:
            raise SystemExit(f"{p['path']}: missing {missing}, unexpected {unexpected}")
        model.tie_weights()
        m = evaluate(cfg, task.eval, task.tokenizer, engines, _InlineScorer(), seed=seed)
        curve.append({"step": p["step"], "wall_s": p["wall_s"], "avg": m["eval/avg@k"],
                      "eval_s": m["time/eval"], "responses": p["responses"]})
    return curve


class _LocalEngines:
    """EnginePool.generate_streaming's contract over one in-process engine."""

    def __init__(self, engine, prompts_per_call: int = 64) -> None:
        self.engine, self.per_call = engine, prompts_per_call

    def generate_streaming(self, prompts, params, tag):
        for start in range(0, len(prompts), self.per_call):
            chunk = list(range(start, min(start + self.per_call, len(prompts))))
            out = self.engine.generate([prompts[i] for i in chunk], params,
                                       request_ids=[f"{tag}-{i}" for i in chunk])
            yield chunk, out


class _InlineScorer:
    """RewardPool.score's contract, in this process (evaluation needs no timeouts here)."""

    def score(self, texts, refs):
        from dapo_megatron.reward import compute_score

        return [compute_score(t, r) for t, r in zip(texts, refs)]


def _first_at(curve: list[dict], target: float) -> dict | None:
    """The first evaluation (by clock) at or above `target`, None if never."""
    return next((p for p in sorted(curve, key=lambda p: p["wall_s"]) if p["avg"] >= target - 1e-12), None)


def time_to(curve: list[dict], target: float) -> float | None:
    """Seconds of the first evaluation at or above `target` (None if never)."""
    point = _first_at(curve, target)
    return None if point is None else point["wall_s"]


def compare(ours: list[dict], trl: list[dict]) -> tuple[float, float, float]:
    """(target, our seconds, TRL's seconds): the target is the lower final accuracy."""
    target = min(ours[-1]["avg"], trl[-1]["avg"])
    return target, time_to(ours, target), time_to(trl, target)


def per_update(ours: list[dict], trl: list[dict], target: float) -> dict | None:
    """Where each side's clock goes per optimizer update, and the floor it puts under R.

    Clock per update: seconds from the first evaluation (start-up done) to the last, over
    the updates between them. Ours also splits out its training phase (`time/train`:
    old log-probs where computed, the updates, gradient clipping, the optimizer step).
    The floor: the updates ours took to reach `target` x its training seconds per update,
    over TRL's seconds to the target. That is R had generation, rewards, weight sync and
    start-up cost nothing: no cut outside the training phase goes below it unless ours
    learns more per update. None when a curve lacks the counts (records from before they
    were kept) or a side never got there.
    """
    o_at, t_at = _first_at(ours, target), _first_at(trl, target)
    if o_at is None or t_at is None or "updates" not in ours[-1] or not ours[-1]["updates"] \
            or not trl[-1]["step"]:
        return None
    o_clock = (ours[-1]["wall_s"] - ours[0]["wall_s"]) / ours[-1]["updates"]
    t_clock = (trl[-1]["wall_s"] - trl[0]["wall_s"]) / trl[-1]["step"]
    o_train = ours[-1]["train_s"] / ours[-1]["updates"]
    floor_s = o_at["updates"] * o_train
    return {"updates_ours": o_at["updates"], "updates_trl": t_at["step"], "clock_ours": o_clock,
            "train_ours": o_train, "clock_trl": t_clock, "floor_s": floor_s,
            "floor_ratio": floor_s / t_at["wall_s"]}


def run_seed(args, seed: int, task_path: str) -> dict:
    out = os.path.join(args.out, f"seed{seed}")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    ours_cmd = [sys.executable, os.path.abspath(__file__), "--child", "ours", "--curve", os.path.join(out, "ours_curve.jsonl"),
                "--config", args.config, f"trainer.seed={seed}", f"trainer.sample_budget={args.budget}",
                "trainer.max_steps=100000", f"eval.every={args.eval_every}", "checkpoint.save_every=0",
                "checkpoint.resume=false", "rollout.engine_num_cpus=1", "reward.num_workers=1",
                f"trainer.run_dir={os.path.join(out, 'ours_run')}", *args.overrides]
    trl_cmd = [args.trl_python, os.path.abspath(__file__), "--child", "trl", "--task", task_path,
               "--seed", str(seed), "--budget", str(args.budget), "--out", os.path.join(out, "trl"),
               "--trl-snapshot-every", str(args.trl_snapshot_every)]
    logs = {n: os.path.join(out, f"{n}.log") for n in ("ours", "trl")}
    names = {"ours": "dapo-megatron", "trl": "TRL"}
    if args.schedule == "side-by-side":
        walls = _wait({names[n]: (*_launch(cmd, core, logs[n], args.nice, ROOT), logs[n])
                       for n, cmd, core in (("ours", ours_cmd, 0), ("trl", trl_cmd, 1))})
    else:
        walls = {}
        for n, cmd in (("ours", ours_cmd), ("trl", trl_cmd)):
            walls.update(_wait({names[n]: (*_launch(cmd, 0, logs[n], args.nice, ROOT), logs[n])}))
    with open(os.path.join(out, "ours_curve.jsonl"), encoding="utf-8") as f:
        ours = [json.loads(line) for line in f]
    trl = _evaluate_snapshots(args.config, args.overrides, os.path.join(out, "trl", "timeline.jsonl"), seed)
    with open(os.path.join(out, "trl_curve.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(p) + "\n" for p in trl)
    target, x, y = compare(ours, trl)
    result = {"seed": seed, "target": target, "x": x, "y": y, "walls": walls, "ours": ours, "trl": trl,
              "k": trl_k(args), "per_update": per_update(ours, trl, target)}
    report_seed(result)
    return result


def report_seed(r: dict) -> None:
    """Print one seed's curves, its race to the target and where each side's clock went."""
    seed, target, x, y, walls = r["seed"], r["target"], r["x"], r["y"], r["walls"]
    for name, curve in (("dapo-megatron", r["ours"]), ("TRL", r["trl"])):
        print(f"seed {seed} {name}: " + ", ".join(
            f"{p['responses']} resp {p['wall_s']:.0f} s {p['avg']:.3f}" for p in curve), flush=True)
    print(f"seed {seed}: final held-out avg@{r['k']} dapo-megatron {r['ours'][-1]['avg']:.3f}, TRL "
          f"{r['trl'][-1]['avg']:.3f}; process wall dapo-megatron {walls['dapo-megatron']:.0f} s, TRL "
          f"{walls['TRL']:.0f} s; to {target:.3f}: dapo-megatron {_secs(x)}, TRL {_secs(y)}, ratio {x / y:.2f}"
          if x and y else f"dapo-megatron {_secs(x)}, TRL {_secs(y)}", flush=True)
    split = r["per_update"]
    if split:
        print(f"seed {seed}: updates to {target:.3f}: dapo-megatron {split['updates_ours']}, TRL "
              f"{split['updates_trl']}; seconds per update: dapo-megatron {split['clock_ours']:.2f} "
              f"({split['train_ours']:.2f} training), TRL {split['clock_trl']:.2f}; floor (our "
              f"training phase alone): {split['updates_ours']} x {split['train_ours']:.2f} s = "
              f"{split['floor_s']:.0f} s, ratio >= {split['floor_ratio']:.2f}", flush=True)


def report(results: list[dict]) -> None:
    """After the seeds' own lines: the floor (when every seed has one) and the last line."""
    if any(r["x"] is None or r["y"] is None for r in results):
        raise SystemExit("a side never reached the target accuracy (see the curves above)")
    x = sum(r["x"] for r in results) / len(results)
    y = sum(r["y"] for r in results) / len(results)
    if all(r.get("per_update") for r in results):
        floor = sum(r["per_update"]["floor_s"] for r in results) / len(results)
        print(f"floor (our training phase alone, for the updates it took): {floor:.0f} s "
              f"against TRL's {y:.0f} s, ratio >= {floor / y:.2f}")
    print(LAST_LINE.format(x=x, y=y, r=x / y))


def _secs(value: float | None) -> str:
    return "never" if value is None else f"{value:.0f} s"


def trl_k(args) -> int:
    from dapo_megatron.config import load_config

    return load_config(args.config, args.overrides).eval.k


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "examples/tiny_cpu.yaml"))
    parser.add_argument("overrides", nargs="*", help="dotted overrides for both trainers")
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--budget", type=int, default=25728,
                        help="generated responses per run (default: what 60 steps of tiny_cpu.yaml generated)")
    parser.add_argument("--eval-every", type=int, default=5, help="our steps between evaluations")
    parser.add_argument("--trl-snapshot-every", type=int, default=8, help="TRL rollout batches between snapshots")
    parser.add_argument("--schedule", choices=("side-by-side", "back-to-back"), default="side-by-side")
    parser.add_argument("--trl-python", default=DEFAULT_TRL_PYTHON)
    parser.add_argument("--nice", type=int, default=5, help="niceness of both runs (absolute)")
    parser.add_argument("--out", default=os.path.join(ROOT, "runs/peer"))
    parser.add_argument("--report", action="store_true",
                        help="print the lines of the finished run in --out again (no run)")
    parser.add_argument("--child", choices=("ours", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--curve", help=argparse.SUPPRESS)
    parser.add_argument("--task", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "ours":
        return _child_ours(args)
    if args.child == "trl":
        return _child_trl(args)
    if args.report:
        return report_stored(args.out, trl_k(args))
    if not os.path.exists(args.trl_python):
        raise SystemExit(f"--trl-python {args.trl_python} does not exist; make the TRL venv as this "
                         "file's docstring says")
    os.makedirs(args.out, exist_ok=True)
    task_path = os.path.join(args.out, "task.json")
    _task_file(args.config, args.overrides, task_path)
    results = [run_seed(args, int(s), task_path) for s in args.seeds.split(",")]
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    report(results)


def report_stored(out: str, k: int) -> None:
    """--report: print a finished run's lines again from its results.json, with the
    per-update figures recomputed by this code (runs that predate them get them too when
    their curves kept the update counts)."""
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        results = json.load(f)
    for r in results:
        r.setdefault("k", k)
        r["per_update"] = per_update(r["ours"], r["trl"], r["target"])
        report_seed(r)
    report(results)


if __name__ == "__main__":
    main()
