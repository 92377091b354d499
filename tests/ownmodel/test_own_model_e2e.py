"""A user's own model end to end, as the README's "Your own model" describes it.

A tiny random Qwen2 with a real BPE tokenizer and a ChatML template (tests/ownmodel/
factory.py), DAPO-Math-17K-format jsonl and an AIME-style parquet:

    convert  ->  train step 1 (every group dropped: no optimizer step), checkpoint
             ->  train again: resume, step 2 updates, checkpoint
             ->  eval  ->  convert back (from the run's checkpoint dir, no extra flag)

One run is shared by the tests below (module fixture). The exported model must give the
trained policy's logits within 1e-5 (tools/convert_hf.py --verify: Megatron from the
trainer's checkpoint vs transformers from the export) and its tokenizer must encode like
the original.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONVERT = os.path.join(ROOT, "tools", "convert_hf.py")


def _run(args, log_path, timeout=900):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT, timeout=timeout)
    text = open(log_path).read()
    return proc.returncode, text


def _ok(args, log_path):
    rc, text = _run(args, log_path)
    assert rc == 0, f"{args} failed:\n{text[-5000:]}"
    return text


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from tests.ownmodel.factory import build_model, build_tokenizer, write_data

    work = tmp_path_factory.mktemp("ownmodel")
    hf_dir, mcore = str(work / "my-model"), str(work / "my-model-mcore")
    tok = build_tokenizer(hf_dir)
    model = build_model(hf_dir, tok)
    train_path, eval_path = write_data(str(work / "data"))
    run_dir, export = str(work / "runs" / "mine"), str(work / "my-model-dapo")
    cfg = {
        "model": {"hf_dir": hf_dir, "load": mcore},
        "data": {"train_path": train_path, "eval_path": eval_path, "shuffle": False},
        "algo": {"group_size": 4, "max_response_length": 8, "overlong_buffer": 2, "max_gen_batches": 1},
        "rollout": {"gen_batch_size": 2, "max_prompt_length": 120},
        "trainer": {"train_batch_size": 2, "mini_batch_size": 2, "max_tokens_per_microbatch": 1024,
                    "max_steps": 2, "run_dir": run_dir},
        "optimizer": {"lr": 1e-3, "warmup_steps": 0},
        "eval": {"every": 2, "k": 2},
        "checkpoint": {"save_every": 1, "keep_last": 3},
        "reward": {"num_workers": 1},
    }
    cfg_path = str(work / "mine.yaml")
    with open(cfg_path, "w") as f:
        yaml.safe_dump(cfg, f)
    logs = {}
    logs["convert"] = _ok([CONVERT, "--hf-dir", hf_dir, "--out", mcore], str(work / "convert.log"))
    cli = ["-m", "dapo_megatron.cli"]
    logs["train1"] = _ok(cli + ["train", cfg_path, "trainer.max_steps=1"], str(work / "train1.log"))
    logs["train2"] = _ok(cli + ["train", cfg_path], str(work / "train2.log"))
    logs["eval"] = _ok(cli + ["eval", cfg_path, "--k", "2", "--out", str(work / "eval.jsonl")],
                       str(work / "eval.log"))
    logs["back"] = _ok([CONVERT, "--to-hf", "--megatron-dir", os.path.join(run_dir, "checkpoints"),
                        "--out", export, "--verify"], str(work / "back.log"))
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return dict(work=work, hf_dir=hf_dir, run_dir=run_dir, export=export, logs=logs, tok=tok,
                model=model, records=records, eval_out=str(work / "eval.jsonl"), cfg_path=cfg_path)


def test_step_1_drops_every_group_and_still_checkpoints(run):
    rec = {r["step"]: r for r in run["records"]}
    assert rec[1]["dynamic_sampling/kept"] == 0 and rec[1]["dynamic_sampling/generated"] == 2
    assert "actor/grad_norm" not in rec[1]  # no optimizer step before this checkpoint
    assert "no group with a learning signal" in run["logs"]["train1"]
    assert "checkpoint written" in run["logs"]["train1"]


def test_resume_then_an_update_and_metrics_without_duplicates(run):
    steps = [r["step"] for r in run["records"]]
    assert steps == [0, 1, 2]
    rec = {r["step"]: r for r in run["records"]}
    assert "resumed from" in run["logs"]["train2"]
    assert rec[2]["dynamic_sampling/kept"] >= 1 and rec[2]["actor/grad_norm"] > 0
    assert "eval/avg@k" in rec[0] and "eval/avg@k" in rec[2]
    ckpts = sorted(os.listdir(os.path.join(run["run_dir"], "checkpoints")))
    assert [c for c in ckpts if c.startswith("step_")] == ["step_000001", "step_000002"]


def test_generation_stops_at_the_end_of_turn_token(run):
    """The model ends its reply with <|im_end|>, which is not the tokenizer's eos: the
    rollouts and eval stop there (4 tokens), not at algo.max_response_length."""
    reply = len(run["tok"].encode("Answer: 7", add_special_tokens=False)) + 1
    rec = {r["step"]: r for r in run["records"]}
    assert rec[2]["response/truncated_frac"] == 0.0  # the step that trained (step 1 kept none)
    assert rec[2]["response/length_mean"] == rec[2]["response/length_max"] == reply
    assert rec[0]["eval/length_mean"] == rec[2]["eval/length_mean"] == reply
    assert "generation stops on token ids" in run["logs"]["train1"]
    assert "'<|im_end|>'" in run["logs"]["train1"] and "'<|eot|>'" in run["logs"]["train1"]


def test_eval_shows_progress_and_writes_results(run):
    assert "eval: 3/3 prompts" in run["logs"]["eval"]
    with open(run["eval_out"]) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 3 and all(len(r["responses"]) == 2 for r in rows)
    assert all(r["responses"][0] in ("Answer: 7", "Answer: 3") for r in rows)


def test_end_of_run_summary(run):
    log = run["logs"]["train2"]
    assert "run finished: 2 steps" in log
    assert "held-out avg@k:" in log and "(step 0) ->" in log and "(step 2)" in log
    assert "metrics.jsonl" in log and "newest: step_000002" in log


def test_saved_config_records_the_shape_that_ran(run):
    with open(os.path.join(run["run_dir"], "config.yaml")) as f:
        saved = yaml.safe_load(f)["model"]
    hf = run["model"].config
    assert saved["architecture"] == "qwen2"
    assert (saved["hidden_size"], saved["num_layers"], saved["vocab_size"]) == \
        (hf.hidden_size, hf.num_hidden_layers, hf.vocab_size)
    assert saved["tie_word_embeddings"] is False and saved["num_key_value_heads"] == 2


def test_export_is_a_complete_hf_model_with_the_trained_weights(run):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    log = run["logs"]["back"]
    assert "using its newest checkpoint step_000002" in log
    diff = float(log.split("max abs logit difference")[1].split()[0])
    assert diff <= 1e-5, log
    names = set(os.listdir(run["export"]))
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= names
    exported = AutoModelForCausalLM.from_pretrained(run["export"]).eval()
    assert exported.dtype == torch.float32  # trained in fp32 on CPU, exported as trained
    ids = torch.tensor([run["tok"].encode("What is 3 + 4? Answer: 7")])
    with torch.no_grad():
        before, after = run["model"](ids).logits, exported(ids).logits
    assert 1e-4 < float((after - before).abs().max()) < 10.0  # step 2 moved the weights (lr 1e-3)
    gen = GenerationConfig.from_pretrained(run["export"])
    assert gen.eos_token_id == run["model"].generation_config.eos_token_id
    tok = AutoTokenizer.from_pretrained(run["export"])
    original = run["tok"]
    assert len(tok) == len(original)
    for text in ("What is 3 + 4?", "Answer: 7<|im_end|>", "héllo wörld 123 \\boxed{7}"):
        assert tok.encode(text) == original.encode(text)
    chat = [{"role": "user", "content": "What is 3 + 4?"}]
    assert tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == \
        original.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)


def test_verify_honours_hf_config(run, tmp_path):
    """A checkpoint without the HF config it trained (e.g. written by another tool):
    --verify uses --hf-config, and without it the error says to pass it."""
    ckpt = str(tmp_path / "bare")
    shutil.copytree(os.path.join(run["run_dir"], "checkpoints", "step_000002"), ckpt)
    os.remove(os.path.join(ckpt, "hf_config.json"))
    rc, text = _run([CONVERT, "--verify", "--hf-dir", run["export"], "--megatron-dir", ckpt],
                    str(tmp_path / "no_cfg.log"))
    assert rc == 1 and "--hf-config" in text, text[-2000:]
    text = _ok([CONVERT, "--verify", "--hf-dir", run["export"], "--megatron-dir", ckpt,
                "--hf-config", os.path.join(run["hf_dir"], "config.json"), "--verify-tol", "1e-5"],
               str(tmp_path / "cfg.log"))
    assert "max abs logit difference" in text
