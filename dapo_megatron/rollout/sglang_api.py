"""SGLang's HTTP wire format: launch arguments, /generate payloads and answers, weight names.

Pure functions (no process, no network), checked against SGLang 0.5.x's sources:
GenerateReqInput / SamplingParams (sglang.srt.managers.io_struct,
sglang.srt.sampling.sampling_params) for requests, and the tokenizer manager's output
dicts ({"output_ids", "meta_info": {"id", "finish_reason", "output_token_logprobs"}})
for answers. The engine that sends them lives in sglang_engine.py.

Log-probs: SGLang returns log_softmax(logits / temperature) of the sampled token,
untruncated by top_p / top_k; with SGLANG_RETURN_ORIGINAL_LOGPROB=1 in the server's
environment (``SGLangConfig.return_original_logprob``) it returns log_softmax(logits)
instead. ``check_logprob_support`` refuses requests whose protocol log-probs SGLang cannot
give exactly, and ``to_samples`` maps the rest onto ``logprobs`` / ``raw_logprobs``.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import sys
from typing import Any

import torch

from dapo_megatron.rollout.protocol import Resume, Sample, SamplingParams, WeightBucket, compact_expert_ids
from dapo_megatron.rollout.sampling import row_seed


@dataclasses.dataclass
class SGLangConfig:
    """How to launch and drive one SGLang server (one node or TP group).

    model_path: HF checkpoint the server starts from (architecture, tokenizer, weights
        of version `initial_weight_version`).
    tp_size, base_gpu_id: the GPUs of this engine: base_gpu_id .. base_gpu_id+tp_size-1.
    mem_fraction_static: share of GPU memory SGLang may hold for weights + KV cache; in
        colocated mode the rest stays for the trainer while memory is resumed.
    enable_memory_saver: required for release_memory / resume_memory (colocated mode).
    return_original_logprob: start the server with SGLANG_RETURN_ORIGINAL_LOGPROB=1 so
        that its log-probs are temperature-1 (raw) ones.
    deterministic_inference: start with --enable-deterministic-inference. SGLang 0.5.23
        reads a request's sampling_seed only in that mode
        (srt/sampling/sampling_batch_info.py, from_schedule_batch); without it the seeds
        are ignored and a resumed run does not regenerate the same samples.
    launch_cmd: replaces `python -m sglang.launch_server ...` entirely (custom launchers,
        tests); "{port}" in it is replaced by the chosen port. The server must run as a
        descendant of the command's process: start-up takes health answers only from the
        engine's own process tree (SGLangEngine._owns_port), and shutdown signals its group.
    routed_experts_layout: (num_hidden_layers, num_experts_per_tok) of a MoE model whose
        requests ask for routed experts (``algo.routing_replay``): the server starts with
        --enable-return-routed-experts (0.5.23, srt/arg_groups/fields/exec_.py) and the
        answers are read in this shape; None: off.
    """

    model_path: str = ""
    host: str = "127.0.0.1"
    port: int = 0  # 0: pick a free port at each (re)start
    tp_size: int = 1
    base_gpu_id: int = 0
    mem_fraction_static: float = 0.5
    enable_memory_saver: bool = True
    random_seed: int = 0
    dtype: str = "auto"
    return_original_logprob: bool = False
    deterministic_inference: bool = True
    startup_timeout_s: float = 900.0
    request_timeout_s: float = 3600.0
    max_restarts: int = 2
    initial_weight_version: int = 0
    extra_args: tuple[str, ...] = ()
    launch_cmd: tuple[str, ...] | None = None
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    routed_experts_layout: tuple[int, int] | None = None


def launch_command(cfg: SGLangConfig, port: int) -> list[str]:
    """The argv that starts the server for cfg on port."""
    if cfg.launch_cmd is not None:
        return [part.replace("{port}", str(port)) for part in cfg.launch_cmd]
    if not cfg.model_path:
        raise ValueError("SGLangConfig.model_path is empty: set the HF checkpoint to serve")
    cmd = [
        sys.executable, "-m", "sglang.launch_server",
        "--model-path", cfg.model_path,
        "--host", cfg.host,
        "--port", str(port),
        "--tp-size", str(cfg.tp_size),
        "--base-gpu-id", str(cfg.base_gpu_id),
        "--mem-fraction-static", str(cfg.mem_fraction_static),
        "--random-seed", str(cfg.random_seed),
        "--dtype", cfg.dtype,
        # Warm-up requests can outlast the health wait on a busy node; our start-up check
        # (/health_generate) runs a real generation anyway.
        "--skip-server-warmup",
    ]
    if cfg.enable_memory_saver:
        cmd.append("--enable-memory-saver")
    if cfg.deterministic_inference:
        cmd.append("--enable-deterministic-inference")
    if cfg.routed_experts_layout is not None:
        cmd.append("--enable-return-routed-experts")
    return cmd + list(cfg.extra_args)


def launch_env(cfg: SGLangConfig) -> dict[str, str]:
    env = dict(os.environ)
    env.update(cfg.env)
    # 0.5.23's GET /health runs a one-token generation unless this is off
    # (srt/entrypoints/http_server.py, health_generate; srt/environ.py): a liveness probe
    # must not generate while the weights and KV cache are released.
    env["SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION"] = "false"
    if cfg.return_original_logprob:
        env["SGLANG_RETURN_ORIGINAL_LOGPROB"] = "1"
    return env


# ---------------------------------------------------------------------- requests / responses
def check_logprob_support(params: SamplingParams, original_logprob: bool) -> None:
    """Raise if SGLang cannot return exactly the log-probs the protocol promises.

    SGLang reports log_softmax(logits / T) (or log_softmax(logits) in original mode) of
    the drawn token, never the top_p / top_k renormalised value.
    """
    if not params.return_logprobs and not params.return_raw_logprobs:
        return  # tokens only (e.g. evaluation at top_p 0.7): nothing to get wrong
    if params.truncates:
        raise ValueError(
            f"SGLang engine: top_p={params.top_p} / top_k={params.top_k} truncate the sampling "
            "distribution but SGLang's log-probs are untruncated, so Sample.logprobs would be "
            "wrong; sample with top_p=1, top_k=-1 where log-probs matter (training), set "
            "return_logprobs=False where they do not (evaluation), or use the embedded engine"
        )
    if original_logprob and params.temperature != 1.0:
        raise ValueError(
            f"SGLang engine runs with return_original_logprob (temperature-1 log-probs) but the "
            f"request samples at temperature {params.temperature}: Sample.logprobs would be "
            "wrong; restart without return_original_logprob or sample at temperature 1"
        )
    if params.return_raw_logprobs and not original_logprob and params.temperature != 1.0:
        raise ValueError(
            "return_raw_logprobs at temperature != 1 needs an SGLang engine started with "
            "return_original_logprob=True"
        )


def sample_rid(request_id: str, sample_index: int) -> str:
    return f"{request_id}/{sample_index}"


@dataclasses.dataclass(frozen=True)
class PlannedSample:
    """One SGLang request of a /generate call: one sample of one prompt, fresh or continued."""

    prompt_index: int
    request_id: str
    sample_index: int
    input_ids: list[int]  # the prompt, plus the partial response of a continuation
    max_new_tokens: int
    sampling_seed: int


def plan_samples(prompts: list[list[int]], params: SamplingParams, request_ids: list[str],
                 resume: list[list[Resume] | None] | None = None) -> list[PlannedSample]:
    """The requests of one generate call, in result order: params.n fresh samples per prompt,
    or, where ``resume[i]`` lists continuations, one per Resume (protocol.RolloutEngine).

    A continuation sends the prompt plus its partial response as the prefix (SGLang's radix
    cache finds the prompt's KV) with the rest of the token budget. SGLang draws a request's
    tokens from its ``sampling_seed`` alone, from the first new token on, so the uninterrupted
    stream cannot be resumed mid-way: a continuation gets a seed of its own, from its stream
    and the prefix length. It is deterministic per (stream, sample, prefix) but not token-equal
    to the response that was never interrupted, unlike the embedded engine's.
    """
    resume = resume if resume is not None else [None] * len(prompts)
    if len(resume) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(resume)} resume entries")
    planned = []
    for i, (prompt, rid, cont) in enumerate(zip(prompts, request_ids, resume)):
        if cont is None:
            planned += [PlannedSample(i, rid, j, list(prompt), params.max_new_tokens,
                                      row_seed(params.seed, rid, j)) for j in range(params.n)]
            continue
        for r in cont:
            left = params.max_new_tokens - len(r.token_ids)
            if left < 1:
                raise ValueError(f"resume of {rid}/{r.sample_index}: its partial response has "
                                 f"{len(r.token_ids)} tokens, no budget left of max_new_tokens="
                                 f"{params.max_new_tokens}")
            seed = row_seed(r.seed, f"{r.stream_id}@{len(r.token_ids)}", r.sample_index)
            planned.append(PlannedSample(i, rid, r.sample_index, list(prompt) + list(r.token_ids),
                                         left, seed))
    return planned


def build_generate_payload(
    prompts: list[list[int]],
    params: SamplingParams,
    request_ids: list[str],
    resume: list[list[Resume] | None] | None = None,
) -> dict[str, Any]:
    """The /generate body: one request per planned sample (plan_samples), each with its own
    rid and seed.

    Samples are sent as separate requests (not SGLang's n) so each has its own rid (abort,
    matching) and sampling_seed; SGLang's radix cache prefills the shared prompt once.
    """
    input_ids, sampling, rids = [], [], []
    for planned in plan_samples(prompts, params, request_ids, resume):
        sp: dict[str, Any] = {
            "n": 1,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k,
            "max_new_tokens": planned.max_new_tokens,
            # Keep the stop string / token in the output: the trainer learns to stop.
            "no_stop_trim": True,
            "skip_special_tokens": False,
            # 31 bits: SGLang hands the seed to torch / CUDA RNG as a plain int.
            "sampling_seed": planned.sampling_seed & 0x7FFFFFFF,
        }
        if params.stop_token_ids:
            sp["stop_token_ids"] = list(params.stop_token_ids)
        if params.stop_strings:
            sp["stop"] = list(params.stop_strings)
        input_ids.append(planned.input_ids)
        sampling.append(sp)
        rids.append(sample_rid(planned.request_id, planned.sample_index))
    body = {
        "input_ids": input_ids,
        "sampling_params": sampling,
        "rid": rids,
        "return_logprob": params.return_logprobs or params.return_raw_logprobs,
        "logprob_start_len": -1,  # output tokens only
        "stream": False,
    }
    if params.return_routed_experts:
        # GenerateReqInput.return_routed_experts (srt/managers/io_struct.py); the default
        # routed_experts_start_len 0 returns prompt and response positions [0, seqlen - 1).
        body["return_routed_experts"] = True
    return body


def parse_routed_experts(meta: dict[str, Any], rid: str, positions: int,
                         layout: tuple[int, int]) -> torch.Tensor:
    """``meta_info["routed_experts"]`` -> ``[positions, layers, top_k]`` compact expert ids.

    SGLang 0.5.23 sends the int32 array ``[seqlen - 1, num_hidden_layers, top_k]`` as
    base64 of its raw bytes (srt/managers/detokenizer_manager.py, _b64_encode_per_request;
    decoded as in srt/state_capturer/routed_experts.py, extract_routed_experts_from_meta_info).
    """
    import numpy as np

    encoded = meta.get("routed_experts")
    if encoded is None:
        raise ValueError(f"SGLang response for {rid} has no routed_experts: start the server "
                         "with --enable-return-routed-experts (SGLangConfig.routed_experts_layout)")
    flat = np.frombuffer(base64.b64decode(encoded), dtype=np.int32)
    layers, top_k = layout
    if flat.size != positions * layers * top_k:
        raise ValueError(f"SGLang response for {rid}: routed_experts hold {flat.size} ids, expected "
                         f"{positions} positions x {layers} layers x {top_k} experts")
    return compact_expert_ids(torch.from_numpy(flat.copy()).view(positions, layers, top_k))


def _finish_type(meta: dict[str, Any], rid: str) -> str:
    reason = meta.get("finish_reason")
    kind = reason.get("type") if isinstance(reason, dict) else reason
    if kind not in ("stop", "length", "abort"):
        raise ValueError(f"SGLang response for {rid}: unexpected finish_reason {reason!r}")
    return kind


def to_samples(
    response: list[dict[str, Any]],
    prompts: list[list[int]],
    params: SamplingParams,
    request_ids: list[str],
    weight_version: int,
    original_logprob: bool,
    routed_experts_layout: tuple[int, int] | None = None,
    resume: list[list[Resume] | None] | None = None,
) -> list[list[Sample]]:
    """Parse /generate's answer (one entry per planned sample, plan_samples' order) into
    Samples, grouped by prompt. A continuation's Sample holds its new tokens only.
    ``routed_experts_layout``: (layers, top_k), needed when the request asked for routed
    experts."""
    if params.return_routed_experts and routed_experts_layout is None:
        raise ValueError("SamplingParams.return_routed_experts needs the model's routed_experts_layout "
                         "(SGLangConfig.routed_experts_layout: (num_hidden_layers, num_experts_per_tok))")
    planned = plan_samples(prompts, params, request_ids, resume)
    if not isinstance(response, list) or len(response) != len(planned):
        got = len(response) if isinstance(response, list) else type(response).__name__
        raise ValueError(f"SGLang /generate returned {got} outputs, expected {len(planned)}")
    by_rid = {}
    for k, out in enumerate(response):
        meta = out.get("meta_info", {})
        by_rid[meta.get("id", k)] = out
    results: list[list[Sample]] = [[] for _ in prompts]
    wants = params.return_logprobs or params.return_raw_logprobs
    for k, plan in enumerate(planned):
        srid = sample_rid(plan.request_id, plan.sample_index)
        # Match by id when SGLang echoes it, by position otherwise.
        out = by_rid.get(srid, response[k])
        meta = out.get("meta_info", {})
        triples = meta.get("output_token_logprobs")
        if not wants:
            if "output_ids" not in out:
                raise ValueError(f"SGLang response for {srid} has no output_ids")
            triples = [(None, t, None) for t in out["output_ids"]]
        elif triples is None:
            raise ValueError(f"SGLang response for {srid} has no output_token_logprobs")
        tokens = [int(t[1]) for t in triples]
        lps = [float(t[0]) for t in triples] if wants else []
        if "output_ids" in out and list(out["output_ids"]) != tokens:
            raise ValueError(
                f"SGLang response for {srid}: output_ids disagree with output_token_logprobs"
            )
        if len(tokens) > plan.max_new_tokens:
            raise ValueError(f"SGLang response for {srid}: {len(tokens)} tokens, more than the "
                             f"{plan.max_new_tokens} asked for")
        # check_logprob_support guarantees lps is the sampling log-prob; it is also the
        # raw one when the server reports temperature-1 values or T == 1.
        raw = lps if params.return_raw_logprobs else None
        routes = None
        if params.return_routed_experts and tokens:
            routes = parse_routed_experts(meta, srid, len(plan.input_ids) + len(tokens) - 1,
                                          routed_experts_layout)
        results[plan.prompt_index].append(
            Sample(
                token_ids=tokens,
                logprobs=lps if params.return_logprobs else [],
                finish_reason=_finish_type(meta, srid),
                prompt_index=plan.prompt_index,
                request_id=plan.request_id,
                sample_index=plan.sample_index,
                weight_version=weight_version,
                raw_logprobs=raw,
                routed_experts=routes,
            )
        )
    return results


def map_weight_names(
    bucket: WeightBucket,
    tie_word_embeddings: bool = False,
    rename: dict[str, str] | None = None,
) -> WeightBucket:
    """HF names as SGLang's model loaders take them (its load_weights reads HF checkpoints).

    Rules: rotary inv_freq buffers are dropped (SGLang computes them), lm_head.weight is
    dropped when embeddings are tied (SGLang's loaders skip it too), `rename` maps any
    remaining name explicitly.
    """
    out = []
    for name, tensor in bucket:
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if tie_word_embeddings and name == "lm_head.weight":
            continue
        out.append(((rename or {}).get(name, name), tensor))
    return out


# ---------------------------------------------------------------------- weight payloads
# SGLang's own sender path for update_weights_from_tensor with load_format="flattened_bucket":
# the tensors of one bucket are concatenated into one uint8 tensor
# (srt/weight_sync/tensor_bucket.py, FlattenedTensorBucket), the dict
# {"flattened_tensor", "metadata"} is serialized once per engine TP rank, and rank r
# deserializes only entry r with MultiprocessingSerializer.deserialize, i.e. SafeUnpickler
# (srt/managers/tp_worker.py, deserialize_own_rank; srt/utils/common.py).
FLATTENED_BUCKET = "flattened_bucket"


def serialize_bucket(named_tensors: WeightBucket, engine_tp_size: int) -> list[str]:
    """One update_weights_from_tensor payload per engine TP rank for one bucket.

    Call it in the process that owns the tensors (a policy rank), on HF-named tensors
    (map_weight_names first), and keep the tensors alive until the engine's
    update_weights_from_serialized call for this bucket has returned.

    CUDA tensors travel as CUDA IPC handles, zero copy: sglang's
    monkey_patch_torch_reductions() (srt/utils/patch_torch.py) names the device by UUID so
    the scheduler opens the handle on the right GPU whatever its CUDA_VISIBLE_DEVICES, and
    each rank gets its own serialization because 0.5.23 counts IPC references per rank.
    CPU tensors are pickled by value (bytes in the payload): torch's shared-memory
    reduction would send a file descriptor (multiprocessing.resource_sharer.DupFd) that a
    process in another tree (the SGLang scheduler, another authkey) cannot open.
    """
    if engine_tp_size < 1:
        raise ValueError(f"serialize_bucket: engine_tp_size must be >= 1, got {engine_tp_size}")
    if not named_tensors:
        raise ValueError("serialize_bucket: empty bucket (SGLang refuses an empty flattened bucket)")
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    devices = {t.device.type for _, t in named_tensors}
    if len(devices) != 1:
        raise ValueError(f"serialize_bucket: one bucket mixes devices {sorted(devices)}")
    bucket = FlattenedTensorBucket(named_tensors=[(n, t.detach()) for n, t in named_tensors])
    payload = {"flattened_tensor": bucket.get_flattened_tensor(), "metadata": bucket.get_metadata()}
    if devices == {"cpu"}:
        return [_pickle_by_value(payload)] * engine_tp_size  # bytes: any rank may open any copy
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions

    monkey_patch_torch_reductions()
    return [MultiprocessingSerializer.serialize(payload, output_str=True) for _ in range(engine_tp_size)]


def _pickle_by_value(obj: Any) -> str:
    """Plain pickle (not ForkingPickler): a CPU tensor's storage goes in as bytes, which
    SafeUnpickler rebuilds through its _safe_load_torch_storage (srt/utils/common.py)."""
    import base64
    import pickle

    return base64.b64encode(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).decode()
