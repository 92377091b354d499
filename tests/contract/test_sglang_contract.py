"""Our SGLang requests held against SGLang 0.5.23's own code, on CPU.

Each test runs the upstream piece that decides on a real server: the /generate JSON
contract gate, GenerateReqInput and SamplingParams; the io_struct classes FastAPI parses
control bodies into; the scheduler's SchedulerWeightUpdaterManager (weight-update
session, idle and tag rules) inside tests/rollout/fake_sglang_server.py; and SafeUnpickler
opening each TP rank's weight payload in a fresh process of its own tree. Skips (with the
reason) only where sglang 0.5.23 cannot be installed; see tests/sglang_cpu.py.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dapo_megatron.rollout.protocol import SamplingParams
from dapo_megatron.rollout.sglang_api import SGLangConfig, build_generate_payload, to_samples
from dapo_megatron.rollout.sglang_engine import SGLangEngine
from tests import sglang_cpu

REASON = sglang_cpu.load()
pytestmark = pytest.mark.skipif(bool(REASON), reason=str(REASON))
ROOT = Path(__file__).resolve().parents[2]


class CharTokenizer:
    """The server's tokenizer, as SamplingParams.normalize uses it (stop-string lengths)."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


def io_parse(cls, body):
    """What FastAPI makes of a JSON body for an endpoint typed `cls` (sglang's schema hook)."""
    import pydantic

    return pydantic.TypeAdapter(cls).validate_python(json.loads(json.dumps(body)))


# ---------------------------------------------------------------------- /generate
@pytest.mark.parametrize("params", [
    SamplingParams(n=3, temperature=1.0, max_new_tokens=9, stop_token_ids=[2], stop_strings=["</a>"], seed=4),
    SamplingParams(n=1, temperature=0.6, max_new_tokens=1, seed=2**40 + 7),
    SamplingParams(n=2, temperature=1.0, top_p=0.7, max_new_tokens=5, return_logprobs=False),
])
def test_generate_bodies_pass_sglang_admission(params):
    from sglang.srt.entrypoints.api_contract import generate_contract_error
    from sglang.srt.managers.io_struct import GenerateReqInput
    from sglang.srt.sampling.sampling_params import SamplingParams as SGLSamplingParams

    body = build_generate_payload([[1, 2, 3], [4]], params, ["p", "q"])
    assert generate_contract_error(json.loads(json.dumps(body))) is None
    req = io_parse(GenerateReqInput, body)
    req.normalize_batch_and_arguments()
    assert req.batch_size == 2 * params.n and req.rid == body["rid"]
    for sp in body["sampling_params"]:
        sgl = SGLSamplingParams(**sp)
        sgl.normalize(CharTokenizer())
        sgl.verify(100)
        assert sgl.sampling_seed == sp["sampling_seed"] and sgl.max_new_tokens == params.max_new_tokens
    # The gate is live: what SGLang refuses, it refuses here.
    bad = dict(body, sampling_params=[dict(sp, seed=1) for sp in body["sampling_params"]])
    assert "unknown field `seed`" in generate_contract_error(bad)


def test_continuation_bodies_pass_sglang_admission():
    """Partial rollouts: prompt + partial response as the input, the rest of the budget as
    max_new_tokens, one request per continued sample (sglang_api.plan_samples)."""
    from sglang.srt.entrypoints.api_contract import generate_contract_error
    from sglang.srt.managers.io_struct import GenerateReqInput
    from sglang.srt.sampling.sampling_params import SamplingParams as SGLSamplingParams

    from dapo_megatron.rollout.protocol import Resume

    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=9, stop_token_ids=[2], seed=4)
    resume = [None, [Resume(3, (7, 8), 4, "q"), Resume(0, (), 4, "q")]]
    body = build_generate_payload([[1, 2, 3], [4]], params, ["p", "q"], resume)
    assert generate_contract_error(json.loads(json.dumps(body))) is None
    req = io_parse(GenerateReqInput, body)
    req.normalize_batch_and_arguments()
    assert req.batch_size == 4 + 2 and req.rid == ["p/0", "p/1", "p/2", "p/3", "q/3", "q/0"]
    assert body["input_ids"][4:] == [[4, 7, 8], [4]]
    budgets = []
    for sp in body["sampling_params"]:
        sgl = SGLSamplingParams(**sp)
        sgl.normalize(CharTokenizer())
        sgl.verify(100)
        budgets.append(sgl.max_new_tokens)
    assert budgets == [9, 9, 9, 9, 7, 9]
    seeds = [sp["sampling_seed"] for sp in body["sampling_params"]]
    assert len(set(seeds)) == 6  # a continuation's seed is its own, even with an empty prefix


