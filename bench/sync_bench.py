"""Weight sync at model scale: memory per process and throughput, new flow against the old.

A random Llama of about 1.2 GB (fp32) runs as a TP=2 Megatron policy (two Ray actors) and
feeds one embedded engine (a third actor). Three flows move the same weights, in this run:

- old (the flow before the ranks pushed their own buckets, kept here as the baseline):
  every bucket is gathered to rank 0 as a host copy, the whole list returns to the driver
  through Ray, the driver keeps it (the manager's restart cache) and sends it to the engine.
- colocated (new): each source rank pushes its buckets into the engine's weight-update
  session one bucket at a time: through a shared-memory file for an engine on its node,
  Ray's object store for one elsewhere (here: the same node).
- disaggregated (new): each source rank broadcasts its buckets over a gloo weight-update
  group that the engine joined.

For each process (driver, rank 0, rank 1, engine) a sampler in the driver polls RSS every
few milliseconds; "extra" is the peak above that process's idle RSS just before the sync,
divided by the model's bytes. Throughput is model bytes / sync seconds, beside a plain
torch copy of the same bytes. Run: python bench/sync_bench.py [--hidden 1024 --layers 16]
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import psutil
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dapo_megatron.config import load_config  # noqa: E402


def old_flow_export(worker, bucket_mb: int):
    """Runs inside a PolicyWorker actor: the pre-push flow (everything to rank 0 on host)."""
    from dapo_megatron.convert.export import export_hf_weights

    worker.trainer._enter()
    buckets = [[(name, t.detach().cpu().clone()) for name, t in bucket]
               for bucket in export_hf_weights(worker.trainer.model, bucket_bytes=bucket_mb * 2**20, dst=0)]
    return buckets if worker.rank == 0 else None


def actor_pid(actor) -> int:
    import ray

    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))


class RssSampler:
    """Peak RSS of each pid above its RSS at start(), polled from this process."""

    def __init__(self, pids: dict[str, int], period_s: float = 0.002):
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.period_s = period_s

    def __enter__(self):
        self.idle = {n: p.memory_info().rss for n, p in self.procs.items()}
        self.peak = dict(self.idle)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            for n, p in self.procs.items():
                try:
                    self.peak[n] = max(self.peak[n], p.memory_info().rss)
                except psutil.Error:
                    pass
            time.sleep(self.period_s)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        for n, p in self.procs.items():  # one last look after the sync
            self.peak[n] = max(self.peak[n], p.memory_info().rss)

    def extra(self) -> dict[str, int]:
        return {n: self.peak[n] - self.idle[n] for n in self.procs}


def plain_copy_gbps(nbytes: int) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm the pages
    start = time.perf_counter()
    dst.copy_(src)
    return nbytes / 1e9 / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--bucket-mb", type=int, default=128)
    args = ap.parse_args()

    import ray

    from dapo_megatron.controller.engines import EnginePool
    from dapo_megatron.controller.policy_group import PolicyGroup

    overrides = [
        f"model.hidden_size={args.hidden}", f"model.num_layers={args.layers}", "model.num_attention_heads=8",
        "model.num_key_value_heads=8", f"model.intermediate_size={4 * args.hidden}",
        f"model.vocab_size={args.vocab}", "model.max_position_embeddings=512", "model.tie_word_embeddings=false",
        "algo.max_response_length=64", "algo.overlong_buffer=8", "rollout.max_prompt_length=32",
        "trainer.max_tokens_per_microbatch=512", "trainer.device=cpu", "parallel.tp=2", "parallel.gpus_per_node=2",
        "rollout.num_engines=1", f"rollout.weight_bucket_mb={args.bucket_mb}",
    ]
    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1",
                                       "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}})
    results = {}
    for placement in ("old", "colocated", "disaggregated"):
        cfg = load_config(None, overrides + [f"rollout.placement={'colocated' if placement == 'old' else placement}"])
        hf = cfg.model.hf_config_dict()
        policy = PolicyGroup(cfg, hf)
        engines = EnginePool(cfg, hf, weight_source=policy)
        engine = engines.engines[0]
        pids = {"driver": os.getpid(), "rank0": actor_pid(policy.workers[0]), "rank1": actor_pid(policy.workers[1]),
                "engine": actor_pid(engine)}
        model_bytes = sum(p.numel() * 4 for p in _hf_param_shapes(hf))
        time.sleep(1.0)
        with RssSampler(pids) as sampler:
            start = time.perf_counter()
            if placement == "old":
                buckets = ray.get([w.__ray_call__.remote(old_flow_export, args.bucket_mb) for w in policy.workers])[0]
                cache = buckets  # the manager's restart copy
                ray.get(engine.update_weights.remote(buckets, 1))
                del buckets, cache
            else:
                engines.sync_weights(1)
            seconds = time.perf_counter() - start
        extra = {n: v / model_bytes for n, v in sampler.extra().items()}
        results[placement] = (max(extra.values()), model_bytes / 1e9 / seconds, seconds, extra)
        print(f"{placement:>13}: {seconds:6.2f} s, {model_bytes / 1e9 / seconds:5.2f} GB/s; peak extra / model "
              f"bytes: " + ", ".join(f"{n} {v:.2f}" for n, v in extra.items()), flush=True)
        engines.shutdown()
        policy.shutdown()
        time.sleep(2.0)
    copy = plain_copy_gbps(model_bytes)
    print(f"model: {model_bytes / 1e9:.2f} GB fp32 (hidden {args.hidden}, {args.layers} layers), TP=2 ranks -> "
          f"1 embedded engine, {args.bucket_mb} MiB buckets; plain torch copy of the same bytes: {copy:.2f} GB/s")
    new_x = max(results["colocated"][0], results["disaggregated"][0])
    new_a = min(results["colocated"][1], results["disaggregated"][1])
    print(f"sync peak extra memory / model bytes: new {new_x:.2f} (old {results['old'][0]:.2f}); "
          f"throughput new {new_a:.2f} GB/s (old {results['old'][1]:.2f} GB/s)")
    ray.shutdown()


def _hf_param_shapes(hf: dict):
    """The HF model's parameters (meta tensors: shapes only, no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**hf)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return list(model.parameters())


if __name__ == "__main__":
    main()
