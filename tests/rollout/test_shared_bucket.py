"""The same-node weight hand-off: a bucket written to a shared-memory file and mapped back.

Every dtype a model carries, odd shapes (alignment of the next tensor), a 0-dim tensor and
an empty one come back bit-identical, and the views are read-only copies' sources: loading
them into a model gives that model the same parameters as loading the originals.
"""

import os

import torch

from dapo_megatron.rollout.weight_sync import read_shared_bucket, write_shared_bucket


def test_round_trip_is_bit_identical_for_every_dtype_and_shape(tmp_path):
    g = torch.Generator().manual_seed(0)
    bucket = [
        ("a.bf16", torch.randn(3, 5, generator=g).to(torch.bfloat16)),
        ("b.fp32", torch.randn(7, generator=g)),
        ("c.fp16", torch.randn(2, 3, 1, generator=g).to(torch.float16)),
        ("d.int64", torch.arange(5)),
        ("e.scalar", torch.tensor(3.25, dtype=torch.float64)),
        ("f.empty", torch.empty(0, 4)),
        ("g.view", torch.randn(6, 8, generator=g)[:, 2:5]),  # not contiguous
    ]
    path = str(tmp_path / "bucket")
    meta = write_shared_bucket(bucket, path)
    assert all(o % 64 == 0 for o in meta.offsets)
    got = read_shared_bucket(path, meta)
    assert [n for n, _ in got] == [n for n, _ in bucket]
    for (_, want), (_, have) in zip(bucket, got):
        assert have.dtype == want.dtype and have.shape == want.shape
        assert torch.equal(have.reshape(-1).view(torch.uint8) if have.numel() else have,
                           want.contiguous().reshape(-1).view(torch.uint8) if want.numel() else want)
    assert os.path.getsize(path) == meta.nbytes


def test_an_engine_loads_a_shared_bucket_like_the_tensors_themselves(tmp_path):
    from dapo_megatron.rollout.embedded import EmbeddedEngine, build_hf_model
    from tests.controller.test_engines import _cfg

    hf = _cfg().model.hf_config_dict(vocab_size=64)
    torch.manual_seed(1)
    source = build_hf_model(hf)
    state = [(k, v.clone()) for k, v in source.state_dict().items()]
    direct, shared = EmbeddedEngine(hf), EmbeddedEngine(hf)
    direct.update_weights([state], version=1)
    shared.begin_weight_update(1)
    for i in range(0, len(state), 3):
        path = str(tmp_path / f"b{i}")
        shared.load_weight_bucket_shared(path, write_shared_bucket(state[i:i + 3], path))
        os.unlink(path)  # the engine copied it: its model keeps no mapping of the file
    shared.end_weight_update()
    for (name, a), b in zip(direct.model.state_dict().items(), shared.model.state_dict().values()):
        assert torch.equal(a, b), name
