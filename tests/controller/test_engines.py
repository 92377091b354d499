"""EnginePool on real Ray actors: streaming chunks, abort, and a rollout actor killed mid-step."""

import datetime
import logging
import time

import pytest
import torch

from dapo_megatron.config import load_config
from dapo_megatron.controller.engines import EnginePool
from dapo_megatron.rollout.embedded import build_hf_model
from dapo_megatron.rollout.protocol import SamplingParams

ray = pytest.importorskip("ray")


class StateDictSource:
    """A weight source that pushes an HF model's state dict from the driver, as the policy
    ranks push theirs (rollout.weight_sync), in buckets of 4 tensors."""

    def __init__(self, model):
        self.state = [(k, v.clone()) for k, v in model.state_dict().items()]

    def push_weights(self, engines, version):
        from dapo_megatron.rollout.weight_sync import push_bucket_colocated

        for i in range(0, len(self.state), 4):
            push_bucket_colocated(engines, self.state[i:i + 4], "embedded")
        return {"bytes": 0.0, "seconds": 0.0}


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


def _cfg():
    return load_config(None, [
        "model.hidden_size=32", "model.num_layers=2", "model.num_attention_heads=2",
        "model.num_key_value_heads=2", "model.intermediate_size=64", "model.max_position_embeddings=256",
        "algo.max_response_length=128", "algo.overlong_buffer=8", "rollout.max_prompt_length=16",
        "trainer.max_tokens_per_microbatch=512", "rollout.num_engines=1",
    ])


@pytest.fixture
def synced_pool(ray_local):
    """An EnginePool of one embedded engine given seeded random weights at `version`."""
    pools = []

    def make(version):
        cfg = _cfg()
        hf = cfg.model.hf_config_dict(vocab_size=64)
        torch.manual_seed(0)
        model = build_hf_model(hf)
        pool = EnginePool(cfg, hf, weight_source=StateDictSource(model))
        pools.append(pool)
        pool.sync_weights(version)
        return pool

    yield make
    for pool in pools:
        pool.shutdown()


def _collect(stream):
    """{prompt index: its samples} of a whole streamed round."""
    return {i: g for idx, groups in stream for i, g in zip(idx, groups)}


def test_streaming_matches_direct_generation_and_restart(synced_pool, caplog):
    pool = synced_pool(version=3)
    prompts = [[1, 5 + i, 9] for i in range(8)]
    params = SamplingParams(n=4, max_new_tokens=8, seed=11)
    first = _collect(pool.generate_streaming(prompts, params, tag="a"))
    assert sorted(first) == list(range(8))
    assert all(len(g) == 4 and g[0].weight_version == 3 for g in first.values())

    # Kill the engine actor while the round is generating: right after the first group
    # arrives, the second chunk is running on it. The manager replaces the engine, replays
    # the current weights into it and retries the chunk; sampling is seeded per request,
    # so the retried groups equal the ones generated before the kill.
    caplog.set_level(logging.WARNING, logger="dapo_megatron.rollout.manager")
    long = SamplingParams(n=4, max_new_tokens=100, seed=11)
    reference = _collect(pool.generate_streaming(prompts, long, tag="a"))
    got = {}
    for idx, groups in pool.generate_streaming(prompts, long, tag="a"):
        if not got:
            ray.kill(pool.engines[0])
        got.update(zip(idx, groups))
    assert pool.restarts == 1
    assert any("replacing it" in r.message for r in caplog.records)
    assert sorted(got) == list(range(8))
    for i in range(8):
        assert [s.token_ids for s in got[i]] == [s.token_ids for s in reference[i]]
        assert got[i][0].weight_version == 3


def test_abort_all_stops_inflight_chunks(synced_pool):
    pool = synced_pool(version=1)
    prompts = [[1, 5 + i, 9] for i in range(16)]
    done = []
    t0 = time.perf_counter()
    for idx, _ in pool.generate_streaming(prompts, SamplingParams(n=4, max_new_tokens=100, seed=1), tag="b"):
        done.extend(idx)
        pool.abort_all()  # the first group is enough: drop the rest of the round
        break
    assert len(done) == 1
    assert time.perf_counter() - t0 < 60
    # The pool serves the next round normally.
    rest = [i for idx, _ in pool.generate_streaming(prompts[:2], SamplingParams(n=2, max_new_tokens=4), tag="c")
            for i in idx]
    assert sorted(rest) == [0, 1]


def test_rendezvous_store_listens_in_the_driver_before_its_port_is_named(ray_local):
    """PolicyGroup's torch.distributed rendezvous: the driver hosts the store, already
    listening when its port is named (nothing can take the port in between), and a rank
    joins it as a client; one rank needs none."""
    import socket

    from dapo_megatron.controller import policy_group

    assert policy_group.rendezvous(1)[0] is None  # one rank: an in-process store
    store, addr, port = policy_group.rendezvous(2)
    assert addr == ray.util.get_node_ip_address() and port == store.port
    with socket.socket() as sock:  # taken: the store listens there
        with pytest.raises(OSError):
            sock.bind(("", port))
    client = torch.distributed.TCPStore(addr, port, 2, is_master=False, timeout=datetime.timedelta(seconds=30))
    client.set("rank1", "here")
    assert store.get("rank1") == b"here"
