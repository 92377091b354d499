"""The whole DAPO loop on a tiny model: real Ray actors, real Megatron ranks, real engines.

- a short run writes metrics.jsonl (every phase's metrics) and the plot;
- the same config at tp=2 (two Megatron ranks in two Ray actors) gives the same step-1
  metrics as the single-rank run;
- SIGKILL of the driver mid-run, then a rerun, resumes from the last checkpoint and the
  steps after the resume equal those of an uninterrupted run.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The shipped warm start (examples/tiny_warm_start, 0.6M parameters) answers some prompts,
# so groups carry signal; a small batch keeps each run to seconds of compute.
TINY = [
    "algo.group_size=4", "algo.max_response_length=32", "algo.overlong_buffer=4", "algo.max_gen_batches=2",
    "rollout.gen_batch_size=8", "rollout.max_prompt_length=16",
    "trainer.train_batch_size=4", "trainer.mini_batch_size=2", "trainer.max_tokens_per_microbatch=256",
    "optimizer.lr=3e-4", "optimizer.warmup_steps=0",
    "data.synthetic_eval_size=8", "eval.k=2", "reward.num_workers=1",
]

# Metrics that must agree between layouts / between a resumed and an uninterrupted run.
COMPARED = ["reward/mean", "train/accuracy", "response/length_mean", "dynamic_sampling/kept",
            "dynamic_sampling/generated", "actor/loss", "actor/grad_norm", "actor/entropy",
            "actor/clip_frac_high", "actor/clip_frac_low"]


def _train(run_dir, *overrides, timeout=900, wait=True):
    args = [sys.executable, "-m", "dapo_megatron.cli", "train", "examples/tiny_cpu.yaml", *TINY,
            f"trainer.run_dir={run_dir}", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    log = open(os.path.join(os.path.dirname(run_dir), os.path.basename(run_dir) + ".log"), "w")
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if not wait:
        return proc, log.name
    rc = proc.wait(timeout=timeout)
    assert rc == 0, open(log.name).read()[-4000:]
    return _records(run_dir), log.name


def _records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, filter(str.strip, f))}


def _assert_close(a, b, keys, tol):
    for k in keys:
        if a.get(k) is None and b.get(k) is None:
            continue
        assert a.get(k) is not None and b.get(k) is not None, k
        assert abs(a[k] - b[k]) <= tol * max(1.0, abs(a[k])), (k, a[k], b[k])


@pytest.fixture(scope="module")
def single_rank_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("e2e") / "tp1")
    records, log = _train(run_dir, "trainer.max_steps=2", "eval.every=2", "checkpoint.save_every=0")
    return run_dir, records, log


def test_short_run_logs_every_phase(single_rank_run):
    run_dir, records, log = single_rank_run
    assert sorted(records) == [0, 1, 2]
    assert "eval/avg@k" in records[0] and "eval/avg@k" in records[2]
    step = records[1]
    for key in ["reward/mean", "train/accuracy", "dynamic_sampling/generated", "dynamic_sampling/kept",
                "dynamic_sampling/dropped", "dynamic_sampling/rounds", "response/length_mean",
                "response/length_max", "response/truncated_frac", "actor/entropy", "actor/clip_frac_low",
                "actor/clip_frac_high", "actor/approx_kl", "actor/grad_norm", "actor/lr",
                "mismatch/logprob_abs_diff_max", "time/generate", "time/reward", "time/old_logprobs",
                "time/train", "time/sync", "throughput/generate_tokens_per_s"]:
        assert key in step, key
    # The engine samples with the weights the policy just exported: same log-probs.
    assert step["mismatch/logprob_abs_diff_max"] < 1e-4
    assert os.path.exists(os.path.join(run_dir, "metrics.png"))
    assert "step 2/2" in open(log).read() or "step 2" in open(log).read()
    # logging.num_examine=1: one decoded response per data source, each step and each eval
    text = open(log).read()
    for tag in ("[step 1] data_source=", "[step 2] data_source=", "[eval] data_source="):
        assert text.count(tag) == (2 if tag.startswith("[eval]") else 1), tag
    assert "[response] " in text and "[ground_truth] " in text
    # Generated vs used: every group scored was generated, and more may have been (the rest
    # of a call once the batch was full, aborted requests); the budget's total adds them up.
    for s in (1, 2):
        r = records[s]
        assert r["rollout/used_responses"] == r["dynamic_sampling/returned"] * 4
        assert r["rollout/generated_responses"] >= r["dynamic_sampling/generated"] * 4
        assert r["rollout/generated_tokens"] >= r["rollout/used_tokens"] > 0
    assert records[2]["rollout/generated_samples_total"] == \
        records[1]["rollout/generated_responses"] + records[2]["rollout/generated_responses"]
    assert "resp gen" in open(log).read()


@pytest.mark.parametrize("placement", ["colocated", "disaggregated"])
def test_tp2_step1_equals_single_rank(single_rank_run, tmp_path, placement):
    """TP=2: the same step-1 metrics as one rank; step 2 samples with weights the TP=2 ranks
    pushed to the engine after a train step (colocated: buckets through Ray's object store;
    disaggregated: broadcast over a gloo weight-update group), and the engine's log-probs of
    its own samples equal the policy's."""
    _, ref, _ = single_rank_run
    records, _ = _train(str(tmp_path / "tp2"), "trainer.max_steps=2", "eval.every=0", "checkpoint.save_every=0",
                        "parallel.tp=2", "parallel.gpus_per_node=2", f"rollout.placement={placement}",
                        "rollout.weight_bucket_mb=1")
    _assert_close(records[1], ref[1], COMPARED, 1e-4)
    # fp32 log-probs of magnitude ~1-10: the vocab-parallel reduction over 2 ranks sums in
    # another order than the engine's, which moves the largest one by ~1e-5.
    assert records[2]["mismatch/logprob_abs_diff_mean"] < 1e-5
    assert records[2]["mismatch/logprob_abs_diff_max"] < 5e-5
    assert records[2]["sync/bytes"] > 0