def test_responses_built_from_sglang_types_parse():
    from sglang.api.v1.api_types import GenerateResponse
    from sglang.srt.managers.schedule_batch import FINISH_ABORT, FINISH_LENGTH, FINISH_MATCHED_TOKEN

    def answer(rid, tokens, finish):
        value = {"text": "", "output_ids": tokens, "meta_info": {
            "id": rid, "finish_reason": finish.to_json(),
            "output_token_logprobs": [[-0.5 * (t + 1), t, None] for t in tokens]}}
        return GenerateResponse.from_json_value(value).to_json_value()  # SGLang's own encoder

    params = SamplingParams(n=2, max_new_tokens=3, stop_token_ids=[7])
    response = [answer("q/1", [4], FINISH_LENGTH(1)), answer("p/0", [1, 2, 3], FINISH_LENGTH(3)),
                answer("p/1", [], FINISH_ABORT("aborted")), answer("q/0", [5, 7], FINISH_MATCHED_TOKEN(7))]
    samples = to_samples(response, [[0], [0]], params, ["p", "q"], 3, False)
    assert [[s.token_ids for s in g] for g in samples] == [[[1, 2, 3], []], [[5, 7], [4]]]
    assert [[s.finish_reason for s in g] for g in samples] == [["length", "abort"], ["stop", "length"]]
    assert samples[1][0].logprobs == [-3.0, -4.0]


# ---------------------------------------------------------------------- control bodies
class Recorder:
    """Stands in for the HTTP transport: keeps every (method, path, body) the engine sends."""

    def __init__(self):
        self.calls = []

    def __call__(self, method, path, payload=None, timeout=0.0):
        self.calls.append((method, path, payload))
        return {"success": True, "message": "ok"}


def recorded_engine(tp_size=2, **kwargs):
    engine = SGLangEngine(SGLangConfig(tp_size=tp_size), start=False, **kwargs)
    engine._call = engine._request = Recorder()
    return engine, engine._call


