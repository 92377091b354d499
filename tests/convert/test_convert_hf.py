"""tools/convert_hf.py: HF -> Megatron dist checkpoint -> HF, layouts, --verify, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.convert.tiny import FAMILIES, make_hf_model, read_hf_dir
from tests.dist import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "convert_hf.py")


def _cli(*args, check=True):
    proc = subprocess.run([sys.executable, TOOL, "-q", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    if check and proc.returncode:
        raise AssertionError(f"convert_hf {args} failed:\n{proc.stderr[-3000:]}")
    return proc


def _round_trip_worker(rank, world, dirs, work):
    from dapo_megatron.convert_hf import hf_to_megatron, megatron_to_hf, verify

    diffs = {}
    for fam, d in dirs.items():
        ckpt, back = os.path.join(work, fam + "-meg"), os.path.join(work, fam + "-hf")
        hf_to_megatron(d, ckpt)
        # small shards: exercises the index + multi-file writer
        megatron_to_hf(ckpt, back, max_shard_bytes=50_000)
        diffs[fam] = verify(d, ckpt)
    return diffs


@pytest.mark.dist
def test_round_trip_bit_exact_every_family(tmp_path):
    dirs = {}
    for fam in FAMILIES:
        dirs[fam] = str(tmp_path / fam)
        model = make_hf_model(fam, dirs[fam], seed=5)
        if fam == "llama":  # a bf16 checkpoint must come back bf16, bit for bit
            model.to(torch.bfloat16).save_pretrained(dirs[fam])
    diffs = run_distributed(_round_trip_worker, 1, dirs, str(tmp_path))[0]
    for fam, d in dirs.items():
        back = str(tmp_path / (fam + "-hf"))
        ref, got = read_hf_dir(d), read_hf_dir(back)
        assert sorted(ref) == sorted(got), fam
        for name in ref:
            assert ref[name].dtype == got[name].dtype and torch.equal(ref[name], got[name]), (
                f"{fam} {name} differs")
        with open(os.path.join(d, "config.json"), "rb") as a, \
                open(os.path.join(back, "config.json"), "rb") as b:
            assert a.read() == b.read(), f"{fam} config.json differs"
        assert os.path.exists(os.path.join(back, "generation_config.json"))
        assert len([f for f in os.listdir(back) if f.endswith(".safetensors")]) > 1
        # both sides run fp32 on the same (bf16 for llama) weights
        assert diffs[fam] < 1e-4, f"{fam}: verify diff {diffs[fam]}"


def _layout_worker(rank, world, layout, ckpt, hf_dir):
    from dapo_megatron.convert_hf import load_megatron_checkpoint
    from dapo_megatron.policy.parallel import init_parallel
    from tests.convert.tiny import megatron_logits, prompt_ids

    init_parallel(**layout)
    chunks, _, _ = load_megatron_checkpoint(ckpt)
    return megatron_logits(chunks, prompt_ids()).numpy()


@pytest.mark.dist
@pytest.mark.parametrize(
    "family,write,load",
    [("llama", ["--tp", "2"], {"pp": 2}), ("qwen3_moe", ["--ep", "2", "--pp", "2"], {"tp": 2}),
     ("mixtral", [], {"ep": 2})],
    ids=["llama-tp2-to-pp2", "qwen3moe-ep2pp2-to-tp2", "mixtral-tp1-to-ep2"],
)
def test_checkpoint_written_in_one_layout_loads_in_another(tmp_path, family, write, load):
    hf_dir, ckpt = str(tmp_path / "hf"), str(tmp_path / "ckpt")
    model = make_hf_model(family, hf_dir, seed=7)
    _cli("--hf-dir", hf_dir, "--out", ckpt, *write)
    from tests.convert.tiny import prompt_ids

    with torch.no_grad():
        ref = model(prompt_ids()).logits
    for logits in run_distributed(_layout_worker, 2, load, ckpt, hf_dir):
        assert (torch.from_numpy(logits) - ref).abs().max() < 1e-4


def test_cli_verify_reports_difference(tmp_path):
    hf_dir, ckpt = str(tmp_path / "hf"), str(tmp_path / "ckpt")
    make_hf_model("qwen3", hf_dir)
    out = _cli("--hf-dir", hf_dir, "--out", ckpt, "--verify", "--verify-tol", "1e-4").stdout
    assert "max abs logit difference" in out
    meta = json.load(open(os.path.join(ckpt, "dapo_convert.json")))
    assert meta["architecture"] == "Qwen3ForCausalLM" and meta["padded_vocab_size"] == 256


def _expect_error(tmp_path, hf_dir, *needles):
    out = str(tmp_path / "out")
    proc = _cli("--hf-dir", hf_dir, "--out", out, check=False)
    assert proc.returncode == 1, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("convert_hf: error:"), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not os.path.exists(out)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".out.tmp")]


def test_errors_name_file_and_tensor_and_leave_nothing(tmp_path):
    hf_dir = str(tmp_path / "hf")
    make_hf_model("llama", hf_dir)
    st = os.path.join(hf_dir, "model.safetensors")
    good = open(st, "rb").read()

    # truncated shard
    with open(st, "wb") as f:
        f.write(good[: len(good) - 1000])
    _expect_error(tmp_path, hf_dir, "model.safetensors", "truncated", "tensor ")

    # corrupt header
    with open(st, "wb") as f:
        f.write(good[:8] + b"\x00garbage" + good[16:])
    _expect_error(tmp_path, hf_dir, "model.safetensors", "corrupt")

    # config/weights mismatch: one layer more in the config than in the weights
    with open(st, "wb") as f:
        f.write(good)
    cfg_path = os.path.join(hf_dir, "config.json")
    cfg = json.load(open(cfg_path))
    json.dump({**cfg, "num_hidden_layers": 3}, open(cfg_path, "w"))
    _expect_error(tmp_path, hf_dir, "model.layers.2.", "missing")
    json.dump({**cfg, "hidden_size": 32}, open(cfg_path, "w"))
    _expect_error(tmp_path, hf_dir, "model.safetensors", "shape")
    json.dump({**cfg, "num_hidden_layers": 1}, open(cfg_path, "w"))
    _expect_error(tmp_path, hf_dir, "model.layers.1.", "mismatch")

    # unknown architecture
    json.dump({**cfg, "architectures": ["GPTNeoXForCausalLM"]}, open(cfg_path, "w"))
    _expect_error(tmp_path, hf_dir, "config.json", "GPTNeoXForCausalLM")


def test_reader_and_writer_match_safetensors(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from dapo_megatron.convert.hf_io import SafetensorsReader, ShardWriter

    tensors = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(7),
               "c": torch.tensor(2.5), "d": torch.zeros(0, 4)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    reader = SafetensorsReader(str(tmp_path))
    for k, v in tensors.items():
        assert torch.equal(reader[k], v) and reader[k].dtype == v.dtype
    out = tmp_path / "out"
    out.mkdir()
    w = ShardWriter(str(out), [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()],
                    max_shard_bytes=40)
    for k, v in tensors.items():
        w.write(k, v)
    w.close()
    index = json.load(open(out / "model.safetensors.index.json"))
    for k, v in tensors.items():
        with safe_open(str(out / index["weight_map"][k]), "pt") as f:
            assert torch.equal(f.get_tensor(k), v)
