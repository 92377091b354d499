#!/usr/bin/env python
"""Run the GPU paths once on one GPU node, before the first cluster job (issue 14).

    python tools/gpu_check.py                 # on a GPU node: every check below
    python tools/gpu_check.py --hf-dir DIR    # same on a real small HF checkpoint (+ SGLang)
    python tools/gpu_check.py --dry-run       # on CPU: the CPU-runnable parts, CUDA ones skipped

One process, one rank. Prints one line per check, ``PASS|FAIL|SKIP name: figures``, and
exits 1 if any check failed. Checks, in order:

  environment     torch / CUDA / GPU / compute capability / TE / SGLang versions
  policy          PolicyTrainer on CUDA: bf16 params, NCCL process group, TE spec if TE imports
  engine          the embedded engine on CUDA, weights synced from the policy's export
  logprob_parity  the policy's log-probs of the engine's samples vs the engine's own
  train_step      one DAPO update: finite loss and gradient, weights change
  checkpoint      save, scramble the weights, load: bit-exact, same log-probs
  te_fp8          when TE imports and the GPU has FP8 (cc >= 8.9): an FP8 (e4m3, delayed) update
  sglang          when sglang is installed and --hf-dir has a tokenizer: server start,
                  generate, weight update from the policy, generate again

With the default tiny model the whole run takes well under a minute of GPU time after
imports; ``--hf-dir`` with a 0.5B-1.5B model stays within a few minutes on one H100.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import os
import socket
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

PARITY_TOL = {"cpu": 1e-3, "cuda": 0.05}  # mean |delta log-prob| over response tokens (fp32 / bf16)


class Report:
    def __init__(self):
        self.results: list[tuple[str, str, str]] = []

    def line(self, status: str, name: str, detail: str) -> None:
        self.results.append((status, name, detail))
        print(f"{status:4} {name:<15} {detail}", flush=True)

    def run(self, name: str, fn, *args) -> object:
        try:
            status, detail, value = fn(*args)
        except Exception as e:  # noqa: BLE001 - every failure becomes one FAIL line
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            self.line("FAIL", name, f"{type(e).__name__}: {msg}")
            logging.debug("%s", traceback.format_exc())
            return None
        self.line(status, name, detail)
        return value

    @property
    def failed(self) -> bool:
        return any(s == "FAIL" for s, _, _ in self.results)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _import_problem(module: str) -> str | None:
    """None if ``module`` imports, else why not (one line)."""
    if importlib.util.find_spec(module) is None:
        return "not installed"
    try:
        __import__(module)
    except Exception as e:  # noqa: BLE001
        return f"does not import ({type(e).__name__}: {str(e).strip().splitlines()[0][:120]})"
    return None


def _version(dist_name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist_name)
    except PackageNotFoundError:
        return "-"


def check_environment(on_gpu: bool):
    parts = [f"torch {torch.__version__} (CUDA {torch.version.cuda})",
             f"megatron-core {_version('megatron-core')}"]
    if on_gpu:
        cc = torch.cuda.get_device_capability(0)
        mem = torch.cuda.get_device_properties(0).total_memory / 2**30
        parts.append(f"{torch.cuda.get_device_name(0)} cc {cc[0]}.{cc[1]} {mem:.0f} GiB "
                     f"x{torch.cuda.device_count()}")
    else:
        parts.append("no CUDA device")
    te = _import_problem("transformer_engine")
    parts.append(f"TE {_version('transformer-engine')}" if te is None else f"TE {te}")
    sg = _import_problem("sglang") if importlib.util.find_spec("sglang") else "not installed"
    parts.append(f"sglang {_version('sglang')}" if sg is None else f"sglang {sg}")
    return "PASS", "; ".join(parts), None


# ----------------------------------------------------------------------------- setup


def make_config(args, on_gpu: bool):
    from dapo_megatron.config import load_config

    overrides = [
        "trainer.train_batch_size=2", "trainer.mini_batch_size=2", "algo.group_size=4",
        "rollout.max_prompt_length=16", f"algo.max_response_length={args.max_new_tokens}",
        f"algo.overlong_buffer={args.max_new_tokens // 4}",
        "trainer.max_tokens_per_microbatch=4096", "optimizer.lr=1e-3",
        "optimizer.warmup_steps=0", f"trainer.device={'cuda' if on_gpu else 'cpu'}",
        "model.max_position_embeddings=512", "model.tie_word_embeddings=false",
    ]
    # On CPU (dry run) a smaller model: the same code paths, seconds instead of minutes.
    shape = dict(num_layers=4, hidden_size=256, intermediate_size=512, num_attention_heads=8,
                 num_key_value_heads=4) if on_gpu else dict(
        num_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2)
    overrides += [f"model.{k}={v}" for k, v in shape.items()]
    if args.hf_dir:
        overrides.append(f"model.hf_dir={args.hf_dir}")
    return load_config(None, overrides)


def initial_weights(cfg, args):
    """(hf_config dict, HF-named state dict or lazy reader)."""
    import json

    if args.hf_dir:
        from dapo_megatron.convert.hf_io import SafetensorsReader

        with open(os.path.join(args.hf_dir, "config.json"), encoding="utf-8") as f:
            return json.load(f), SafetensorsReader(args.hf_dir)
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = cfg.model.hf_config_dict(vocab_size=args.vocab)
    torch.manual_seed(cfg.trainer.seed)
    conf = AutoConfig.for_model(**{k: v for k, v in hf_config.items() if k != "architectures"})
    model = AutoModelForCausalLM.from_config(conf)
    with torch.no_grad():  # sharper than the init's near-uniform logits: parity means more
        for p in model.parameters():
            p.mul_(4.0)
    return hf_config, {k: v.detach().clone() for k, v in model.state_dict().items()}


def build_trainer(cfg, hf_config, state, **overrides):
    from dapo_megatron.policy.train import PolicyTrainer

    return PolicyTrainer(hf_config, parallel=cfg.parallel, optim=cfg.optimizer, algo=cfg.algo,
                         trainer=cfg.trainer, rollout=cfg.rollout, rank=0, world_size=1,
                         master_addr="127.0.0.1", master_port=_free_port(),
                         hf_state_dict=state, params_dtype=cfg.model.params_dtype, **overrides)


def _spec_name(trainer) -> str:
    from dapo_megatron.policy.model import unwrap

    layer = unwrap(trainer.model[0]).decoder.layers[0]
    return type(layer.self_attention.linear_qkv).__name__


# ----------------------------------------------------------------------------- checks


def check_policy(cfg, hf_config, state, on_gpu: bool):
    import torch.distributed as dist

    t0 = time.perf_counter()
    trainer = build_trainer(cfg, hf_config, state)
    seconds = time.perf_counter() - t0
    param = next(trainer.model[0].parameters())
    backend = dist.get_backend()
    n = sum(p.numel() for p in trainer.model[0].parameters())
    detail = (f"{param.device.type}, {backend}, {trainer.params_dtype}, "
              f"{_spec_name(trainer)}, {n / 1e6:.2f}M params, built in {seconds:.1f}s")
    if on_gpu:
        problems = [what for what, bad in (
            ("params not on CUDA", param.device.type != "cuda"),
            ("backend is not nccl", backend != "nccl"),
            ("params are not bf16", trainer.params_dtype != torch.bfloat16))
            if bad]
        if problems:
            return "FAIL", detail + " -- " + "; ".join(problems), trainer
    return "PASS", detail, trainer


def check_engine(trainer, hf_config, args, on_gpu: bool):
    from dapo_megatron.rollout.embedded import EmbeddedEngine
    from dapo_megatron.rollout.protocol import SamplingParams

    dtype = torch.bfloat16 if on_gpu else torch.float32
    engine = EmbeddedEngine(hf_config, device="cuda" if on_gpu else "cpu", dtype=dtype,
                            max_batch_size=64)
    t0 = time.perf_counter()
    buckets = [b for b in trainer.export_weights(bucket_bytes=64 * 2**20)]
    engine.update_weights(buckets, version=1)
    sync_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    vocab = trainer.vocab_size
    prompts = [torch.randint(0, vocab, (12,), generator=g).tolist() for _ in range(2)]
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=args.max_new_tokens, seed=1)
    t0 = time.perf_counter()
    samples = engine.generate(prompts, params)
    gen_s = time.perf_counter() - t0
    tokens = sum(len(s.token_ids) for group in samples for s in group)
    nbytes = sum(t.numel() * t.element_size() for b in buckets for _, t in b)
    detail = (f"{engine.device.type} {dtype}: {tokens} tokens in {gen_s:.2f}s "
              f"({tokens / gen_s:.0f} tok/s); sync {nbytes / 2**20:.1f} MiB in {sync_s:.2f}s")
    return "PASS", detail, (engine, prompts, samples)


def _policy_batch(prompts, samples):
    from dapo_megatron.policy.microbatch import PolicyBatch

    seqs, masks, engine_lp, adv = [], [], [], []
    for i, group in enumerate(samples):
        for j, s in enumerate(group):
            p = prompts[i]
            seqs.append(p + s.token_ids)
            masks.append([False] * len(p) + [True] * len(s.token_ids))
            engine_lp.append([0.0] * len(p) + list(s.logprobs))
            adv.append(1.0 if j % 2 == 0 else -1.0)
    return PolicyBatch.from_sequences(seqs, masks, adv, engine_logprobs=engine_lp)


def check_parity(trainer, engine_out, on_gpu: bool):
    _, prompts, samples = engine_out
    batch = _policy_batch(prompts, samples)
    policy = trainer.compute_logprobs(batch)
    mask = batch.response_mask.bool()
    diff = (policy - batch.engine_logprobs.float()).abs()[mask]
    mean, worst = float(diff.mean()), float(diff.max())
    tol = PARITY_TOL["cuda" if on_gpu else "cpu"]
    status = "PASS" if mean <= tol and math.isfinite(worst) else "FAIL"
    return status, (f"mean |dlogp| {mean:.2e}, max {worst:.2e} over {int(mask.sum())} "
                    f"tokens (tolerance on the mean {tol:g})"), batch


def _snapshot(trainer) -> list[torch.Tensor]:
    return [p.detach().float().cpu().clone() for p in trainer.model[0].parameters()]


def check_train_step(trainer, batch):
    before = _snapshot(trainer)
    t0 = time.perf_counter()
    metrics = trainer.train_step(batch)
    seconds = time.perf_counter() - t0
    after = _snapshot(trainer)
    moved = max(float((a - b).abs().max()) for a, b in zip(after, before))
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    shown = {k.split("/")[-1]: v for k, v in metrics.items()
             if k.split("/")[-1] in ("pg_loss", "loss", "grad_norm", "tokens_per_s")}
    detail = ", ".join(f"{k} {v:.4g}" for k, v in shown.items())
    detail += f"; max |dw| {moved:.2e}; {seconds:.2f}s"
    if bad or moved == 0.0:
        return "FAIL", detail + (f" -- non-finite {bad}" if bad else " -- weights did not move"), None
    return "PASS", detail, None


def check_checkpoint(trainer, batch, workdir: str):
    path = os.path.join(workdir, "ckpt")
    want = _snapshot(trainer)
    lp_before = trainer.compute_logprobs(batch)
    t0 = time.perf_counter()
    trainer.save(path)
    save_s = time.perf_counter() - t0
    with torch.no_grad():
        for p in trainer.model[0].parameters():
            p.normal_()
    t0 = time.perf_counter()
    trainer.load(path)
    load_s = time.perf_counter() - t0
    got = _snapshot(trainer)
    exact = all(torch.equal(a, b) for a, b in zip(got, want))
    lp_diff = float((trainer.compute_logprobs(batch) - lp_before).abs().max())
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
    detail = (f"save {save_s:.2f}s, load {load_s:.2f}s, {size / 2**20:.1f} MiB; weights "
              f"{'bit-exact' if exact else 'DIFFER'}; max |dlogp| after reload {lp_diff:.1e}")
    return ("PASS" if exact and lp_diff == 0.0 else "FAIL"), detail, None


def check_te_fp8(cfg, hf_config, state, batch):
    trainer = build_trainer(cfg, hf_config, state, fp8="e4m3", fp8_recipe="delayed")
    metrics = trainer.train_step(batch)
    lp = trainer.compute_logprobs(batch)[batch.response_mask.bool()]
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    finite = bool(torch.isfinite(lp).all())
    detail = (f"{_spec_name(trainer)}, e4m3 delayed: update {'finite' if not bad else bad}, "
              f"log-probs {'finite' if finite else 'NON-FINITE'}, mean logp {float(lp.mean()):.3f}")
    return ("PASS" if finite and not bad else "FAIL"), detail, None


def check_sglang(trainer, args):
    from dapo_megatron.rollout.protocol import SamplingParams
    from dapo_megatron.rollout.sglang_api import SGLangConfig
    from dapo_megatron.rollout.sglang_engine import SGLangEngine

    t0 = time.perf_counter()
    engine = SGLangEngine(SGLangConfig(model_path=args.hf_dir, mem_fraction_static=0.3,
                                       startup_timeout_s=420.0))
    start_s = time.perf_counter() - t0
    try:
        params = SamplingParams(n=2, temperature=1.0, max_new_tokens=16, seed=1)
        first = engine.generate([[1, 2, 3, 4]], params)
        t0 = time.perf_counter()
        engine.update_weights(trainer.export_weights(bucket_bytes=256 * 2**20), version=1)
        sync_s = time.perf_counter() - t0
        second = engine.generate([[1, 2, 3, 4]], params)
        ok = all(s.weight_version == 1 for g in second for s in g) and bool(first[0])
        detail = f"start {start_s:.0f}s, weight update {sync_s:.2f}s, generated after update"
    finally:
        engine.shutdown()
    return ("PASS" if ok else "FAIL"), detail, None


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--dry-run", action="store_true",
                    help="run on CPU: CUDA-only checks are skipped with the reason")
    ap.add_argument("--hf-dir", help="a small HF checkpoint (config.json, safetensors, tokenizer) "
                                     "instead of the built-in tiny model; enables the SGLang check")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=512, help="vocab of the tiny model")
    ap.add_argument("-v", "--verbose", action="store_true", help="log tracebacks of failures")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(message)s")
    import warnings

    warnings.filterwarnings("ignore")

    if args.dry_run:
        # The CPU layer even on a GPU node; set before anything asks torch about CUDA.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    on_gpu = not args.dry_run and torch.cuda.is_available()
    if not on_gpu and not args.dry_run:
        print("FAIL cuda            no CUDA device in this process; on a CPU machine run "
              "--dry-run", flush=True)
        return 1
    if args.dry_run:
        if torch.cuda.is_available():
            print("FAIL cuda            --dry-run on a machine that already initialised CUDA",
                  flush=True)
            return 1
    rep = Report()
    rep.run("environment", check_environment, on_gpu)
    if args.dry_run:
        rep.line("SKIP", "cuda", "dry run: policy, engine and update run on CPU (gloo, fp32) "
                                 "instead of CUDA (nccl, bf16)")
    cfg = make_config(args, on_gpu)
    hf_config, state = initial_weights(cfg, args)
    trainer = rep.run("policy", check_policy, cfg, hf_config, state, on_gpu)
    engine_out = batch = None
    if trainer is not None:
        engine_out = rep.run("engine", check_engine, trainer, hf_config, args, on_gpu)
    if engine_out is not None:
        batch = rep.run("logprob_parity", check_parity, trainer, engine_out, on_gpu)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as workdir:
        if batch is not None:
            rep.run("train_step", check_train_step, trainer, batch)
            rep.run("checkpoint", check_checkpoint, trainer, batch, workdir)
        te_problem = _import_problem("transformer_engine")
        if not on_gpu:
            rep.line("SKIP", "te_fp8", "needs CUDA" + (" (dry run)" if args.dry_run else ""))
        elif te_problem:
            rep.line("SKIP", "te_fp8", f"transformer_engine {te_problem}")
        elif torch.cuda.get_device_capability(0) < (8, 9):
            rep.line("SKIP", "te_fp8", "FP8 needs compute capability >= 8.9")
        elif batch is not None:
            rep.run("te_fp8", check_te_fp8, cfg, hf_config, state, batch)
        if not on_gpu:
            rep.line("SKIP", "sglang", "needs CUDA" + (" (dry run)" if args.dry_run else ""))
        elif importlib.util.find_spec("sglang") is None:
            rep.line("SKIP", "sglang", "not installed (pip install -e '.[gpu]')")
        elif not args.hf_dir:
            rep.line("SKIP", "sglang", "needs --hf-dir (SGLang loads a tokenizer)")
        elif trainer is not None:
            rep.run("sglang", check_sglang, trainer, args)
    n = {s: sum(1 for r in rep.results if r[0] == s) for s in ("PASS", "FAIL", "SKIP")}
    print(f"gpu_check: {n['PASS']} passed, {n['FAIL']} failed, {n['SKIP']} skipped", flush=True)
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