def test_control_bodies_parse_into_sglang_io_structs():
    from sglang.srt.managers import io_struct as io

    engine, rec = recorded_engine()
    weights = [("a", torch.ones(4)), ("b", torch.zeros(20, dtype=torch.bfloat16))]
    engine.update_weights([weights], version=3)
    engine.init_weights_update_group("10.0.0.1", 29600, rank_offset=1, world_size=3)
    engine.update_weights_from_distributed([weights], 4, broadcast=lambda bucket: None)
    engine.release_memory()
    engine.resume_memory(["weights"])
    engine.resume_memory()
    engine._inflight["r"] = ["r/0"]
    engine.abort(["r"])
    classes = {
        "/begin_weight_update": io.BeginWeightUpdateReqInput,
        "/end_weight_update": io.EndWeightUpdateReqInput,
        "/update_weights_from_tensor": io.UpdateWeightsFromTensorReqInput,
        "/init_weights_update_group": io.InitWeightsUpdateGroupReqInput,
        "/update_weights_from_distributed": io.UpdateWeightsFromDistributedReqInput,
        "/release_memory_occupation": io.ReleaseMemoryOccupationReqInput,
        "/resume_memory_occupation": io.ResumeMemoryOccupationReqInput,
        "/abort_request": io.AbortReq,
    }
    parsed = {}
    for method, path, body in rec.calls:
        if path == "/flush_cache":
            assert method == "GET"  # its route takes GET or POST, no body
            continue
        assert method == "POST", path
        parsed.setdefault(path, []).append(io_parse(classes[path], body))
    assert sorted(parsed) == sorted(classes)
    tensors = parsed["/update_weights_from_tensor"]
    assert all(r.load_format == "flattened_bucket" and r.weight_version == "3" for r in tensors)
    assert all(len(r.serialized_named_tensors) == 2 for r in tensors)
    assert [r.flush_cache for r in tensors] == [False] * (len(tensors) - 1) + [True]
    dist = parsed["/update_weights_from_distributed"]
    assert [n for r in dist for n in r.names] == ["a", "b"] and dist[-1].dtypes[-1] == "bfloat16"
    from sglang.srt.constants import GPU_MEMORY_ALL_TYPES

    released = [set(r.tags) for r in parsed["/release_memory_occupation"]]
    resumed = [set(r.tags) for r in parsed["/resume_memory_occupation"]]
    assert released == [set(GPU_MEMORY_ALL_TYPES)]
    assert resumed == [{"weights"}, set(GPU_MEMORY_ALL_TYPES) - {"weights"}]
    assert parsed["/abort_request"][0].rid == "r/0" and not parsed["/abort_request"][0].abort_all


def test_broadcast_bucket_metadata_is_renamed_like_the_other_transports():
    """The disaggregated push's metadata (receive_weight_bucket) carries SGLang's names, as
    update_weights does; every broadcast tensor keeps its place (none is dropped)."""
    from sglang.srt.managers import io_struct as io

    from dapo_megatron.rollout.weight_sync import BucketMeta

    rename = {"model.norm.weight": "model.final_norm.weight"}
    engine, rec = recorded_engine(tie_word_embeddings=True, rename=rename)
    bucket = [("lm_head.weight", torch.ones(2, 3)), ("model.norm.weight", torch.ones(3))]
    engine.receive_weight_bucket(BucketMeta.of(bucket), "g")
    (_, path, body), = [c for c in rec.calls if c[1] == "/update_weights_from_distributed"]
    req = io_parse(io.UpdateWeightsFromDistributedReqInput, body)
    assert req.names == ["lm_head.weight", "model.final_norm.weight"] and req.group_name == "g"
    assert req.shapes == [[2, 3], [3]]


# ---------------------------------------------------------------------- the scheduler's manager
@pytest.fixture
def served(tmp_path):
    engines = []

    def make(tp_size=1):
        log = tmp_path / f"events{len(engines)}.jsonl"
        cfg = SGLangConfig(tp_size=tp_size, startup_timeout_s=120,
                           request_timeout_s=60,
                           launch_cmd=(sys.executable, str(ROOT / "tests/rollout/fake_sglang_server.py"),
                                       "--port", "{port}", "--log", str(log), "--tp-size", str(tp_size)))
        engine = SGLangEngine(cfg)
        engines.append(engine)
        return engine, log

    yield make
    for engine in engines:
        engine.shutdown()


def events(log):
    return [json.loads(line) for line in Path(log).read_text().splitlines()]


def test_weight_updates_pass_sglang_session_guard(served):
    engine, log = served(tp_size=2)
    weights = [(f"w{i}", torch.randn(30 + i)) for i in range(5)]
    buckets = [weights[:2], weights[2:4], weights[4:]]  # as the policy's export cut them
    engine.update_weights(buckets, version=6)
    engine.update_weights_from_distributed(buckets, 7, broadcast=lambda bucket: None)
    posted = [e for e in events(log) if e["path"].startswith("/update_weights_from")]
    assert len(posted) > 2 and all(e["status"] == 200 for e in posted)
    assert [n for e in posted if "names" in e for n in e["names"]] == [n for n, _ in weights]
    assert engine.weight_version == 7
    # The guard is live: SGLang's manager refuses an update outside a session.
    with pytest.raises(ValueError, match="between begin_weight_update"):
        engine._call("POST", "/update_weights_from_tensor", {
            "serialized_named_tensors": posted[0].get("payloads", ["AA=="] * 2), "weight_version": "8"})


