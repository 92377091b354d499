"""Moving one weight bucket from a policy rank to the rollout engines.

A sync is a session on every engine (``begin_weight_update`` ... ``end_weight_update``,
the shape SGLang 0.5.23 enforces: srt/managers/scheduler_components/weight_updater.py
answers tensor and distributed updates outside a session with an error). Between the two
calls each policy rank that sources tensors pushes its own buckets straight to the engines;
the driver only opens and closes the session. Two transports:

- colocated (``push_bucket_colocated``): the bucket goes to each engine's
  ``load_weight_bucket``. Embedded engine on the rank's node: the bytes written once to a
  shared-memory file (``write_shared_bucket``) that each engine maps and copies from, so
  neither side keeps a second copy mapped (the object store's arena pages, once touched,
  stay resident in the writer); engines on other nodes: one ``ray.put`` shared by them.
  SGLang on GPU: CUDA IPC handles serialized here, in the process that owns the tensors,
  one payload per SGLang TP rank (sglang_api.serialize_bucket).
- disaggregated (``WeightUpdateGroup``): a process group between the source rank (group
  rank 0) and the engines (the rest: one rank per embedded engine, one per TP rank of an
  SGLang server), NCCL on GPU, gloo on CPU, built on both ends as SGLang builds its end. Per bucket the rank posts
  the metadata to every engine (``receive_weight_bucket``), then broadcasts the tensors in
  that order, one broadcast per tensor (SGLang's update_weights_from_distributed protocol).

Whatever the transport, a source holds one bucket (plus the transport's copy of it) at a
time, and waits for the engines to take it before it builds the next.
"""

from __future__ import annotations

import datetime
import itertools
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import torch

from dapo_megatron.dtypes import name_of, to_torch
from dapo_megatron.ports import listening_store
from dapo_megatron.rollout.protocol import WeightBucket

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BucketMeta:
    """What a receiver needs to allocate a bucket before its broadcast: names, dtypes, shapes."""

    names: tuple[str, ...]
    dtypes: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, bucket: WeightBucket) -> "BucketMeta":
        return cls(tuple(n for n, _ in bucket), tuple(name_of(t.dtype) for _, t in bucket),
                   tuple(tuple(t.shape) for _, t in bucket))


def open_process_group(master_address: str, master_port: int, rank: int, world_size: int,
                       group_name: str, backend: str, timeout_s: float = 300.0, store=None):
    """A process group outside torch.distributed's default one (a policy rank already has
    Megatron's; an engine may have none). Blocks until all ``world_size`` members join.
    ``store``: rank 0's own store (``ports.listening_store``), if it made one first.

    Built exactly as SGLang builds its end (sglang 0.5.23, srt/utils/common.py
    ``init_custom_process_group``, called by ModelRunnerWeightUpdater.init_weights_update_group):
    a ``PrefixStore(group_name)`` over the rendezvous store, then torch's
    ``_new_process_group_helper``, which adds its own ``<group_name>/<device>/`` prefixes before
    the backend's rendezvous. A group made any other way (a ProcessGroupGloo straight on the
    PrefixStore) waits on other keys and never meets a real SGLang server
    (tests/contract/test_sglang_contract.py joins the two).
    """
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import Backend, _new_process_group_helper, _world

    if backend not in ("gloo", "nccl"):
        raise ValueError(f"weight-update group backend must be gloo or nccl, got {backend!r}")
    timeout = datetime.timedelta(seconds=timeout_s)
    if store is None:
        store = dist.TCPStore(master_address, master_port, world_size, is_master=rank == 0, timeout=timeout)
    group, _ = _new_process_group_helper(world_size, rank, [], Backend(backend),
                                         dist.PrefixStore(group_name, store), group_name=group_name,
                                         timeout=timeout)
    # Group ranks are the global ranks in this group's own numbering (as SGLang registers it).
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def close_process_group(group) -> None:
    """Unregister a group ``open_process_group`` made (its name may then be used again)."""
    import torch.distributed as dist

    if group is not None:
        dist.destroy_process_group(group)


def broadcast_bucket(group, bucket: WeightBucket) -> None:
    """Group rank 0's side: broadcast each tensor of the bucket, in order."""
    for _, tensor in bucket:
        group.broadcast([tensor.contiguous()]).wait()


def receive_bucket(group, meta: BucketMeta, device: torch.device | str) -> WeightBucket:
    """An engine's side of ``broadcast_bucket``: the tensors, allocated from ``meta``."""
    bucket = []
    for name, dtype, shape in zip(meta.names, meta.dtypes, meta.shapes):
        tensor = torch.empty(shape, dtype=to_torch(dtype), device=device)
        group.broadcast([tensor]).wait()
        bucket.append((name, tensor))
    return bucket


def _ray_get(refs: list, timeout: float | None = None) -> list:
    """ray.get, with a bound: an engine that does not take a bucket in time raises
    GetTimeoutError (the pool then treats it as hung: killed, replaced, synced again)."""
    import ray

    return ray.get(refs, timeout=timeout)


