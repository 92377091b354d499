"""MoE routing replay: the trainer's routers run on given experts (``algo.routing_replay``).

Modes:
- ``none``: the routers choose freely. When the batch carries the engine's routing anyway,
  the old-log-prob pass is compared with it (``routing/*`` metrics).
- ``r2``: the old-log-prob pass routes freely and records its choice; the training passes
  of this step replay it, so pi_theta and pi_old use the same experts for every token.
- ``r3`` (rollout routing replay): the old-log-prob and training passes replay the experts
  the rollout engine used for each token (``PolicyBatch.routed_experts``).

Upstream: megatron-core 0.16.1's ``RouterReplay`` (transformer/moe/router_replay.py). With
``TransformerConfig.moe_enable_routing_replay`` every ``TopKRouter`` owns one
(transformer/moe/router.py, ``TopKRouter.__init__``) and routes through its
``get_replay_topk`` (transformer/moe/moe_utils.py, ``topk_routing_with_score_function``):
RECORD keeps the router's own top-k, REPLAY_FORWARD uses the target indices, and
REPLAY_BACKWARD pops the targets of earlier forwards in order for activation recompute (a
FIFO filled by ``set_target_indices``: forwards and recomputes both run in micro-batch
order under 1F1B). ``_Replay`` extends it in two ways: a target of -1 lets that position
route freely (positions the engine never ran: the last token of every sequence, padding),
and under REPLAY_FORWARD it still records the router's own top-k, for the metrics.

Token layout: a router sees the hidden states ``[seq, batch, hidden]`` flattened seq-major,
token ``s * batch + b`` (router.py, ``TopKRouter.routing``); under sequence parallelism each
TP rank holds its ``seq / tp`` slice. Routing happens before the token dispatch, so expert
parallelism does not change which tokens a router sees. Pipeline stages hold the routers
of their own layers; ``router.layer_number`` is global and 1-based, the column of
``routed_experts`` is ``layer_number - 1`` (the HF layer index SGLang and the embedded
engine report).

Size: ``routed_experts`` is ``[batch, seq, layers, top_k]`` int16 in the PolicyBatch that
every rank receives: for Qwen3-235B-A22B (94 layers, top-8) 1.5 KB per token, 750 times the
token ids. Sending each stage only its layers is left to do.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
import torch.distributed as dist

__all__ = ["RoutingReplay", "routing_mismatch", "routes_tensor"]

ROUTE_DTYPE = torch.int16  # expert ids < 32768; -1 routes freely


def routes_tensor(per_sequence: list[torch.Tensor | None], seq: int) -> torch.Tensor:
    """Stack per-sequence routes ``[positions_i, layers, top_k]`` into ``[batch, seq, layers,
    top_k]`` int16, -1 where a sequence has none (its tail, padding, a missing entry)."""
    shape = next(r.shape[1:] for r in per_sequence if r is not None)
    out = torch.full((len(per_sequence), seq) + tuple(shape), -1, dtype=ROUTE_DTYPE)
    for i, routes in enumerate(per_sequence):
        if routes is None:
            continue
        if tuple(routes.shape[1:]) != tuple(shape) or routes.shape[0] > seq:
            raise ValueError(f"routed experts of sequence {i}: {tuple(routes.shape)} does not fit "
                             f"[<= {seq}, {', '.join(map(str, shape))}]")
        out[i, :routes.shape[0]] = routes.to(ROUTE_DTYPE)
    return out


@functools.lru_cache(maxsize=None)
def _replay_class():
    """(_Replay, upstream RouterReplay, RouterReplayAction); megatron is imported lazily."""
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    class _Replay(RouterReplay):
        """RouterReplay with free positions (-1) and the router's own choice recorded."""

        def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None,
                            default_compute_topk=None):
            action = self.router_replay_action
            if action == RouterReplayAction.REPLAY_FORWARD:
                _, own = default_compute_topk(scores, topk, num_groups=num_groups,
                                              group_topk=group_topk)
                self.record_indices(own)
                target = self.target_topk_idx.to(device=scores.device, dtype=torch.long)
                used = torch.where(target >= 0, target, own)
                # A recompute in backward must use exactly these (set_target_indices queued
                # the raw target for it).
                self.replay_backward_list[-1] = used
                return scores.gather(1, used), used
            if action == RouterReplayAction.REPLAY_BACKWARD:
                used = self.replay_backward_list.pop(0).to(scores.device)
                return scores.gather(1, used), used
            return super().get_replay_topk(scores, topk, num_groups, group_topk,
                                           default_compute_topk)

    return _Replay, RouterReplay, RouterReplayAction