def test_release_resume_follow_sglang_tag_rules(served):
    engine, log = served()
    engine.release_memory(["kv_cache"])
    engine.release_memory()  # the rest; kv_cache is not released twice
    engine.resume_memory(["kv_cache"])
    engine.resume_memory(["kv_cache"])  # resident already: not sent (SGLang raises)
    engine.resume_memory()
    memory = [e for e in events(log) if "memory_occupation" in e["path"]]
    assert all(e["status"] == 200 for e in memory)
    assert [e["body"]["tags"] for e in memory] == [
        ["kv_cache"], ["weights", "cuda_graph"], ["kv_cache"], ["cuda_graph", "weights"]]
    with pytest.raises(ValueError, match="KeyError"):  # what 0.5.23 does with a resident tag
        engine._call("POST", "/resume_memory_occupation", {"tags": ["weights"]})


# ---------------------------------------------------------------------- payloads, per rank
RECEIVER = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {root!r})
    from tests import sglang_cpu
    assert sglang_cpu.load() is None
    import pydantic
    from sglang.srt.managers.io_struct import UpdateWeightsFromTensorReqInput
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    rank = int(sys.argv[1])
    out = []
    for body in json.loads(sys.stdin.read()):
        req = pydantic.TypeAdapter(UpdateWeightsFromTensorReqInput).validate_python(body)
        # srt/managers/tp_worker.py, deserialize_own_rank: rank r opens entry r only.
        monkey_patch_torch_reductions()
        data = MultiprocessingSerializer.deserialize(req.serialized_named_tensors[rank])
        assert req.load_format == "flattened_bucket", req.load_format
        bucket = FlattenedTensorBucket(flattened_tensor=data["flattened_tensor"], metadata=data["metadata"])
        out += [[n, str(t.dtype), t.double().flatten().tolist()] for n, t in bucket.reconstruct_tensors()]
    print(json.dumps(out))
""")


def open_in_fresh_processes(bodies, tp_size):
    """SGLang's receiving side, one new interpreter per TP rank, each in its own session
    (not a fork of the sender), all while the sender is alive."""
    procs = [subprocess.Popen([sys.executable, "-c", RECEIVER.format(root=str(ROOT)), str(rank)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True) for rank in range(tp_size)]
    results = []
    for rank, proc in enumerate(procs):
        out, err = proc.communicate(json.dumps(bodies), timeout=600)
        assert proc.returncode == 0, f"TP rank {rank} could not open its payload:\n{err[-2000:]}"
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_each_tp_rank_opens_its_own_payload_in_another_process_tree():
    engine, rec = recorded_engine(tp_size=2)
    weights = [("model.embed_tokens.weight", torch.randn(3, 4)),
               ("model.norm.weight", torch.randn(4, dtype=torch.bfloat16))]
    engine.update_weights([weights[:1], weights[1:]], version=1)
    bodies = [body for _, path, body in rec.calls if path == "/update_weights_from_tensor"]
    assert len(bodies) == 2  # one request per bucket
    per_rank = open_in_fresh_processes(bodies, 2)
    assert per_rank[0] == per_rank[1]
    got = per_rank[0]
    assert [(n, d) for n, d, _ in got] == [(n, str(t.dtype)) for n, t in weights]
    for (_, _, values), (_, t) in zip(got, weights):
        assert values == t.double().flatten().tolist()


# ---------------------------------------------------------------------- weight-update group
SGLANG_GROUP_RANK = """
import json, sys, torch, torch.distributed as dist
from sglang.srt.utils import init_custom_process_group
from sglang.srt.utils.network import NetworkAddress
# One SGLang TP rank's side, as its ModelRunnerWeightUpdater runs it (sglang 0.5.23,
# srt/model_executor/model_runner_components/weight_updater.py): init_weights_update_group joins
# through tcp:// as rank_offset + tp_rank, update_weights_from_distributed receives each tensor by
# broadcast from 0, destroy_weights_update_group destroys the group. One command per line.
group = None
for line in sys.stdin:
    op, *args = json.loads(line)
    if op == "join":
        address, port, name, rank, world = args
        group = init_custom_process_group(backend="gloo", init_method=NetworkAddress(address, port).to_tcp(),
                                          world_size=world, rank=rank, group_name=name)
    elif op == "receive":
        got = []
        for shape in args[0]:
            t = torch.empty(shape, dtype=torch.float32)
            dist.broadcast(t, src=0, group=group)
            got.append(t.double().flatten().tolist())
        print(json.dumps(got), flush=True)
    else:
        dist.destroy_process_group(group)
        print(json.dumps("left"), flush=True)