@pytest.mark.parametrize("placement", ["colocated", "disaggregated"])
@pytest.mark.parametrize("layout", ["parallel.tp=2", "parallel.pp=2"])
def test_train_sync_generate_logprobs_match_engine_in_fp64(tmp_path, layout, placement):
    """TP=2 (each rank pushes its all-gathered share) and PP=2 (two stages in two Ray actors,
    each pushing its own layers): after a train step and a weight sync, the engine's
    log-probs of its own samples equal the Megatron policy's within 1e-5, at every token.

    In fp64 (model.params_dtype=fp64, policy and engine): in fp32 a one-token decode against
    the KV cache and the policy's full-sequence forward differ by up to ~2e-5 on unlikely
    tokens (HF's own decode and full forward do too), which would hide a wrong bucket no
    better than a 5e-5 bound. What is left here is the fp32 storage of the log-probs
    (~1 ulp at |log p| ~ 10). A from-scratch 2-layer model has no correct answers, so the
    filter is off; the soft overlong term still gives the groups different rewards (random
    lengths), so step 1 really changes the weights."""
    records, _ = _train(str(tmp_path / "run"), "model.hf_dir=null", "model.num_layers=2", "model.hidden_size=64",
                        "model.intermediate_size=128", "algo.dynamic_sampling=false", "trainer.max_steps=2",
                        "eval.every=0", "checkpoint.save_every=0", layout, "parallel.gpus_per_node=2",
                        f"rollout.placement={placement}", "rollout.weight_bucket_mb=1",
                        "model.params_dtype=fp64", "parallel.use_distributed_optimizer=false")
    for step in (1, 2):
        assert records[step]["mismatch/logprob_abs_diff_max"] < 1e-5
        assert records[step]["actor/grad_norm"] > 0
    assert records[2]["sync/bytes"] > 0


