#!/usr/bin/env python
"""Convert Hugging Face checkpoints to Megatron distributed checkpoints and back.

  HF -> Megatron:  python tools/convert_hf.py --hf-dir DIR --out CKPT [--tp N --pp N --ep N] [--verify]
  Megatron -> HF:  python tools/convert_hf.py --to-hf --megatron-dir CKPT --out DIR [--verify]
  Check only:      python tools/convert_hf.py --verify --hf-dir DIR --megatron-dir CKPT

The Megatron checkpoint loads under any TP/PP/EP; --tp/--pp/--ep only choose how many local
CPU processes write it (each reads and holds only its shard). --verify reports the max abs
difference of fp32 logits on a fixed prompt between the HF model (transformers) and the
Megatron model. Errors are one line naming the file and tensor; nothing half-written remains.

--to-hf takes a checkpoint of this tool or of the trainer (runs/NAME/checkpoints/step_N,
or runs/NAME/checkpoints for the newest): both carry the HF config and the tokenizer, and
DIR becomes a complete HF model (config.json, generation_config.json, safetensors,
tokenizer files) for AutoModelForCausalLM / AutoTokenizer. A trained checkpoint is written
in the dtype it was trained in.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", help="HF checkpoint directory (config.json + *.safetensors)")
    p.add_argument("--megatron-dir", help="Megatron dist checkpoint directory")
    p.add_argument("--out", help="output directory (must not exist)")
    p.add_argument("--to-hf", action="store_true", help="convert --megatron-dir to HF at --out")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--max-shard-size", type=float, default=5.0, help="HF shard size in GB")
    p.add_argument("--hf-config", help="config.json to use with --to-hf / --verify instead of "
                   "the checkpoint's hf_config.json (needed only for checkpoints without one)")
    p.add_argument("--tokenizer", help="with --to-hf: copy the tokenizer files from this "
                   "directory (default: those the checkpoint carries)")
    p.add_argument("--prefix", default=None,
                   help="key prefix of the model in the dist checkpoint (default '')")
    p.add_argument("--verify", action="store_true", help="report max abs logit difference")
    p.add_argument("--verify-tol", type=float, default=None,
                   help="exit 2 when the --verify difference exceeds this")
    p.add_argument("-q", "--quiet", action="store_true")
    a = p.parse_args(argv)
    if a.to_hf:
        if not (a.megatron_dir and a.out):
            p.error("--to-hf needs --megatron-dir and --out")
    elif a.out:
        if not a.hf_dir:
            p.error("--hf-dir is required")
    elif not (a.verify and a.hf_dir and a.megatron_dir):
        p.error("give --out (convert) or --verify with --hf-dir and --megatron-dir")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if a.quiet else logging.INFO,
                        format="%(message)s", stream=sys.stderr)
    warnings.filterwarnings("ignore")
    from dapo_megatron.convert.hf_io import CheckpointError
    from dapo_megatron.convert_hf import (
        ConversionError,
        hf_to_megatron,
        limit_malloc_retention,
        megatron_to_hf,
        verify,
    )

    limit_malloc_retention()

    start = time.monotonic()
    try:
        if a.to_hf:
            megatron_to_hf(a.megatron_dir, a.out, max_shard_bytes=int(a.max_shard_size * 1024**3),
                           hf_config=a.hf_config, prefix=a.prefix, tokenizer=a.tokenizer)
            hf_dir, meg_dir = a.out, a.megatron_dir
        elif a.out:
            hf_to_megatron(a.hf_dir, a.out, tp=a.tp, pp=a.pp, ep=a.ep)
            hf_dir, meg_dir = a.hf_dir, a.out
        else:
            hf_dir, meg_dir = a.hf_dir, a.megatron_dir
        if a.out:
            logging.info("wrote %s in %.1fs", a.out, time.monotonic() - start)
        if a.verify:
            diff = verify(hf_dir, meg_dir, hf_config=a.hf_config)
            print(f"verify: max abs logit difference {diff:.3e} (fp32, fixed prompt)")
            if a.verify_tol is not None and diff > a.verify_tol:
                print(f"convert_hf: error: difference {diff:.3e} > --verify-tol {a.verify_tol}",
                      file=sys.stderr)
                return 2
    except (ConversionError, CheckpointError) as e:
        print(f"convert_hf: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
