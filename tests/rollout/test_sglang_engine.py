"""SGLang engine without a GPU: launch args, bucketing, names, payloads, parsing, and a
stand-in server process (tests/rollout/fake_sglang_server.py, built on SGLang 0.5.23's own
request classes and weight-update manager) that really dies mid-request."""

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from dapo_megatron.rollout.buckets import bucket_nbytes, rebucket
from dapo_megatron.rollout.protocol import RolloutEngine, SamplingParams
from dapo_megatron.rollout.sglang_engine import SGLangEngine
from dapo_megatron.rollout.sglang_api import (
    SGLangConfig,
    build_generate_payload,
    check_logprob_support,
    launch_command,
    launch_env,
    map_weight_names,
    serialize_bucket,
    to_samples,
)
from tests import sglang_cpu

FAKE = str(Path(__file__).with_name("fake_sglang_server.py"))
needs_sglang = pytest.mark.skipif(bool(sglang_cpu.load()), reason=str(sglang_cpu.load()))


def fake_launch_cmd(log, marker="", step_delay=0.0, tp_size=1):
    return (sys.executable, FAKE, "--port", "{port}", "--log", str(log), "--tp-size", str(tp_size),
            "--die-marker", str(marker), "--step-delay", str(step_delay))


def fake_tokens(prompt, seed, version, max_new, stops=()):
    """The fake server's generation rule, re-stated independently."""
    out = []
    for k in range(max_new):
        tok = (sum(prompt) + 7 * k + seed + version) % 50
        out.append(tok)
        if tok in stops:
            return out, "stop"
    return out, "length"


# ---------------------------------------------------------------------- pure pieces
def test_launch_command_and_per_node_configs():
    cfg = SGLangConfig(model_path="/ckpt/qwen", tp_size=2, base_gpu_id=4, mem_fraction_static=0.35,
                       return_original_logprob=True, extra_args=("--attention-backend", "fa3"))
    cmd = launch_command(cfg, 31000)
    assert cmd[:3] == [sys.executable, "-m", "sglang.launch_server"]
    pairs = dict(zip(cmd[3::2], cmd[4::2]))
    assert pairs["--model-path"] == "/ckpt/qwen" and pairs["--port"] == "31000"
    assert pairs["--tp-size"] == "2" and pairs["--base-gpu-id"] == "4"
    assert pairs["--mem-fraction-static"] == "0.35"
    assert "--enable-memory-saver" in cmd and cmd[-2:] == ["--attention-backend", "fa3"]
    assert "--enable-deterministic-inference" in cmd  # else sampling_seed is ignored
    assert "--enable-deterministic-inference" not in launch_command(
        SGLangConfig(model_path="m", deterministic_inference=False), 1)
    assert launch_env(cfg)["SGLANG_RETURN_ORIGINAL_LOGPROB"] == "1"
    assert launch_env(cfg)["SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION"] == "false"
    assert "SGLANG_RETURN_ORIGINAL_LOGPROB" not in launch_env(SGLangConfig(model_path="x", env={}))
    # Each engine's GPUs come from dapo_megatron.resolve (tests/test_resolve.py).
    from dapo_megatron.config import load_config
    from dapo_megatron.rollout.sglang_engine import sglang_config_from

    run = load_config(None, ["rollout.engine=sglang", "rollout.engine_tp=2", "parallel.gpus_per_node=8",
                             "parallel.nodes=2", "model.hf_dir=null", "model.vocab_size=256"], check_layout=False)
    run.model.hf_dir = "/ckpt/qwen"
    assert [sglang_config_from(run, k).base_gpu_id for k in range(8)] == [0, 2, 4, 6] * 2
    with pytest.raises(ValueError, match="model_path"):
        launch_command(SGLangConfig(), 1)
    assert isinstance(SGLangEngine(SGLangConfig(), start=False), RolloutEngine)


def test_rebucket_bounds_size_and_keeps_order():
    gen = torch.Generator().manual_seed(0)
    sizes = torch.randint(1, 300, (40,), generator=gen).tolist() + [5000]
    tensors = [(f"t{i}", torch.zeros(s)) for i, s in enumerate(sizes)]
    source = [tensors[i : i + 7] for i in range(0, len(tensors), 7)]
    limit = 1024 * 4
    out = list(rebucket(iter(source), limit))
    assert [n for b in out for n, _ in b] == [n for n, _ in tensors]
    for b in out:
        assert bucket_nbytes(b) <= limit or len(b) == 1
    assert [len(b) for b in out if bucket_nbytes(b) > limit] == [1]  # the 20 kB tensor alone
    # Greedy: no two neighbouring buckets could have been merged.
    for a, b in zip(out, out[1:]):
        assert bucket_nbytes(a) + b[0][1].numel() * 4 > limit
    with pytest.raises(ValueError, match="max_bytes"):
        list(rebucket(source, 0))


