"""The embedded rollout engine: batched KV-cache sampling over an HF-layout model.

The model is built with transformers from an HF config (Llama, Qwen2, Qwen3, Qwen3-MoE,
... anything AutoModelForCausalLM knows), so its parameter names are the HF names the
weight export produces. Llama-family models decode through ``max_batch_size`` slots of a
preallocated KV buffer, each prompt prefilled once for its samples, finished rows refilled
from the queue (rollout/slot_decoder.py). Other families run in chunks of at most
``max_batch_size`` sequences through the HF forward: each distinct prompt of a chunk is
prefilled once (left-padded) and its KV cache copied to its n samples, then all rows
decode together; finished rows are dropped from the batch (and their cache).
Sampling is ours, in fp32 (dapo_megatron.rollout.sampling), one random stream per
sequence seeded from (seed, request_id, sample_index); token t of a response takes the
stream's t-th uniform. A continued response (protocol.Resume) re-derives its stream by
drawing the len(prefix) uniforms its prefix used, so "the same stream" means the same
uniform at the same token position, whichever call or weights drew the earlier tokens.

Runs in-process, or as a Ray actor through ``create_embedded_actor``.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from typing import Any, Callable, Iterable

import torch

from dapo_megatron import malloc
from dapo_megatron.rollout.buckets import StrictLoader
from dapo_megatron.rollout.protocol import (
    Resume,
    Sample,
    SamplingParams,
    WeightBucket,
    compact_expert_ids,
    default_request_ids,
)
from dapo_megatron.rollout.routing import RouterTap
from dapo_megatron.rollout.sampling import draw_uniforms, row_seed, sample_next_tokens
from dapo_megatron.rollout.slot_decoder import (
    SlotForward,
    decode_rows,
    finished_before_start,
    take_token,
    unsupported_reason,
)

logger = logging.getLogger(__name__)

Decoder = Callable[[list[int]], str]
_MAX_REMEMBERED_ABORTS = 65536


def _as_decoder(decode: Any) -> Decoder | None:
    """Accept a callable token_ids -> str or a tokenizer with .decode."""
    if decode is None or callable(decode) and not hasattr(decode, "decode"):
        return decode
    if hasattr(decode, "decode"):
        return lambda ids: decode.decode(ids, skip_special_tokens=False)
    raise TypeError(f"decode must be a callable or a tokenizer with .decode, got {type(decode)}")


def build_hf_model(hf_config: Any, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """An HF causal LM with random weights from a config object or a config dict."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(hf_config, dict):
        cfg = dict(hf_config)
        hf_config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


class _Row:
    """Bookkeeping of one sequence being generated."""

    __slots__ = ("prompt_index", "sample_index", "request_id", "gen", "tokens", "logprobs", "raw",
                 "routes", "prefix")

    def __init__(self, prompt_index: int, sample_index: int, request_id: str, seed: int,
                 resume: Resume | None = None):
        self.prompt_index = prompt_index
        self.sample_index = sample_index
        self.request_id = request_id
        stream_id = request_id if resume is None else resume.stream_id
        self.gen = torch.Generator().manual_seed(row_seed(seed, stream_id, sample_index))
        # A continuation's prefix: drawn already (one uniform per token, as sample_next_tokens).
        self.prefix: tuple[int, ...] = () if resume is None else tuple(resume.token_ids)
        for _ in self.prefix:
            draw_uniforms([self.gen])
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.raw: list[float] = []
        self.routes: list[torch.Tensor] = []  # [positions, layers, top_k] per forward


