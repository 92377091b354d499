"""The embedded engine's decoding loop: fixed KV slots, continuous refill, shared prompt KV.

``decode_rows`` runs every sequence of a generate call through ``max_batch_size`` slots of
a preallocated KV buffer (rollout/kv_cache.py). When a sequence finishes, the next waiting
one takes its slot at once, so the batch stays full until the queue is empty; then finished
slots are compacted away (the last occupied slot moves into the hole) so the occupied
slots are always [0, A) and every step runs on plain views of the buffer.

Admission prefills a prompt (+ continuation prefix) once for all its samples and copies
its KV into each of their slots. The prefill covers every position but the last; the last
one is fed by the next batched step together with the other slots' sampled tokens, so
every step is the same forward of one token per slot and yields the logits every slot
samples from. Each sequence keeps its own random stream (embedded._Row.gen), so which
slot or step it runs in never changes its draws.

The forward follows the HF decoder layer op for op
(transformers/models/qwen3/modeling_qwen3.py, Qwen3DecoderLayer.forward and
Qwen3Attention.forward; Llama and Qwen2 are the same without q_norm/k_norm): the model's
own embedding, norms, rotary embedding and rotary application, activation and MoE block;
its linear layers' weights as one matmul per input (_Proj); only the attention against
the buffer is ours. Families outside ``SUPPORTED`` use the engine's HF-forward path
(embedded.EmbeddedEngine._generate_chunk).
"""

from __future__ import annotations

import sys
from collections import deque
from typing import Any, Callable

import torch
import torch.nn.functional as F

from dapo_megatron import dtypes, malloc
from dapo_megatron.rollout.kv_cache import SlotKVCache
from dapo_megatron.rollout.protocol import SamplingParams
from dapo_megatron.rollout.routing import RouterTap
from dapo_megatron.rollout.sampling import sample_next_tokens

Row = Any  # embedded._Row (not imported: embedded imports this module)