def test_map_weight_names():
    t = torch.zeros(1)
    bucket = [("model.embed_tokens.weight", t), ("lm_head.weight", t),
              ("model.layers.0.self_attn.rotary_emb.inv_freq", t), ("model.norm.weight", t)]
    assert [n for n, _ in map_weight_names(bucket)] == [
        "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]
    assert [n for n, _ in map_weight_names(bucket, tie_word_embeddings=True,
                                           rename={"model.norm.weight": "model.final_norm.weight"})] == [
        "model.embed_tokens.weight", "model.final_norm.weight"]


def test_generate_payload_expands_samples_with_own_rid_and_seed():
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=9, stop_token_ids=[2],
                            stop_strings=["</answer>"], seed=4)
    payload = build_generate_payload([[1, 2], [3]], params, ["a", "b"])
    assert payload["input_ids"] == [[1, 2]] * 3 + [[3]] * 3
    assert payload["rid"] == ["a/0", "a/1", "a/2", "b/0", "b/1", "b/2"]
    assert payload["return_logprob"] is True and payload["stream"] is False
    sps = payload["sampling_params"]
    assert all(sp["n"] == 1 and sp["max_new_tokens"] == 9 and sp["stop_token_ids"] == [2]
               and sp["stop"] == ["</answer>"] and sp["no_stop_trim"] and sp["top_k"] == -1
               for sp in sps)
    seeds = [sp["sampling_seed"] for sp in sps]
    assert len(set(seeds)) == 6 and all(0 <= s < 2**31 for s in seeds)
    assert seeds == [sp["sampling_seed"] for sp in build_generate_payload([[1, 2], [3]], params, ["a", "b"])["sampling_params"]]
    json.dumps(payload)  # must be JSON-serialisable as is


def test_logprob_support_is_strict():
    check_logprob_support(SamplingParams(temperature=0.7), original_logprob=False)
    check_logprob_support(SamplingParams(return_raw_logprobs=True), original_logprob=True)
    with pytest.raises(ValueError, match="top_p"):
        check_logprob_support(SamplingParams(top_p=0.7), False)
    check_logprob_support(SamplingParams(top_p=0.7, return_logprobs=False), False)  # eval
    assert build_generate_payload([[1]], SamplingParams(return_logprobs=False), ["e"])["return_logprob"] is False
    with pytest.raises(ValueError, match="temperature 0.7"):
        check_logprob_support(SamplingParams(temperature=0.7), True)
    with pytest.raises(ValueError, match="return_original_logprob"):
        check_logprob_support(SamplingParams(temperature=0.7, return_raw_logprobs=True), False)


def test_response_parsing_matches_by_rid():
    params = SamplingParams(n=2, max_new_tokens=3)
    def out(rid, toks, kind):
        return {"text": "", "output_ids": toks, "meta_info": {
            "id": rid, "finish_reason": {"type": kind},
            "output_token_logprobs": [[-0.5 * (t + 1), t, None] for t in toks]}}
    response = [out("q/1", [4], "stop"), out("p/0", [1, 2, 3], "length"),
                out("p/1", [], "abort"), out("q/0", [7, 8], "stop")]
    samples = to_samples(response, [[0], [0]], params, ["p", "q"], 7, False)
    assert [[s.token_ids for s in g] for g in samples] == [[[1, 2, 3], []], [[7, 8], [4]]]
    assert [[s.finish_reason for s in g] for g in samples] == [["length", "abort"], ["stop", "stop"]]
    assert samples[0][0].logprobs == [-1.0, -1.5, -2.0] and samples[0][0].raw_logprobs is None
    assert all(s.weight_version == 7 and s.request_id == ("p", "q")[s.prompt_index]
               for g in samples for s in g)
    with pytest.raises(ValueError, match="expected 4"):
        to_samples(response[:3], [[0], [0]], params, ["p", "q"], 7, False)
    tokens_only = [dict(r, meta_info={k: v for k, v in r["meta_info"].items()
                                      if k != "output_token_logprobs"}) for r in response]
    eval_params = SamplingParams(n=2, max_new_tokens=3, top_p=0.7, return_logprobs=False)
    plain = to_samples(tokens_only, [[0], [0]], eval_params, ["p", "q"], 7, False)
    assert plain[1][0].token_ids == [7, 8] and plain[1][0].logprobs == []
    bad = [dict(r, meta_info=dict(r["meta_info"], finish_reason=None)) for r in response]
    with pytest.raises(ValueError, match="finish_reason"):
        to_samples(bad, [[0], [0]], params, ["p", "q"], 7, False)