def push_bucket_colocated(engines: list[Any], bucket: WeightBucket, engine_kind: str, engine_tp: int = 1,
                          timeout: float | None = None, tie_word_embeddings: bool = False) -> None:
    """Hand one bucket to every engine (Ray actor handles); returns once all loaded it."""
    import ray

    if engine_kind == "sglang":
        from dapo_megatron.rollout.sglang_api import map_weight_names, serialize_bucket

        # Serialized here, in the process that owns the (CUDA) tensors, one payload per SGLang
        # TP rank: each rank's worker opens and refcounts its own handles
        # (srt/entrypoints/engine.py update_weights_from_tensor, tp_worker.py).
        mapped = map_weight_names(bucket, tie_word_embeddings)
        payloads = serialize_bucket(mapped, engine_tp)
        nbytes = sum(t.numel() * t.element_size() for _, t in mapped)
        _ray_get([e.load_weight_bucket_serialized.remote(payloads, nbytes) for e in engines], timeout)
        return
    here = ray.get_runtime_context().get_node_id()
    local = [e for e in engines if _node_of(e) == here]
    remote = [e for e in engines if _node_of(e) != here]
    calls = []
    path = _shm_path() if local else None
    try:
        if local:
            meta = write_shared_bucket(bucket, path)
            calls += [e.load_weight_bucket_shared.remote(path, meta) for e in local]
        if remote:
            ref = ray.put(bucket)
            calls += [e.load_weight_bucket.remote(ref) for e in remote]
            del ref
        _ray_get(calls, timeout)
    finally:
        if path is not None and os.path.exists(path):
            os.unlink(path)


# ---------------------------------------------------------------- same-node shared memory
SHM_DIR = "/dev/shm"
_ALIGN = 64  # every tensor starts at a multiple of this in the file (any dtype can view it)
_NODE_OF: dict[str, str] = {}  # engine actor id -> node id (an actor never moves)
_shm_count = itertools.count()


@dataclass(frozen=True)
class SharedBucketMeta:
    """A bucket in a shared-memory file: per tensor its name, dtype, shape and byte offset."""

    names: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    nbytes: int


def _node_of(engine) -> str:
    key = engine._actor_id.hex()
    if key not in _NODE_OF:
        import ray

        _NODE_OF[key] = ray.get(engine.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))
    return _NODE_OF[key]


def _shm_path() -> str:
    folder = SHM_DIR if os.access(SHM_DIR, os.W_OK) else tempfile.gettempdir()
    return os.path.join(folder, f"dapo-weights-{os.getpid()}-{next(_shm_count)}")


def write_shared_bucket(bucket: WeightBucket, path: str) -> SharedBucketMeta:
    """Write the tensors' bytes to path (write(2) from the tensors themselves: no copy is
    made in this process) and say where each one is."""
    offsets, pos = [], 0
    with open(path, "wb") as f:
        for _, tensor in bucket:
            pad = -pos % _ALIGN
            f.write(b"\0" * pad)
            pos += pad
            offsets.append(pos)
            raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            f.write(memoryview(raw.numpy()))
            pos += raw.numel()
    return SharedBucketMeta(tuple(n for n, _ in bucket), tuple(t.dtype for _, t in bucket),
                            tuple(tuple(t.shape) for _, t in bucket), tuple(offsets), pos)


def read_shared_bucket(path: str, meta: SharedBucketMeta) -> WeightBucket:
    """The bucket as views of path mapped into memory (unmapped once they are freed)."""
    if meta.nbytes == 0:
        return [(n, torch.empty(s, dtype=d)) for n, d, s in zip(meta.names, meta.dtypes, meta.shapes)]
    data = torch.from_file(path, shared=True, size=meta.nbytes, dtype=torch.uint8)
    bucket = []
    for name, dtype, shape, offset in zip(meta.names, meta.dtypes, meta.shapes, meta.offsets):
        count = math.prod(shape) * dtype.itemsize
        bucket.append((name, data[offset:offset + count].view(dtype).reshape(shape)))
    return bucket


class WeightUpdateGroup:
    """The source rank's end of a disaggregated sync with ``engines`` (Ray actor handles)."""

    def __init__(self, engines: list[Any], backend: str, group_name: str, timeout: float = 600.0,
                 ranks_per_engine: int = 1):
        """``ranks_per_engine``: the group ranks each engine joins with. An embedded engine joins
        once; an SGLang server joins once per TP rank, as ``rank_offset + tp_rank`` (sglang
        0.5.23, ModelRunnerWeightUpdater.init_weights_update_group), so engine i's offset is
        ``1 + i * engine_tp`` and the group has ``1 + engines * engine_tp`` ranks."""
        import ray

        self.engines = list(engines)
        self.group_name = group_name
        self.timeout = timeout
        world = len(self.engines) * ranks_per_engine + 1
        store = listening_store(world, timeout)
        address, port = ray.util.get_node_ip_address(), store.port
        joins = [e.init_weights_update_group.remote(address, port, 1 + i * ranks_per_engine, world, group_name,
                                                    backend)
                 for i, e in enumerate(self.engines)]
        self.group = open_process_group(address, port, 0, world, group_name, backend, timeout_s=timeout, store=store)
        _ray_get(joins, timeout)

    def push(self, bucket: WeightBucket) -> None:
        meta = BucketMeta.of(bucket)
        receipts = [e.receive_weight_bucket.remote(meta, self.group_name) for e in self.engines]
        broadcast_bucket(self.group, bucket)
        _ray_get(receipts, self.timeout)

    def close(self) -> None:
        """Tear the group down on every engine that still answers."""
        try:
            _ray_get([e.destroy_weights_update_group.remote(self.group_name) for e in self.engines], self.timeout)
        except Exception:  # noqa: BLE001 - a dead engine is being replaced; nothing to tear down
            logger.warning("weight-update group %s: not every engine answered its teardown", self.group_name)
        group, self.group = self.group, None
        close_process_group(group)