# Model types whose decoder layer is exactly: norm, attention (q/k/v proj, optional
# per-head q_norm/k_norm, rotary, full causal attention, o_proj), residual, norm, mlp,
# residual.
SUPPORTED = ("llama", "qwen2", "qwen3", "qwen3_moe")


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why ``model`` cannot use this loop, or None when it can."""
    config = model.config
    if config.model_type not in SUPPORTED:
        return f"model_type {config.model_type!r} is not one of {SUPPORTED}"
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        return "sliding-window layers"
    if getattr(config, "use_sliding_window", False):
        return "sliding-window attention"
    return None


class _Proj:
    """nn.Linear layers of one input run together; ``__call__`` returns their outputs.

    On CPU their weights are one contiguous transposed copy ``[in, sum(out)]`` and the
    call is one matmul: MKL's small-batch sgemm runs faster on it than on the transposed
    view F.linear uses (bench/rollout_bench.py: 11% less CPU time per generate, measured
    side by side in one process). Elsewhere each runs on its own transposed view (no copy
    of the weights in accelerator memory).
    """

    def __init__(self, linears: list[torch.nn.Linear]):
        self.sizes = [lin.weight.shape[0] for lin in linears]
        on_cpu = linears[0].weight.device.type == "cpu"
        parts = [(torch.cat([lin.weight for lin in linears]),
                  torch.cat([lin.bias for lin in linears]) if linears[0].bias is not None else None)
                 ] if on_cpu else [(lin.weight, lin.bias) for lin in linears]
        self.parts = [(w.t().contiguous() if on_cpu else w.t(), b) for w, b in parts]

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        flat = x.reshape(-1, x.shape[-1])
        outs = [(flat @ w if b is None else torch.addmm(b, flat, w)).view(*x.shape[:-1], -1)
                for w, b in self.parts]
        return list(outs[0].split(self.sizes, dim=-1)) if len(outs) < len(self.sizes) else outs


class SlotForward:
    """Prefill and one-token steps of an HF Llama-family causal LM over a SlotKVCache.

    The projections run through _Proj (on CPU: q/k/v as one matmul, a dense MLP's gate and
    up as another), built in ``refresh`` and rebuilt whenever a source parameter was
    replaced or written in place since, e.g. by a weight sync.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.base = model.model
        self.layers = list(self.base.layers)
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.kv_heads = model.config.num_key_value_heads
        self.heads = model.config.num_attention_heads
        # The model family's own rotary application (one source of truth for its maths).
        self.apply_rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        self._proj: list[dict[str, _Proj]] = []
        self._lm_head: _Proj | None = None
        self._fingerprint: tuple | None = None

    def _linears(self, layer) -> dict[str, list[torch.nn.Linear]]:
        attn, mlp = layer.self_attn, layer.mlp
        groups = {"qkv": [attn.q_proj, attn.k_proj, attn.v_proj], "o": [attn.o_proj]}
        if all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            groups.update(gate_up=[mlp.gate_proj, mlp.up_proj], down=[mlp.down_proj])
        return groups  # otherwise (MoE) the mlp runs as the model's own module

    def refresh(self) -> None:
        """(Re)build the projections if any source parameter changed: a parameter's
        ``_version`` counts its in-place writes (copy_ in a weight load), data_ptr catches
        replacement."""
        groups = [self._linears(layer) for layer in self.layers]
        linears = [lin for g in groups for lins in g.values() for lin in lins]
        linears.append(self.model.lm_head)
        fingerprint = tuple((p.data_ptr(), p._version) for lin in linears for p in lin.parameters())
        if fingerprint == self._fingerprint:
            return
        self._proj, self._lm_head = [], None  # the old copies go before the new are built
        with torch.no_grad():
            self._proj = [{name: _Proj(lins) for name, lins in g.items()} for g in groups]
            self._lm_head = _Proj([self.model.lm_head])
        self._fingerprint = fingerprint

    def new_cache(self, slots: int, max_len: int, initial_len: int | None = None) -> SlotKVCache:
        weight = self.model.get_output_embeddings().weight
        return SlotKVCache(len(self.layers), slots, self.kv_heads, max_len, self.head_dim,
                           weight.dtype, weight.device, initial_len)

    def _qkv(self, i: int, x: torch.Tensor, cos, sin):
        """x [B, T, hidden] -> q [B, heads, T, D], k, v [B, kv_heads, T, D] (rotary applied)."""
        attn = self.layers[i].self_attn
        q, k, v = self._proj[i]["qkv"](x)
        shape = (*x.shape[:-1], -1, self.head_dim)
        q, k = q.view(shape), k.view(shape)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        v = v.view(shape).transpose(1, 2)
        q, k = self.apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q, k, v

    def _mlp(self, i: int, h: torch.Tensor) -> torch.Tensor:
        layer = self.layers[i]
        x = layer.post_attention_layernorm(h)
        proj = self._proj[i]
        if "gate_up" not in proj:  # MoE or other block: the model's own module
            return h + layer.mlp(x)
        gate, up = proj["gate_up"](x)
        return h + proj["down"](layer.mlp.act_fn(gate) * up)[0]

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ``ids [n, T]`` from position 0 -> keys, values
        ``[layers, n, kv_heads, T, D]`` (a padded tail only ever sees real tokens before it;
        its own columns are overwritten or masked later)."""
        n, t = ids.shape
        h = self.base.embed_tokens(ids)
        positions = torch.arange(t, device=ids.device).expand(n, t)
        cos, sin = self.base.rotary_emb(h, positions)
        ks, vs = [], []
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            q, k, v = self._qkv(i, layer.input_layernorm(h), cos, sin)
            ks.append(k)
            vs.append(v)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scaling,
                                               enable_gqa=True)
            h = h + self._proj[i]["o"](o.transpose(1, 2).reshape(n, t, -1))[0]
            h = self._mlp(i, h)
        return torch.stack(ks), torch.stack(vs)

    @torch.no_grad()
    def step(self, cache: SlotKVCache, tokens: torch.Tensor) -> torch.Tensor:
        """Run ``tokens [A]`` (one per slot [0, A), at each slot's next position) and
        return the next-token logits ``[A, vocab]``."""
        a = tokens.shape[0]
        groups = self.heads // self.kv_heads
        h = self.base.embed_tokens(tokens[:, None])
        cos, sin = self.base.rotary_emb(h, cache.length[:a, None])
        mask = cache.begin_step(a, h.dtype)
        # Grouped-query attention as transformers' repeat_kv: head g*groups+j reads kv head
        # g, so the scores are per (slot, kv head): [A*kv, groups, D] @ [A*kv, D, L].
        mask = mask.expand(a, self.kv_heads, groups, -1).reshape(a * self.kv_heads, groups, -1)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            q, k, v = self._qkv(i, layer.input_layernorm(h), cos, sin)
            keys, values = cache.append(i, k, v)
            span = keys.shape[-1]
            scores = torch.baddbmm(mask, q.reshape(-1, groups, self.head_dim),
                                   keys.reshape(-1, self.head_dim, span), alpha=attn.scaling)
            weights = torch.softmax(scores, dim=-1, dtype=dtypes.at_least_fp32(q.dtype)).to(q.dtype)
            o = torch.bmm(weights, values.reshape(-1, span, self.head_dim)).view(a, 1, -1)
            h = h + self._proj[i]["o"](o)[0]
            h = self._mlp(i, h)
        cache.end_step()
        return self._lm_head(self.base.norm(h))[0][:, 0]


# Rows sampled together: sampling's fp64 temporaries ([rows, vocab]) stay under half the
# steady-state mmap threshold (malloc.STEADY_THRESHOLD), so they reuse heap memory instead of
# page-faulting fresh mappings at every step. Rows are independent (one stream each, row-wise
# maths), so the split changes no result.
_SAMPLE_BYTES = malloc.STEADY_THRESHOLD // 2


def _sample(logits: torch.Tensor, gens: list[torch.Generator], params: SamplingParams):
    step = max(1, _SAMPLE_BYTES // (8 * logits.shape[-1]))
    parts = [sample_next_tokens(logits[i:i + step], gens[i:i + step], params.temperature,
                                params.top_k, params.top_p, want_raw=params.return_raw_logprobs)
             for i in range(0, len(gens), step)]
    tokens, lps, raws = zip(*parts)
    return (torch.cat(tokens), torch.cat(lps),
            torch.cat(raws) if params.return_raw_logprobs else None)


def finished_before_start(row: Row, params: SamplingParams,
                          is_aborted: Callable[[str], bool]) -> str | None:
    """How a row ends before it draws a token: "abort" when its request was aborted, "length"
    for a continuation whose prefix already used the whole budget; None when it runs. Both
    decoding loops (this one and EmbeddedEngine._generate_chunk) decide here."""
    if is_aborted(row.request_id):
        return "abort"
    if len(row.prefix) >= params.max_new_tokens:
        return "length"
    return None


def take_token(row: Row, token: int, logprob: float, raw: float | None, is_stop: bool,
               params: SamplingParams, hit_stop_string: Callable[[Row, SamplingParams], bool],
               is_aborted: Callable[[str], bool]) -> str | None:
    """Append one sampled token to ``row``; return how it finished the row ("stop", "length",
    "abort"), or None while it goes on. Both decoding loops (this one and
    EmbeddedEngine._generate_chunk) decide here."""
    row.tokens.append(token)
    row.logprobs.append(logprob)
    if raw is not None:
        row.raw.append(raw)
    if is_stop or hit_stop_string(row, params):
        return "stop"
    if len(row.prefix) + len(row.tokens) == params.max_new_tokens:
        return "length"  # a full-length response is finished, aborted or not
    if is_aborted(row.request_id):
        return "abort"
    return None


def decode_rows(
    forward: SlotForward,
    prompts: list[list[int]],
    rows: list[Row],
    params: SamplingParams,
    finish: dict[int, str],
    slots: int,
    is_aborted: Callable[[str], bool],
    hit_stop_string: Callable[[Row, SamplingParams], bool],
    tap: RouterTap,
) -> None:
    """Generate every row (in order of admission = list order); fills rows' tokens,
    log-probs and routes and ``finish[k]``, as EmbeddedEngine._generate_chunk does."""
    if not rows:
        return
    forward.refresh()
    device = forward.model.get_output_embeddings().weight.device
    waiting = deque(range(len(rows)))
    slots = min(slots, len(rows))

    def key(k: int) -> tuple:
        return rows[k].prompt_index, rows[k].prefix

    # Rows of one key are adjacent; a key's prefill is dropped once its last row is admitted.
    left: dict[tuple, int] = {}
    for k in waiting:
        left[key(k)] = left.get(key(k), 0) + 1
    longest = max(len(prompts[r.prompt_index]) + len(r.prefix) for r in rows)
    max_len = max(len(prompts[r.prompt_index]) for r in rows) + params.max_new_tokens
    cache = forward.new_cache(slots, max_len, initial_len=longest + 64)
    prefilled: dict[tuple, tuple] = {}
    slot_row: list[int] = []  # row in slot s, for s in [0, A)
    next_token = torch.zeros(slots, dtype=torch.long, device=device)
    stop_ids = torch.tensor(params.stop_token_ids or [-1], device=device)

    def admit(free: list[int]) -> None:
        """Fill the free slots (then append) from the queue; returns when full or empty."""
        batch: list[tuple[int, int]] = []  # (slot, row)
        while waiting and (free or len(slot_row) < slots):
            k = waiting.popleft()
            row = rows[k]
            left[key(k)] -= 1
            done = finished_before_start(row, params, is_aborted)
            if done is not None:
                finish[k] = done
            else:
                if free:
                    s = free.pop(0)
                    slot_row[s] = k
                else:
                    s = len(slot_row)
                    slot_row.append(k)
                batch.append((s, k))
        _prefill([key(k) for _, k in batch if key(k) not in prefilled])
        for s, k in batch:
            full, kv_k, kv_v, routes = prefilled[key(k)]
            cache.fill(s, kv_k, kv_v)
            next_token[s] = full[-1]
            if routes is not None:
                rows[k].routes.append(routes)
        for kk in [kk for kk in prefilled if left[kk] == 0]:
            del prefilled[kk]
        _compact(free)

    def _prefill(keys: list[tuple]) -> None:
        keys = list(dict.fromkeys(keys))
        if not keys:
            return
        fulls = [list(prompts[p]) + list(prefix) for p, prefix in keys]
        t = max(len(f) for f in fulls) - 1
        if t == 0:
            for kk, f in zip(keys, fulls):
                empty = torch.zeros(len(forward.layers), forward.kv_heads, 0, forward.head_dim)
                prefilled[kk] = (f, empty, empty, _empty_routes() if tap.recording else None)
            return
        ids = torch.zeros(len(keys), t, dtype=torch.long)
        for u, f in enumerate(fulls):
            ids[u, : len(f) - 1] = torch.tensor(f[:-1])
        kv_k, kv_v = forward.prefill(ids.to(device))
        routes = tap.take(len(keys), t) if tap.recording else None
        for u, (kk, f) in enumerate(zip(keys, fulls)):
            n = len(f) - 1
            prefilled[kk] = (f, kv_k[:, u, :, :n], kv_v[:, u, :, :n],
                             routes[u, :n] if routes is not None else None)

    def _empty_routes() -> torch.Tensor:
        return torch.zeros(0, tap.num_layers, tap.top_k, dtype=torch.long)

    def _compact(free: list[int]) -> None:
        """Close the holes the queue could not fill: the last slot moves into each."""
        for s in sorted(free, reverse=True):
            last = len(slot_row) - 1
            if s != last:
                cache.move(last, s)
                next_token[s] = next_token[last]
                slot_row[s] = slot_row[last]
            slot_row.pop()
        free.clear()

    admit([])
    while slot_row:
        a = len(slot_row)
        logits = forward.step(cache, next_token[:a])
        if tap.recording:  # the token each slot just ran
            routes = tap.take(a, 1)
            for s, k in enumerate(slot_row):
                rows[k].routes.append(routes[s])
        live = [rows[k] for k in slot_row]
        tokens, lps, raws = _sample(logits, [row.gen for row in live], params)
        is_stop = torch.isin(tokens, stop_ids).tolist()
        tok_list, lp_list = tokens.tolist(), lps.tolist()
        raw_list = raws.tolist() if raws is not None else None
        next_token[:a] = tokens
        free: list[int] = []
        for s, k in enumerate(slot_row):
            raw = None if raw_list is None else raw_list[s]
            done = take_token(live[s], tok_list[s], lp_list[s], raw, is_stop[s], params,
                              hit_stop_string, is_aborted)
            if done is not None:
                finish[k] = done
                free.append(s)
        if free:
            admit(free)