# ---------------------------------------------------------------------- with a server process
def read_log(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture
def fake(tmp_path):
    if sglang_cpu.load():
        pytest.skip(sglang_cpu.load())
    engines = []

    def make(step_delay=0.0, die=False, provider=None, tp_size=1):
        log, marker = tmp_path / "events.jsonl", tmp_path / "die"
        if die:
            marker.write_text("x")
        cfg = SGLangConfig(
            tp_size=tp_size, startup_timeout_s=120, request_timeout_s=60,
            launch_cmd=fake_launch_cmd(log, marker, step_delay, tp_size),
        )
        engine = SGLangEngine(cfg, weights_provider=provider)
        engines.append(engine)
        return engine, log

    yield make
    for engine in engines:
        engine.shutdown()


def expected_for(prompts, params, rids, version):
    from dapo_megatron.rollout.sampling import row_seed

    return [[fake_tokens(p, row_seed(params.seed, rid, j) & 0x7FFFFFFF, version,
                         params.max_new_tokens, params.stop_token_ids)[0]
             for j in range(params.n)] for p, rid in zip(prompts, rids)]


def test_fake_server_generate_sync_release_resume(fake):
    engine, log = fake(tp_size=2)
    prompts, rids = [[1, 2, 3], [9]], ["x", "y"]
    params = SamplingParams(n=2, max_new_tokens=6, stop_token_ids=[11, 23], seed=1)
    out = engine.generate(prompts, params, rids)
    assert [[s.token_ids for s in g] for g in out] == expected_for(prompts, params, rids, 0)
    for g in out:
        for s in g:
            assert s.logprobs == [-(t + 1) / 100 for t in s.token_ids]
            assert s.finish_reason == ("stop" if s.token_ids[-1] in (11, 23) else "length")

    weights = [(f"w{i}", torch.randn(100 + 50 * i)) for i in range(8)]
    engine.update_weights([weights[:3], weights[3:]], version=5)
    syncs = [e for e in read_log(log) if e["path"] == "/update_weights_from_tensor"]
    assert [n for e in syncs for n in e["names"]] == [n for n, _ in weights]
    assert [e["flush_cache"] for e in syncs] == [False] * (len(syncs) - 1) + [True]
    assert all(e["ranks"] == 2 and e["weight_version"] == "5" for e in syncs)
    # One request per bucket as the policy cut it (rollout.weight_bucket_mb, one place).
    assert [e["names"] for e in syncs] == [[n for n, _ in weights[:3]], [n for n, _ in weights[3:]]]
    assert all(e["status"] == 200 and e["load_format"] == "flattened_bucket" for e in syncs)
    paths = [e["path"] for e in read_log(log) if "weight" in e["path"]]
    assert paths == ["/begin_weight_update"] + ["/update_weights_from_tensor"] * len(syncs) + [
        "/end_weight_update"]  # one session around the whole version
    assert engine.weight_version == 5 and engine.last_sync["bytes"] == sum(t.numel() * 4 for _, t in weights)
    out = engine.generate(prompts, params, rids)
    assert [[s.token_ids for s in g] for g in out] == expected_for(prompts, params, rids, 5)
    assert all(s.weight_version == 5 for g in out for s in g)

    engine.release_memory()
    assert engine.released_memory() == ["cuda_graph", "kv_cache", "weights"]
    assert engine.health()
    assert read_log(log)[-1]["path"] == "/health"  # no generation while memory is released
    with pytest.raises(RuntimeError, match="released"):
        engine.generate(prompts, params, rids)
    engine.resume_memory(["weights"])
    events = read_log(log)
    assert [e["path"] for e in events[-4:]] == ["/flush_cache", "/release_memory_occupation",
                                                "/health", "/resume_memory_occupation"]
    assert events[-3]["body"] == {"tags": ["kv_cache", "weights", "cuda_graph"]}
    assert events[-1]["body"] == {"tags": ["weights"]} and events[-1]["status"] == 200
    engine.resume_memory(["weights"])  # already resident: SGLang would raise, so not sent
    assert len(read_log(log)) == len(events)
    assert engine.health() and read_log(log)[-1]["path"] == "/health"  # KV cache still out
    engine.resume_memory()
    assert read_log(log)[-1]["body"] == {"tags": ["cuda_graph", "kv_cache"]}
    assert engine.health() and read_log(log)[-1]["path"] == "/health_generate"


def test_distributed_sync_posts_metadata_while_trainer_broadcasts(fake):
    engine, log = fake()
    engine.init_weights_update_group("10.0.0.1", 29600, rank_offset=1, world_size=3, group_name="g")
    weights = [("a", torch.zeros(100)), ("b", torch.zeros(50, dtype=torch.bfloat16)),
               ("c", torch.zeros(3, 4))]
    broadcasts = []
    # Buckets as the policy cut them; a tied lm_head alone maps to nothing and is skipped.
    buckets = [weights[:1], [("lm_head.weight", torch.zeros(2))], weights[1:]]
    engine.tie_word_embeddings = True
    engine.update_weights_from_distributed(buckets, 8, broadcasts.append, group_name="g")
    events = read_log(log)
    init = [e for e in events if e["path"] == "/init_weights_update_group"][0]["body"]
    assert init == {"master_address": "10.0.0.1", "master_port": 29600, "rank_offset": 1,
                    "world_size": 3, "group_name": "g", "backend": "nccl"}
    posts = [e["body"] for e in events if e["path"] == "/update_weights_from_distributed"]
    assert [p["names"] for p in posts] == [[n for n, _ in b] for b in broadcasts] == [["a"], ["b", "c"]]
    assert posts[1]["dtypes"] == ["bfloat16", "float32"] and posts[1]["shapes"] == [[50], [3, 4]]
    assert [p["flush_cache"] for p in posts] == [False, True]
    assert engine.weight_version == 8


def test_owner_serialized_buckets_are_posted_per_rank_in_one_session(fake):
    engine, log = fake(tp_size=2)
    buckets = [[("a", torch.ones(3)), ("lm_head.weight", torch.ones(2))], [("b", torch.ones(5))]]
    mapped = [map_weight_names(b, tie_word_embeddings=True) for b in buckets]
    assert [[n for n, _ in b] for b in mapped] == [["a"], ["b"]]  # tied: lm_head dropped
    with pytest.raises(RuntimeError, match="begin_weight_update"):
        engine.update_weights_from_serialized(serialize_bucket(mapped[0], 2), 4)
    engine.begin_weight_update()
    for bucket, last in zip(mapped, (False, True)):
        payloads = serialize_bucket(bucket, engine.get_tp_size())
        assert len(payloads) == 2
        engine.update_weights_from_serialized(payloads, 4, flush_cache=last, nbytes=bucket_nbytes(bucket))
    with pytest.raises(RuntimeError, match="part-way"):
        engine.generate([[1]], SamplingParams(max_new_tokens=2))  # mid-session: mixed weights
    engine.end_weight_update(4)
    syncs = [e for e in read_log(log) if e["path"] == "/update_weights_from_tensor"]
    assert [e["names"] for e in syncs] == [["a"], ["b"]]
    assert [e["flush_cache"] for e in syncs] == [False, True] and all(e["ranks"] == 2 for e in syncs)
    assert engine.weight_version == 4 and engine.last_sync["bytes"] == 32
    engine.begin_weight_update()
    with pytest.raises(ValueError, match="tp_size=2"):
        engine.update_weights_from_serialized(serialize_bucket(mapped[0], 1), 5)
    engine.end_weight_update(5)


def test_failed_sync_blocks_generation_until_a_full_sync(fake):
    engine, _ = fake()
    with pytest.raises(ValueError, match="Unknown weight name: reject"):
        engine.update_weights([[("w", torch.ones(4)), ("reject", torch.ones(4))]], version=2)
    assert engine.weight_version == 0
    with pytest.raises(RuntimeError, match="part-way"):
        engine.generate([[1]], SamplingParams(max_new_tokens=2))
    engine.update_weights([[("w", torch.ones(4))]], version=3)
    assert engine.generate([[1]], SamplingParams(max_new_tokens=2))[0][0].weight_version == 3


def test_abort_in_flight_request(fake):
    engine, log = fake(step_delay=0.02)
    params = SamplingParams(n=2, max_new_tokens=2000)
    result = {}
    thread = threading.Thread(target=lambda: result.update(
        out=engine.generate([[1], [2]], params, ["keep", "drop"])))
    thread.start()
    time.sleep(1.0)
    engine.abort(["drop"])
    engine.abort(["keep"])
    thread.join(timeout=60)
    assert not thread.is_alive()
    aborted = [e["rid"] for e in read_log(log) if e["path"] == "/abort_request"]
    assert sorted(aborted) == ["drop/0", "drop/1", "keep/0", "keep/1"]
    assert all(s.finish_reason == "abort" and len(s.token_ids) < 2000 for g in result["out"] for s in g)


def test_aborted_samples_continue_from_their_partial_responses(fake):
    """Partial rollouts on SGLang: aborted samples come back with their tokens; continuing them
    sends prompt + partial response with the rest of the budget, under the sample's own rid
    and a seed of the continuation's own; stitched, each response is its partial tokens
    followed by what the fake server's rule (restated here) gives for that prefix and seed."""
    from dapo_megatron.rollout.partial import stitch
    from dapo_megatron.rollout.protocol import Resume
    from dapo_megatron.rollout.sampling import row_seed

    engine, log = fake(step_delay=0.02)
    params = SamplingParams(n=2, max_new_tokens=400, seed=5)
    result = {}
    thread = threading.Thread(target=lambda: result.update(out=engine.generate([[1, 2]], params, ["g"])))
    thread.start()
    time.sleep(1.0)
    engine.abort(["g"])
    thread.join(timeout=60)
    first = result["out"][0]
    assert [s.finish_reason for s in first] == ["abort", "abort"]
    # The fake serves its requests one after another: the second may not have started.
    assert 0 < len(first[0].token_ids) < 400 and len(first[1].token_ids) < 400

    engine.begin_weight_update(1)  # newer weights for the continuation
    engine.load_weight_bucket([("w", torch.ones(4))])
    engine.end_weight_update()
    resume = [[Resume(s.sample_index, tuple(s.token_ids), 5, "g") for s in reversed(first)]]
    cont = engine.generate([[1, 2]], params, ["g"], resume=resume)[0]
    assert [s.sample_index for s in cont] == [1, 0]  # one Sample per Resume, in its order
    posted = [e for e in read_log(log) if e["path"] == "/generate"][-1]["body"]
    assert posted["rid"] == ["g/1", "g/0"]
    for r, ids, sp, got in zip(resume[0], posted["input_ids"], posted["sampling_params"], cont):
        assert ids == [1, 2] + list(r.token_ids)
        assert sp["max_new_tokens"] == 400 - len(r.token_ids)
        seed = row_seed(5, f"g@{len(r.token_ids)}", r.sample_index) & 0x7FFFFFFF
        assert sp["sampling_seed"] == seed != row_seed(5, "g", r.sample_index) & 0x7FFFFFFF
        want, reason = fake_tokens(ids, seed, 1, 400 - len(r.token_ids))
        assert got.token_ids == want and got.finish_reason == reason == "length"
        assert got.weight_version == 1
    full = stitch(first, cont)
    assert all(len(s.token_ids) == 400 for s in full)
    for before, after in zip(first, full):
        assert after.token_ids[: len(before.token_ids)] == before.token_ids
        assert after.token_versions == [0] * len(before.token_ids) + [1] * (400 - len(before.token_ids))
    with pytest.raises(ValueError, match="no budget left"):
        engine.generate([[1]], SamplingParams(n=1, max_new_tokens=3), ["h"],
                        resume=[[Resume(0, (4, 5, 6), 0, "h")]])


def test_dead_server_is_restarted_weights_restored_and_batch_retried(fake, tmp_path):
    weights = [("w", torch.ones(4))]
    engine, log = fake(provider=lambda: ([weights], 9))
    engine.update_weights([weights], version=9)
    first_pid = engine.process.pid
    (tmp_path / "die").write_text("x")  # the next /generate kills the server mid-request
    params = SamplingParams(n=2, max_new_tokens=4, seed=3)
    out = engine.generate([[5, 5]], params, ["r"])
    assert engine.restarts == 1 and engine.process.pid != first_pid
    events = read_log(log)
    generates = [e for e in events if e["path"] == "/generate"]
    assert len(generates) == 2 and generates[0]["pid"] == first_pid != generates[1]["pid"]
    assert generates[0]["body"] == generates[1]["body"]  # the same batch, retried
    restored = [e for e in events if e["path"] == "/update_weights_from_tensor"]
    assert [e["pid"] for e in restored] == [first_pid, generates[1]["pid"]]
    # The retried batch ran on the restored version-9 weights.
    assert [[s.token_ids for s in g] for g in out] == expected_for([[5, 5]], params, ["r"], 9)
    assert engine.weight_version == 9


def test_restart_without_provider_refuses_stale_weights(fake, tmp_path):
    engine, _ = fake()
    engine.update_weights([[("w", torch.ones(2))]], version=2)
    (tmp_path / "die").write_text("x")
    with pytest.raises(RuntimeError, match="weights_provider"):
        engine.generate([[1]], SamplingParams(max_new_tokens=2))


def test_repeated_deaths_give_up_and_health_reports_it(fake, tmp_path):
    engine, _ = fake()
    engine.cfg.max_restarts = 0
    (tmp_path / "die").write_text("x")
    with pytest.raises(RuntimeError, match="died"):
        engine.generate([[1]], SamplingParams(max_new_tokens=2))
    assert not engine.health()
    engine.restart()
    assert engine.health()
    pid = engine.process.pid
    engine.shutdown()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_server_whose_picked_port_was_taken_starts_on_another(fake, monkeypatch, caplog):
    """Engines starting side by side can be handed one port. The second server cannot bind it,
    and until it dies the first server answers its health checks: the engine must not take that
    answer for its own server's, and starts its server again on a fresh port."""
    from dapo_megatron.rollout import sglang_engine

    first, first_log = fake()
    picks = iter([first.port])
    real = sglang_engine.free_port
    monkeypatch.setattr(sglang_engine, "free_port", lambda host="": next(picks, None) or real(host))
    with caplog.at_level("WARNING", logger=sglang_engine.__name__):
        second, _ = fake()
    assert f"could not bind port {first.port}" in caplog.text
    assert second.port != first.port and second.alive() and first.alive()
    params = SamplingParams(n=1, max_new_tokens=3, seed=1)
    assert len(second.generate([[5, 6]], params)[0][0].token_ids) == 3
    # Both servers log to one file, each event with its pid: the request reached the second's.
    generated = [e["pid"] for e in read_log(first_log) if e["path"] == "/generate"]
    assert generated == [second.process.pid]


def test_engine_pool_shutdown_ends_the_server_process_group(fake):
    """The server runs in its own session: killing the actor alone would leave it (and its
    GPU memory) behind, so EnginePool.shutdown has each engine end its process group."""
    from dapo_megatron.controller.engines import EnginePool
    from dapo_megatron.rollout.manager import RolloutManager

    engine, _ = fake()
    pid = engine.process.pid
    pool = EnginePool.__new__(EnginePool)  # no config: the pool around an existing engine
    pool.manager = RolloutManager([engine])
    pool.shutdown()
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)


def test_server_dies_with_an_engine_killed_without_shutdown(tmp_path):
    """ray.kill (or the OOM killer) SIGKILLs the engine's process: no shutdown() runs, and
    the server, in a session of its own, would keep its GPU memory. The engine's reaper
    (rollout/reaper.py) ends the server's process group once its parent is gone."""
    import signal
    import subprocess
    import time

    if sglang_cpu.load():
        pytest.skip(sglang_cpu.load())
    script = (
        "import sys, time\n"
        "from dapo_megatron.rollout.sglang_engine import SGLangConfig, SGLangEngine\n"
        f"cmd = {fake_launch_cmd(tmp_path / 'events.jsonl', tmp_path / 'die')!r}\n"
        "engine = SGLangEngine(SGLangConfig(startup_timeout_s=120, launch_cmd=cmd))\n"
        "print(engine.process.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        server = int(parent.stdout.readline())
        os.killpg(server, 0)  # the server's group is up
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                os.killpg(server, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        with pytest.raises(ProcessLookupError):
            os.killpg(server, 0)
    finally:
        parent.kill()
