#!/usr/bin/env python
"""Peak resident memory of tools/convert_hf.py against the checkpoint size.

Writes a random ~1 GB (bf16) Llama-style HF checkpoint in two safetensors shards, converts
it HF -> Megatron and back in fresh processes, and reports each process's peak RSS (from
wait4's rusage) over the checkpoint size. Target: < 1.5x. Also checks the round trip is
bit-exact.

  python bench/convert_mem.py [--gb 1.0] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_checkpoint(out_dir: str, gb: float) -> int:
    import torch

    from dapo_megatron.convert.arch import model_args_from_hf
    from dapo_megatron.convert.hf_io import ShardWriter
    from dapo_megatron.convert.rules import hf_names, hf_shapes

    hidden, ffn, vocab = 2048, 5632, 32000
    per_layer = 2 * (2 * hidden * hidden + 2 * hidden * 512 + 3 * hidden * ffn)
    layers = max(1, round((gb * 1e9 - 2 * 2 * vocab * hidden) / per_layer))
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
        "num_attention_heads": 16, "num_key_value_heads": 4, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
        "hidden_act": "silu", "torch_dtype": "bfloat16",
    }
    os.makedirs(out_dir)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    args = model_args_from_hf(cfg)
    shapes = hf_shapes(args)
    entries = [(n, torch.bfloat16, shapes[n]) for n in hf_names(args)]
    writer = ShardWriter(out_dir, entries, max_shard_bytes=int(gb * 1e9 / 2) + 1)
    g = torch.Generator().manual_seed(0)
    for name, dtype, shape in entries:
        writer.write(name, (torch.randn(shape, generator=g) * 0.02).to(dtype))
    writer.close()
    return sum(os.path.getsize(os.path.join(out_dir, f))
               for f in os.listdir(out_dir) if f.endswith(".safetensors"))


def compare(a_dir: str, b_dir: str) -> int:
    import torch

    from dapo_megatron.convert.hf_io import SafetensorsReader

    ra, rb = SafetensorsReader(a_dir), SafetensorsReader(b_dir)
    same = sorted(ra.keys()) == sorted(rb.keys()) and all(
        ra.dtype(n) == rb.dtype(n) and torch.equal(ra[n], rb[n]) for n in ra.keys())
    with open(os.path.join(a_dir, "config.json"), "rb") as fa, \
            open(os.path.join(b_dir, "config.json"), "rb") as fb:
        same = same and fa.read() == fb.read()
    return 0 if same else 1


def run_measured(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in bytes, seconds) of one fresh process.

    This parent imports nothing heavy: a forked child's peak RSS starts from the parent's
    size before exec, so a parent holding torch would inflate the figure.
    """
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    out = proc.stdout.read().decode(errors="replace")
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{out[-3000:]}")
    return usage.ru_maxrss * 1024, time.monotonic() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--gb", type=float, default=1.0)
    p.add_argument("--workdir", default=None)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--make", help=argparse.SUPPRESS)  # internal: write the checkpoint only
    p.add_argument("--compare", nargs=2, help=argparse.SUPPRESS)  # internal: bit-exact check
    a = p.parse_args()
    if a.make:
        make_checkpoint(a.make, a.gb)
        return 0
    if a.compare:
        return compare(*a.compare)
    work = a.workdir or tempfile.mkdtemp(prefix="convert_mem_")
    hf, meg, back = (os.path.join(work, n) for n in ("hf", "megatron", "hf_back"))
    me = [sys.executable, os.path.abspath(__file__)]
    try:
        subprocess.run(me + ["--make", hf, "--gb", str(a.gb)], check=True)
        size = sum(os.path.getsize(os.path.join(hf, f))
                   for f in os.listdir(hf) if f.endswith(".safetensors"))
        base, _ = run_measured([sys.executable, "-c",
                                "import torch, megatron.core.models.gpt, "
                                "megatron.core.dist_checkpointing"])
        tool = [sys.executable, os.path.join(ROOT, "tools", "convert_hf.py"), "-q"]
        rss_in, t_in = run_measured(tool + ["--hf-dir", hf, "--out", meg])
        rss_out, t_out = run_measured(tool + ["--to-hf", "--megatron-dir", meg, "--out", back])
        exact = subprocess.run(me + ["--compare", hf, back]).returncode == 0
        gb = 1e9
        print(f"checkpoint: {size / gb:.3f} GB bf16")
        print(f"python+torch+megatron import alone: {base / gb:.3f} GB peak RSS")
        print(f"HF -> Megatron: peak RSS {rss_in / gb:.3f} GB = {rss_in / size:.2f}x checkpoint, "
              f"{t_in:.1f}s")
        print(f"Megatron -> HF: peak RSS {rss_out / gb:.3f} GB = {rss_out / size:.2f}x checkpoint, "
              f"{t_out:.1f}s")
        print(f"round trip bit-exact: {exact}")
        ok = exact and max(rss_in, rss_out) < 1.5 * size
        print("PASS" if ok else "FAIL", "(target: peak RSS < 1.5x checkpoint size)")
        return 0 if ok else 1
    finally:
        if not a.keep and a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
