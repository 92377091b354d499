"""Exported HF tensors equal the HF state dict the model was loaded from, bit for bit."""

from __future__ import annotations

import pytest
import torch

from tests.convert.tiny import make_hf_model, read_hf_dir
from tests.dist import run_distributed


def _export_worker(rank, world, layout, dirs, dst, bucket_bytes, ddp):
    from transformers import AutoConfig

    from dapo_megatron.convert import load_hf_state_dict
    from dapo_megatron.convert.export import export_hf_weights
    from dapo_megatron.policy.model import build_model
    from dapo_megatron.policy.parallel import destroy_parallel, init_parallel
    from tests.convert.tiny import read_hf_dir

    init_parallel(**layout)
    out = {}
    for fam, d in dirs.items():
        chunks = build_model(AutoConfig.from_pretrained(d), wrap_ddp=ddp)
        load_hf_state_dict(chunks, read_hf_dir(d))
        got, n_buckets = {}, 0
        for bucket in export_hf_weights(chunks, bucket_bytes=bucket_bytes, dst=dst):
            n_buckets += 1
            for name, t in bucket:
                assert name not in got, f"{name} exported twice"
                got[name] = t.clone().numpy()
        out[fam] = (got, n_buckets)
    destroy_parallel()
    return out


@pytest.mark.dist
@pytest.mark.parametrize(
    "layout,fams,dst,ddp",
    [
        ({"tp": 2}, ("llama", "qwen2", "qwen3_moe"), 0, True),
        ({"pp": 2}, ("qwen2", "qwen3", "mixtral"), 0, False),
        ({"ep": 2}, ("qwen2_moe",), None, False),
    ],
    ids=["tp2-ddp", "pp2", "ep2-all-ranks"],
)
def test_export_is_bit_exact(tmp_path, layout, fams, dst, ddp):
    dirs = {}
    for fam in fams:
        dirs[fam] = str(tmp_path / fam)
        make_hf_model(fam, dirs[fam], seed=3)
    bucket_bytes = 64 * 1024
    results = run_distributed(_export_worker, 2, layout, dirs, dst, bucket_bytes, ddp)
    for rank, per_family in enumerate(results):
        for fam, (got, n_buckets) in per_family.items():
            assert n_buckets == results[0][fam][1], "ranks yielded different bucket counts"
            if dst is not None and rank != dst:
                assert got == {}
                continue
            ref = read_hf_dir(dirs[fam])
            assert sorted(got) == sorted(ref), f"{fam}: names differ"
            for name, t in ref.items():
                assert torch.equal(torch.from_numpy(got[name]), t), f"{fam} {name} differs"
            assert n_buckets > 1