def test_sigkill_resume_matches_uninterrupted(single_rank_run, tmp_path):
    _, ref, _ = single_rank_run
    run_dir = str(tmp_path / "killed")
    common = ["trainer.max_steps=2", "eval.every=2", "checkpoint.save_every=1"]
    proc, log = _train(run_dir, *common, wait=False)
    ckpt = os.path.join(run_dir, "checkpoints", "step_000001")
    deadline = time.monotonic() + 900
    while not os.path.isdir(ckpt) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed: " + open(log).read()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    records, log = _train(run_dir, *common)
    assert "resumed from" in open(log).read()
    _assert_close(records[2], ref[2], COMPARED + ["eval/avg@k"], 1e-5)


def test_eval_command_on_a_checkpoint_and_a_data_file(tmp_path):
    # A plain {"problem", "answer"} jsonl, as a user would bring; as-is keeps the prompt text.
    data = tmp_path / "probs.jsonl"
    data.write_text("".join(json.dumps({"problem": f"{a}+2*3=", "answer": str(a + 6)}) + "\n" for a in range(1, 7))
                    + "not json\n")
    out = tmp_path / "eval.jsonl"
    run_dir = str(tmp_path / "run")
    args = [sys.executable, "-m", "dapo_megatron.cli", "eval", "examples/tiny_cpu.yaml", *TINY,
            f"trainer.run_dir={run_dir}", "data.template=as-is", "eval.top_p=1.0",
            "--data", str(data), "--k", "4", "--out", str(out)]
    proc = subprocess.run(args, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "evaluating the initial weights" in proc.stderr
    metrics = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert metrics["eval/num_prompts"] == 6 and metrics["eval/k"] == 4
    assert 0.0 < metrics["eval/avg@k"] <= metrics["eval/pass@k"] <= 1.0  # the warm start adds well
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 6 and all(len(r["responses"]) == 4 for r in rows)
    # avg@k is the mean of the per-prompt correct fractions written out.
    assert abs(metrics["eval/avg@k"] - sum(sum(r["correct"]) / 4 for r in rows) / 6) < 1e-9


def test_sigterm_checkpoints_at_the_step_boundary_and_exits_cleanly(tmp_path):
    """What Slurm's `--signal=B:USR1` / a preemption asks of the trainer (slurm/launch.sh)."""
    run_dir = str(tmp_path / "preempted")
    proc, log = _train(run_dir, "trainer.max_steps=50", "eval.every=0", "checkpoint.save_every=0", wait=False)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.monotonic() + 900
    while proc.poll() is None and time.monotonic() < deadline:
        if os.path.exists(metrics) and any('"step": 1' in line for line in open(metrics)):
            break
        time.sleep(0.2)
    assert proc.poll() is None, open(log).read()[-2000:]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=600) == 0, open(log).read()[-3000:]
    text = open(log).read()
    assert "received SIGTERM" in text
    steps = sorted(_records(run_dir))
    assert 1 <= steps[-1] < 50
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", f"step_{steps[-1]:06d}"))


def test_nested_text_config_trains(tmp_path):
    """A checkpoint whose config.json nests the language model under text_config (as
    multimodal checkpoints do) trains: every component reads the shape through resolve()."""
    import json
    import shutil

    nested = tmp_path / "nested"
    shutil.copytree(os.path.join(ROOT, "examples", "tiny_warm_start"), nested)
    inner = json.loads((nested / "config.json").read_text())
    (nested / "config.json").write_text(json.dumps({"model_type": "some_vlm", "text_config": inner}))
    records, _ = _train(str(tmp_path / "run"), f"model.hf_dir={nested}", "trainer.max_steps=1", "eval.every=0",
                        "checkpoint.save_every=0")
    # fp32: the engine's one-token decode and the policy's full forward differ by up to ~2e-5
    # (see the fp64 test above; 1.0e-5 measured on an AMD EPYC with AVX2); a shape read
    # wrongly gives differences of order 1.
    assert records[1]["mismatch/logprob_abs_diff_max"] < 5e-5