class _Recording:
    """The routers' own choices over one pass: ``routes`` ``[batch, seq, layers, top_k]``
    int32, -1 where this rank saw nothing (other stages' layers, other DP ranks' rows until
    ``gather``)."""

    def __init__(self, batch: int, seq: int, layers: int, top_k: int):
        self.routes = torch.full((batch, seq, layers, top_k), -1, dtype=torch.int32)

    def gather(self, sequence_parallel: bool) -> torch.Tensor:
        """Every row of this stage's layers on every DP rank (and every SP slice)."""
        from megatron.core import parallel_state as ps

        groups = [ps.get_data_parallel_group()] if ps.get_data_parallel_world_size() > 1 else []
        if sequence_parallel:
            groups.append(ps.get_tensor_model_parallel_group())
        for group in groups:  # ids >= 0 where seen, -1 elsewhere: MAX merges disjoint parts
            dist.all_reduce(self.routes, op=dist.ReduceOp.MAX, group=group)
        return self.routes


class RoutingReplay:
    """What the trainer's routers replay and record, per forward of a micro-batch.

    ``before_forward`` / ``after_forward`` wrap the model call of each micro-batch
    (policy/train.py, ``PolicyTrainer._run``); ``end_pass`` clears every router after the
    forward(-backward) pass. Inside ``recording(...)`` the routers' own choices are kept.
    """

    def __init__(self, num_layers: int, top_k: int):
        self.num_layers, self.top_k = num_layers, top_k
        self._routers: dict[int, list[tuple[int, object]]] = {}
        self._recording: _Recording | None = None

    def routers(self, chunk) -> list[tuple[int, object]]:
        """(layer column, replay) of every router of ``chunk``; upstream's replays are
        swapped for ``_Replay`` the first time a chunk is seen."""
        key = id(chunk)
        if key not in self._routers:
            from megatron.core.transformer.moe.router import TopKRouter

            from dapo_megatron.policy.model import unwrap

            replay_cls, upstream, _ = _replay_class()
            found = []
            for module in unwrap(chunk).modules():
                if isinstance(module, TopKRouter) and module.router_replay is not None:
                    if not isinstance(module.router_replay, replay_cls):
                        # Leave upstream's global registry as it was (router_replay.py keeps
                        # every instance in a class-level list).
                        if module.router_replay in upstream.global_router_replay_instances:
                            upstream.global_router_replay_instances.remove(module.router_replay)
                        module.router_replay = replay_cls()
                        upstream.global_router_replay_instances.remove(module.router_replay)
                    found.append((module.layer_number - 1, module.router_replay))
            if not found:
                raise RuntimeError("routing replay: the model has no MoE router with "
                                   "moe_enable_routing_replay (build it with that option)")
            self._routers[key] = found
        return self._routers[key]

    @staticmethod
    def _local_seq(chunk, width: int) -> slice:
        """The sequence positions this rank's routers see (its slice under SP)."""
        from dapo_megatron.policy.model import unwrap

        if not unwrap(chunk).config.sequence_parallel:
            return slice(0, width)
        from megatron.core import parallel_state as ps

        tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        return slice(rank * width // tp, (rank + 1) * width // tp)

    def before_forward(self, chunk, routes: torch.Tensor | None) -> None:
        """Set each router of ``chunk`` for one micro-batch: replay ``routes`` ``[n, width,
        layers, top_k]`` (-1: free), or route freely (recording inside ``recording``)."""
        _, _, action = _replay_class()
        for layer, replay in self.routers(chunk):
            if routes is None:
                if self._recording is not None:
                    replay.set_router_replay_action(action.RECORD)
                else:
                    replay.clear_router_replay_action()
                continue
            local = routes[:, self._local_seq(chunk, routes.shape[1]), layer]  # [n, s, k]
            replay.set_target_indices(local.transpose(0, 1).reshape(-1, self.top_k))
            replay.set_router_replay_action(action.REPLAY_FORWARD)

    def after_forward(self, chunk, rows: list[int], seq_lens: torch.Tensor, width: int,
                      layout=None) -> None:
        """Keep what the routers chose at the real positions of ``rows`` (``seq_lens``
        tokens each; inside ``recording``); queue the replayed experts for a recompute in
        backward. ``layout`` (packing.PackedLayout): the forward ran on one packed row of
        ``width`` tokens, sequence k of it being ``rows[k]``."""
        _, _, action = _replay_class()
        for layer, replay in self.routers(chunk):
            if self._recording is not None and rows and layout is not None:
                cols = self._local_seq(chunk, width)
                own = replay.get_recorded_indices().view(cols.stop - cols.start, self.top_k)
                own = own.to(torch.int32).cpu()
                for row, start, n in zip(rows, layout.starts, layout.seq_lens):
                    lo, hi = max(start, cols.start), min(start + n, cols.stop)
                    if hi > lo:
                        self._recording.routes[row, lo - start:hi - start, layer] = \
                            own[lo - cols.start:hi - cols.start]
            elif self._recording is not None and rows:
                own = replay.get_recorded_indices()
                cols = self._local_seq(chunk, width)
                n_local = cols.stop - cols.start
                own = own.view(n_local, -1, self.top_k).transpose(0, 1)[:len(rows)]
                seq = self._recording.routes.shape[1]
                stop = min(cols.stop, seq)
                if stop > cols.start:
                    index = torch.as_tensor(rows, dtype=torch.long)
                    real = (torch.arange(cols.start, stop)[None, :]
                            < seq_lens[:len(rows), None].cpu())
                    own = own[:, :stop - cols.start].to(torch.int32).cpu()
                    self._recording.routes[index, cols.start:stop, layer] = \
                        torch.where(real[..., None], own, -1)
            if replay.router_replay_action == action.REPLAY_FORWARD:
                replay.set_router_replay_action(action.REPLAY_BACKWARD)

    def end_pass(self, chunks) -> None:
        for chunk in chunks:
            for _, replay in self.routers(chunk):
                replay.clear_indices()
                replay.clear_router_replay_action()

    @contextlib.contextmanager
    def recording(self, batch: int, seq: int) -> Iterator[_Recording]:
        """Record the routers' own choices of the passes inside, for ``[batch, seq]``."""
        self._recording = _Recording(batch, seq, self.num_layers, self.top_k)
        try:
            yield self._recording
        finally:
            self._recording = None


def pack_routes(routes: torch.Tensor | None, layout) -> torch.Tensor | None:
    """Routes ``[n, L, layers, top_k]`` of right-padded rows laid out like the packed row
    of ``layout`` (packing.PackedLayout): ``[1, width, layers, top_k]``, -1 (route freely)
    between sequences. None and padded micro-batches (layout None) pass through."""
    if routes is None or layout is None:
        return routes
    packed = routes.new_full((1, layout.width, *routes.shape[2:]), -1)
    for k, (start, n) in enumerate(zip(layout.starts, layout.seq_lens)):
        packed[0, start:start + n] = routes[k, :n]
    return packed


def routing_mismatch(engine: torch.Tensor, trainer: torch.Tensor, mask: torch.Tensor,
                     group=None) -> dict[str, float]:
    """How often the trainer's own routing differs from the engine's.

    engine, trainer: ``[batch, seq, layers, top_k]`` expert ids, -1 where unknown (the
    trainer's: layers of other pipeline stages); mask: ``[batch, seq]`` positions to count
    (response tokens). A decision (token, layer) differs when the expert sets differ.
    ``group``: the pipeline group whose stages hold the other layers (summed / or-ed).

    Returns ``routing/mismatch_token_frac`` (tokens with a differing decision in any layer,
    over tokens with any known decision) and ``routing/mismatch_decision_frac``.
    """
    known = (engine >= 0).all(-1) & (trainer >= 0).all(-1) & mask.bool()[..., None]
    differ = (engine.long().sort(-1).values != trainer.long().sort(-1).values).any(-1) & known
    tokens = torch.stack([differ.any(-1), known.any(-1)]).to(torch.int32)  # [2, batch, seq]
    counts = torch.tensor([float(differ.sum()), float(known.sum())], dtype=torch.float64)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tokens, op=dist.ReduceOp.MAX, group=group)
        dist.all_reduce(counts, group=group)
    n_tokens = int(tokens[1].sum())
    return {
        "routing/mismatch_token_frac": float(tokens[0].sum()) / max(n_tokens, 1),
        "routing/mismatch_decision_frac": float(counts[0]) / max(float(counts[1]), 1.0),
    }