class EmbeddedEngine:
    """RolloutEngine over a transformers model, on CPU or one GPU.

    hf_config: an HF PretrainedConfig, or a dict with "model_type" and its fields.
    model: an already built HF causal LM to serve instead (hf_config is then ignored).
    decode: token_ids -> str callable or a tokenizer, needed only for stop strings.
    max_batch_size: most sequences decoded together (memory bound: KV cache rows).
    device, dtype: where and in what precision the model runs (sampling is fp32 anyway).
    """

    def __init__(
        self,
        hf_config: Any = None,
        *,
        model: torch.nn.Module | None = None,
        decode: Any = None,
        max_batch_size: int = 64,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        num_threads: int | None = None,
    ):
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        malloc.steady_state()  # a weight-update session lowers the mmap threshold (malloc.py)
        if model is None:
            if hf_config is None:
                raise ValueError("EmbeddedEngine needs hf_config or model")
            model = build_hf_model(hf_config, dtype)
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.decode = _as_decoder(decode)
        # transformers >= 5.2x renamed forward's past_key_values to cache (the old name
        # warns); pick whichever this model's forward declares.
        forward_args = inspect.signature(type(self.model).forward).parameters
        self._cache_kw = "cache" if "cache" in forward_args else "past_key_values"
        self.max_batch_size = max_batch_size
        self.weight_version = 0
        self._weights_valid = True
        self._closed = False
        self._released = False
        # generate / update_weights exclude each other; abort only touches _aborted.
        self._lock = threading.Lock()
        self._abort_lock = threading.Lock()
        # Insertion-ordered so the oldest unclaimed aborts can be forgotten (bounded memory).
        self._aborted: dict[str, None] = {}
        self.last_sync: dict[str, float] = {}
        self._loader: StrictLoader | None = None  # the open weight-update session
        self._groups: dict[str, Any] = {}  # weight-update process groups by name
        # Routed experts of MoE models, recorded when a request asks (rollout/routing.py).
        self._router_tap = RouterTap(self.model)
        # Slot decoding (rollout/slot_decoder.py: preallocated KV, continuous refill) where
        # the model family allows; False: the HF-forward chunk loop below.
        self.slot_decoding = unsupported_reason(self.model) is None
        self._slot_forward: SlotForward | None = None

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        request_ids: list[str] | None = None,
        resume: list[list[Resume] | None] | None = None,
    ) -> list[list[Sample]]:
        """Sample params.n responses per prompt; result[i][j] is sample j of prompts[i].

        resume[i] (protocol.RolloutEngine.generate): continue those samples of prompt i
        instead; their Samples hold the new tokens only."""
        if request_ids is None:
            request_ids = default_request_ids(len(prompts))
        if len(request_ids) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(request_ids)} request_ids")
        resume = resume if resume is not None else [None] * len(prompts)
        if len(resume) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(resume)} resume entries")
        for i, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise ValueError(f"prompt {i} ({request_ids[i]}) is empty")
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(
                    f"prompt {i} ({request_ids[i]}) has token ids {bad[:5]} outside the "
                    f"vocabulary [0, {self.vocab_size})"
                )
        if params.stop_strings and self.decode is None:
            raise ValueError("stop_strings need a decoder: pass decode= to EmbeddedEngine")
        with self._lock:
            self._check_usable()
            rows = []
            for i in range(len(prompts)):
                if resume[i] is None:
                    rows += [_Row(i, j, request_ids[i], params.seed) for j in range(params.n)]
                else:
                    rows += [_Row(i, r.sample_index, request_ids[i], r.seed, r) for r in resume[i]]
            finish: dict[int, str] = {}
            if self.slot_decoding:
                self._generate_slots(prompts, rows, params, finish)
            else:
                for start in range(0, len(rows), self.max_batch_size):
                    chunk = list(range(start, min(start + self.max_batch_size, len(rows))))
                    self._generate_chunk(prompts, rows, chunk, params, finish)
            results: list[list[Sample]] = [[] for _ in prompts]
            for k, row in enumerate(rows):
                results[row.prompt_index].append(
                    Sample(
                        token_ids=row.tokens,
                        logprobs=row.logprobs,
                        finish_reason=finish[k],
                        prompt_index=row.prompt_index,
                        request_id=row.request_id,
                        sample_index=row.sample_index,
                        weight_version=self.weight_version,
                        raw_logprobs=row.raw if params.return_raw_logprobs else None,
                        routed_experts=(compact_expert_ids(torch.cat(row.routes))
                                        if row.routes else None),
                    )
                )
            with self._abort_lock:
                for rid in request_ids:
                    self._aborted.pop(rid, None)
            return results

    def _is_aborted(self, request_id: str) -> bool:
        with self._abort_lock:
            return request_id in self._aborted

    @torch.no_grad()
    def _generate_slots(self, prompts: list[list[int]], rows: list[_Row], params: SamplingParams,
                        finish: dict[int, str]) -> None:
        tap = self._router_tap
        tap.enable(params.return_routed_experts and tap.is_moe)
        try:
            if self._slot_forward is None:
                self._slot_forward = SlotForward(self.model)
            decode_rows(self._slot_forward, prompts, rows, params, finish, self.max_batch_size,
                        self._is_aborted, self._hit_stop_string, tap)
        finally:
            tap.enable(False)

    @torch.no_grad()
    def _generate_chunk(
        self,
        prompts: list[list[int]],
        rows: list[_Row],
        chunk: list[int],
        params: SamplingParams,
        finish: dict[int, str],
    ) -> None:
        live = []
        for k in chunk:
            done = finished_before_start(rows[k], params, self._is_aborted)
            if done is None:
                live.append(k)
            else:
                finish[k] = done
        if not live:
            return
        tap = self._router_tap
        tap.enable(params.return_routed_experts and tap.is_moe)
        try:
            self._decode_chunk(prompts, rows, live, params, finish)
        finally:
            tap.enable(False)

    def _decode_chunk(self, prompts: list[list[int]], rows: list[_Row], live: list[int],
                      params: SamplingParams, finish: dict[int, str]) -> None:
        # Prefill each distinct prompt (+ continuation prefix) once, then copy its cache to
        # its samples.
        def key(k: int) -> tuple:
            return rows[k].prompt_index, rows[k].prefix

        unique: list[tuple] = []
        for k in live:
            if not unique or unique[-1] != key(k):
                unique.append(key(k))
        slot_of = {p: u for u, p in enumerate(unique)}
        full = [list(prompts[p]) + list(prefix) for p, prefix in unique]
        max_len = max(len(ids) for ids in full)
        input_ids = torch.zeros(len(unique), max_len, dtype=torch.long)
        attn = torch.zeros(len(unique), max_len, dtype=torch.long)
        for u, ids in enumerate(full):
            # Left padding keeps every row's next token at the same column.
            input_ids[u, max_len - len(ids) :] = torch.tensor(ids)
            attn[u, max_len - len(ids) :] = 1
        input_ids, attn = input_ids.to(self.device), attn.to(self.device)
        positions = (attn.cumsum(-1) - 1).clamp_(min=0)
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attn,
            position_ids=positions,
            **{self._cache_kw: cache},
            use_cache=True,
            logits_to_keep=1,
        )
        tap = self._router_tap
        if tap.recording:  # prefilled positions: the real (right-aligned) columns of each slot
            routes = tap.take(len(unique), max_len)
            for k in live:
                u = slot_of[key(k)]
                rows[k].routes.append(routes[u, max_len - len(full[u]):])
        expand = torch.tensor([slot_of[key(k)] for k in live], device=self.device)
        if len(unique) != len(live) or not torch.equal(expand, torch.arange(len(live), device=self.device)):
            cache.batch_select_indices(expand)
        logits = out.logits[:, -1, :][expand]
        attn = attn[expand]
        next_pos = positions[:, -1][expand] + 1
        stop_ids = torch.tensor(params.stop_token_ids or [-1], device=self.device)

        for step in range(params.max_new_tokens - min(len(rows[k].prefix) for k in live)):
            tokens, lps, raws = sample_next_tokens(
                logits,
                [rows[k].gen for k in live],
                params.temperature,
                params.top_k,
                params.top_p,
                want_raw=params.return_raw_logprobs,
            )
            is_stop = torch.isin(tokens, stop_ids).tolist()
            tok_list, lp_list = tokens.tolist(), lps.tolist()
            raw_list = raws.tolist() if raws is not None else None
            keep: list[int] = []
            for r, k in enumerate(live):
                raw = None if raw_list is None else raw_list[r]
                done = take_token(rows[k], tok_list[r], lp_list[r], raw, is_stop[r], params,
                                  self._hit_stop_string, self._is_aborted)
                if done is None:
                    keep.append(r)
                else:
                    finish[k] = done
            if not keep:
                return
            if len(keep) != len(live):
                idx = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(idx)
                tokens, attn, next_pos = tokens[idx], attn[idx], next_pos[idx]
                live = [live[r] for r in keep]
            attn = torch.cat([attn, attn.new_ones(len(live), 1)], dim=1)
            out = self.model(
                input_ids=tokens.unsqueeze(-1),
                attention_mask=attn,
                position_ids=next_pos.unsqueeze(-1),
                **{self._cache_kw: cache},
                use_cache=True,
            )
            logits = out.logits[:, -1, :]
            next_pos = next_pos + 1
            if tap.recording:  # the tokens just run: the one sampled at this step, per live row
                routes = tap.take(len(live), 1)
                for r, k in enumerate(live):
                    rows[k].routes.append(routes[r])

    def _hit_stop_string(self, row: _Row, params: SamplingParams) -> bool:
        if not params.stop_strings:
            return False
        text = self.decode(list(row.prefix) + row.tokens)
        return any(s in text for s in params.stop_strings)

    def abort(self, request_ids: list[str]) -> None:
        """Mark requests aborted; a running generate returns them with finish_reason "abort".

        Ids not in flight are remembered until the next generate call that names them
        finishes, so an abort racing ahead of its generate still takes effect.
        """
        with self._abort_lock:
            self._aborted.update(dict.fromkeys(request_ids))
            # Ids aborted after their generate finished are never claimed: keep the newest.
            while len(self._aborted) > _MAX_REMEMBERED_ABORTS:
                self._aborted.pop(next(iter(self._aborted)))

    # ------------------------------------------------------------------ weights and memory
    def update_weights(self, buckets: Iterable[WeightBucket], version: int) -> None:
        """A whole sync from one caller: begin, every bucket, end."""
        self.begin_weight_update(version)
        for bucket in buckets:
            self.load_weight_bucket(bucket)
        self.end_weight_update()

    def begin_weight_update(self, version: int) -> None:
        """Open a sync session: from now until end_weight_update the engine refuses to
        generate, and buckets may arrive from several senders in any order.

        On any error (unknown name, wrong shape, missing tensor) the engine stays unusable
        until a later full sync succeeds: a half-loaded model must not sample.
        """
        with self._lock:
            self._check_open()
            self._loader = StrictLoader(self.model)
            self._weights_valid = False
            self._pending_version = int(version)
            self._sync_start = time.perf_counter()
            malloc.bucket_phase()  # the buckets' memory back to the OS as each is freed

    def load_weight_bucket(self, bucket: WeightBucket) -> None:
        """Copy one bucket of HF-named tensors into the model (inside a session)."""
        with self._lock:
            if self._loader is None:
                raise RuntimeError("load_weight_bucket outside a weight-update session: call "
                                   "begin_weight_update first")
            self._loader.load_bucket([(name, t.to(self.device)) for name, t in bucket])

    def load_weight_bucket_shared(self, path: str, meta) -> None:
        """load_weight_bucket from a same-node shared-memory file (weight_sync.write_shared_bucket)."""
        from dapo_megatron.rollout.weight_sync import read_shared_bucket

        self.load_weight_bucket(read_shared_bucket(path, meta))

    def end_weight_update(self) -> None:
        """Close the session: every parameter must have arrived; weight_version takes effect."""
        with self._lock:
            loader, self._loader = self._loader, None
            if loader is None:
                raise RuntimeError("end_weight_update without begin_weight_update")
            try:
                loader.finish()
            finally:
                malloc.steady_state()
            self._weights_valid = True
            self.weight_version = self._pending_version
            seconds = time.perf_counter() - self._sync_start
            self.last_sync = {"bytes": float(loader.bytes_loaded), "seconds": seconds}
            logger.info("weight sync v%d: %.1f MB in %.3f s", self.weight_version,
                        loader.bytes_loaded / 1e6, seconds)

    # Disaggregated sync: a process group with the sending policy rank (weight_sync.py).
    def init_weights_update_group(self, master_address: str, master_port: int, rank: int,
                                  world_size: int, group_name: str, backend: str = "gloo") -> None:
        from dapo_megatron.rollout.weight_sync import open_process_group

        self._groups[group_name] = open_process_group(master_address, master_port, rank, world_size,
                                                      group_name, backend)

    def receive_weight_bucket(self, meta, group_name: str) -> None:
        """Receive one broadcast bucket (metadata first, as SGLang's protocol) and load it."""
        from dapo_megatron.rollout.weight_sync import receive_bucket

        if group_name not in self._groups:
            raise RuntimeError(f"no weight-update group {group_name!r}: call init_weights_update_group")
        self.load_weight_bucket(receive_bucket(self._groups[group_name], meta, self.device))

    def destroy_weights_update_group(self, group_name: str) -> None:
        from dapo_megatron.rollout.weight_sync import close_process_group

        close_process_group(self._groups.pop(group_name, None))

    def state_dict_buckets(self, max_tensors: int = 16) -> list[WeightBucket]:
        """The engine's own weights as HF-named buckets (tests, warm starts)."""
        items = list(self.model.state_dict().items())
        return [items[i : i + max_tensors] for i in range(0, len(items), max_tensors)]

    def release_memory(self) -> None:
        """Move weights off the accelerator for the train phase (a no-op on CPU)."""
        with self._lock:
            self._slot_forward = None  # its weight copies/views follow the weights
            if self.device.type != "cpu" and not self._released:
                self.model.to("cpu")
                torch.cuda.empty_cache()
            self._released = True

    def resume_memory(self, tags: list[str] | None = None) -> None:
        """Take back what release_memory freed. SGLang's tags: "weights" (before a sync) and
        "kv_cache" (after it); this engine allocates its KV cache per generate call, so only
        "weights" (or tags None: everything) moves anything."""
        with self._lock:
            if tags is not None and "weights" not in tags:
                return
            if self.device.type != "cpu" and self._released:
                self.model.to(self.device)
            self._released = False

    # ------------------------------------------------------------------ lifecycle
    def health(self) -> bool:
        return not self._closed and self._weights_valid and not self._released

    def shutdown(self) -> None:
        self._closed = True
        self.model = None
        self._slot_forward = None

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("EmbeddedEngine was shut down; create a new one")

    def _check_usable(self) -> None:
        self._check_open()
        if not self._weights_valid:
            raise RuntimeError(
                "EmbeddedEngine: the last update_weights failed part-way; run a full, "
                "successful update_weights before generating"
            )
        if self._released:
            raise RuntimeError("EmbeddedEngine: memory is released; call resume_memory() first")

    def get_weight_version(self) -> int:
        """weight_version as a method, for Ray handles (attributes are not remote)."""
        return self.weight_version


def create_embedded_actor(
    hf_config: Any = None,
    *,
    num_cpus: float = 1,
    num_gpus: float = 0,
    max_concurrency: int = 8,
    **engine_kwargs: Any,
):
    """An EmbeddedEngine as a Ray actor (ray must be initialised).

    max_concurrency lets abort() run while a generate() is in flight on the actor, and several
    policy ranks push buckets (or wait in a broadcast) at once during a sync.
    Call methods with .remote(); read the version with get_weight_version.remote().
    """
    import ray

    actor_cls = ray.remote(EmbeddedEngine)
    return actor_cls.options(num_cpus=num_cpus, num_gpus=num_gpus, max_concurrency=max_concurrency).remote(
        hf_config, **engine_kwargs
    )