"""


class _Rank:
    """A process running SGLang's side of the group for one TP rank."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", SGLANG_GROUP_RANK], cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def send(self, *command):
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def answer(self):
        line = self.proc.stdout.readline()
        assert line, self.proc.stderr.read()[-3000:]
        return json.loads(line)


class _Call:
    def __init__(self, fn):
        self.remote = fn


class ServerWithTPRanks:
    """What WeightUpdateGroup sees of an SGLang engine actor (its three calls), with the server's
    TP ranks as real processes running SGLang's code. `.remote` returns at once, as a Ray call
    does; the ranks block in the rendezvous and the broadcasts until rank 0 takes part."""

    def __init__(self, tp):
        self.ranks = [_Rank() for _ in range(tp)]
        self.init_weights_update_group = _Call(self._join)
        self.receive_weight_bucket = _Call(self._receive)
        self.destroy_weights_update_group = _Call(self._leave)

    def _join(self, address, port, rank_offset, world, name, backend):
        assert backend == "gloo"
        for tp_rank, r in enumerate(self.ranks):
            r.send("join", address, port, name, rank_offset + tp_rank, world)

    def _receive(self, meta, name):
        for r in self.ranks:
            r.send("receive", [list(s) for s in meta.shapes])

    def _leave(self, name):
        for r in self.ranks:
            r.send("leave")

    def close(self):
        for r in self.ranks:
            r.proc.kill()


@pytest.mark.parametrize("tp", [2])
def test_sglang_tp_ranks_join_our_weight_update_group_and_receive_buckets(monkeypatch, tp):
    """Rank 0's side exactly as the policy rank runs it (WeightUpdateGroup: a store on a
    kernel-picked port, the group, buckets broadcast, the group closed) against two engines whose
    TP ranks run SGLang's own init_custom_process_group: every rank meets on the same store keys
    at its own rank (1 + engine * tp + tp_rank of 1 + 2 * tp), every tensor arrives intact, and
    the group is built twice under one name (it is rebuilt when an engine is replaced)."""
    from dapo_megatron.rollout import weight_sync

    monkeypatch.setattr(weight_sync, "_ray_get", lambda refs, timeout=None: refs)  # the calls above return at once
    engines = [ServerWithTPRanks(tp), ServerWithTPRanks(tp)]
    ranks = [r for e in engines for r in e.ranks]
    try:
        for round_ in range(2):
            group = weight_sync.WeightUpdateGroup(engines, "gloo", "dapo_sync", timeout=120, ranks_per_engine=tp)
            for size in (3, 5):
                bucket = [("model.embed_tokens.weight", torch.randn(size, 4)),
                          ("model.norm.weight", torch.randn(4 + round_))]
                group.push(bucket)
                want = [t.double().flatten().tolist() for _, t in bucket]
                assert [r.answer() for r in ranks] == [want] * len(ranks)
            group.close()
            assert [r.answer() for r in ranks] == ["left"] * len(ranks)
    finally:
        for e in engines:
            e.close()
