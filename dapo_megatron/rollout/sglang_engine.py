"""SGLang rollout engine: one SGLang HTTP server per node or TP group, driven over HTTP.

Written against SGLang 0.5.23's HTTP API (sglang.srt.entrypoints.http_server) and checked
by tests/contract/, which run SGLang's own request classes and weight-update manager:

- ``POST /generate``: see sglang_api.build_generate_payload / to_samples.
- Weight sync, always one session per version (0.5.23 refuses updates outside one):
  ``POST /begin_weight_update``, then per bucket ``POST /update_weights_from_tensor``
  ({"serialized_named_tensors": one payload per TP rank, "load_format":
  "flattened_bucket", "flush_cache": true only on the last bucket, "weight_version"}),
  then ``POST /end_weight_update``.
- ``POST /init_weights_update_group`` and ``POST /update_weights_from_distributed``
  (names, dtypes, shapes; the trainer broadcasts the tensors over the NCCL group) when
  the engine sits on other GPUs than the trainer; also inside a session.
- ``POST /release_memory_occupation`` / ``POST /resume_memory_occupation`` with explicit
  tags (needs ``--enable-memory-saver``), ``POST /abort_request`` ({"rid"}),
  ``GET /flush_cache``, ``GET /health`` (liveness; the server runs with health-check
  generation off) and ``GET /health_generate`` (a real one-token generation).

Colocated weight sync, zero copy (the interface policy.push_weights uses):

    engine.begin_weight_update()                        # once per version, every engine
    for bucket in buckets:                              # HF names, CUDA tensors
        payloads = sglang_api.serialize_bucket(map_weight_names(bucket, tied), engine_tp)
        engine.update_weights_from_serialized(payloads, version, flush_cache=last, nbytes=...)
        # keep the bucket's tensors alive until this call has returned
    engine.end_weight_update(version)

serialize_bucket must run in the process that owns the CUDA tensors (a policy rank on
the engine's GPUs), never in this actor. ``update_weights(buckets, version)`` is the
host-copy path: it serializes here, by value, and runs the same session.

If the server process dies, the engine restarts it, restores the last synced weights
through ``weights_provider`` and retries the batch (``max_restarts`` times). sglang itself
is imported lazily (only serialize_bucket needs it). The server runs in its own session;
``shutdown`` ends that whole process group (the HTTP server and its scheduler children).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Iterable, Iterator

from dapo_megatron.dtypes import name_of
from dapo_megatron.ports import free_port, port_free
from dapo_megatron.rollout.buckets import bucket_nbytes
from dapo_megatron.rollout.protocol import Sample, SamplingParams, WeightBucket, default_request_ids
from dapo_megatron.rollout.reaper import spawn_reaper
from dapo_megatron.rollout.sglang_api import (
    SGLangConfig,
    build_generate_payload,
    check_logprob_support,
    FLATTENED_BUCKET,
    launch_command,
    launch_env,
    map_weight_names,
    plan_samples,
    sample_rid,
    serialize_bucket,
    to_samples,
)

logger = logging.getLogger(__name__)
PORT_TRIES = 3  # start-ups of one server on freshly picked ports (SGLangEngine.start)

# Returns (buckets of the current weights, their version); called after a restart.
WeightsProvider = Callable[[], tuple[Iterable[WeightBucket], int]]

# SGLang 0.5.23's memory tags (srt/constants.py, GPU_MEMORY_ALL_TYPES): an empty or absent
# tag list releases or resumes all three.
MEMORY_TAGS = ("kv_cache", "weights", "cuda_graph")


def _with_last(items: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
    it = iter(items)
    try:
        prev = next(it)
    except StopIteration:
        return
    for item in it:
        yield prev, False
        prev = item
    yield prev, True


class EngineDied(RuntimeError):
    """The server process exited; the engine restarts it."""


# ---------------------------------------------------------------------- the engine
class SGLangEngine:
    """RolloutEngine over one SGLang server process (one node / TP group).

    weights_provider: called after a restart to restore the latest synced weights; without
        it a restart after any update_weights raises instead of serving stale weights.
    tie_word_embeddings, rename: see map_weight_names.
    exit_on_death: inside a Ray actor, end the actor when the server cannot be recovered,
        so the owner sees RayActorError and replaces the engine (and re-syncs weights).
    """

    def __init__(
        self,
        cfg: SGLangConfig,
        *,
        weights_provider: WeightsProvider | None = None,
        tie_word_embeddings: bool = False,
        rename: dict[str, str] | None = None,
        start: bool = True,
        exit_on_death: bool = False,
    ):
        self.cfg = cfg
        self.weights_provider = weights_provider
        self.tie_word_embeddings = tie_word_embeddings
        self.rename = rename
        self.exit_on_death = exit_on_death
        self.weight_version = cfg.initial_weight_version
        self.process: subprocess.Popen | None = None
        self._reaper: subprocess.Popen | None = None
        self.port = 0
        self.restarts = 0
        self.last_sync: dict[str, float] = {}
        self._sync_stats: list = [0.0, 0, 0]  # start, bytes, buckets of the open session
        self._inflight: dict[str, list[str]] = {}
        self._inflight_lock = threading.Lock()
        self._released: set[str] = set()  # memory tags currently released
        self._session_open = False  # between begin_weight_update and end_weight_update
        self._synced = False  # weights differ from model_path's since an update
        self._partial_sync = False  # an update_weights stopped part-way: refuse to sample
        if start:
            self.start()

    # ------------------------------------------------------------------ process
    @property
    def base_url(self) -> str:
        return f"http://{self.cfg.host}:{self.port}"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Spawn the server and wait until /health_generate answers 200.

        A port picked here (``cfg.port`` unset) was free a moment before the server binds it;
        engines starting side by side on one node can be handed the same one. Only an answer
        from a server in our own process tree counts (``_owns_port``), and a server that dies in
        start-up while its port is taken by another process is started again on another port
        (``PORT_TRIES`` in all); any other death is reported."""
        for attempt in range(1, PORT_TRIES + 1):
            try:
                return self._start_once()
            except EngineDied:
                if self.cfg.port or attempt == PORT_TRIES or port_free(self.cfg.host, self.port):
                    raise
                logger.warning("SGLang server could not bind port %d (another process took it after it was "
                               "picked); starting it again on another port", self.port)
                self._kill()

    def _start_once(self) -> None:
        self.port = self.cfg.port or free_port(self.cfg.host)
        cmd = launch_command(self.cfg, self.port)
        logger.info("starting SGLang server: %s", " ".join(cmd))
        # Own session: shutdown() can signal the server and its scheduler children at once.
        self.process = subprocess.Popen(cmd, env=launch_env(self.cfg), start_new_session=True)
        # Ends that session if this process dies without shutdown() (ray.kill, OOM killer).
        self._reaper = spawn_reaper(self.process.pid)
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        while True:
            if not self.alive():
                raise EngineDied(
                    f"SGLang server exited with code {self.process.returncode} during start-up "
                    f"(command: {' '.join(cmd)}); see its log above"
                )
            if self._ping() and self._owns_port():
                break
            if time.monotonic() > deadline:
                self._kill()
                raise TimeoutError(
                    f"SGLang server on port {self.port} not healthy after "
                    f"{self.cfg.startup_timeout_s:.0f} s; raise SGLangConfig.startup_timeout_s"
                )
            time.sleep(0.2)
        # An empty queue before the first release_memory (slime does the same).
        self._request("GET", "/flush_cache", None, timeout=60)
        if not self.cfg.deterministic_inference:
            logger.warning("SGLang server without --enable-deterministic-inference: per-sample "
                           "seeds are ignored, so a resumed run does not regenerate the same "
                           "samples (rollout.sglang_deterministic=false)")

    def _owns_port(self) -> bool:
        """Whether the socket listening on our port belongs to our server's process tree. Another
        engine's server handed the same port answers /health_generate too, while ours is still
        loading (SGLang binds its HTTP port last) and will fail to bind it."""
        import psutil

        try:
            root = psutil.Process(self.process.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            return False
        for proc in tree:
            try:
                conns = getattr(proc, "net_connections", None) or proc.connections  # psutil < 6
                if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == self.port
                       for c in conns(kind="tcp")):
                    return True
            except psutil.Error:
                continue
        return False

    def _ping(self) -> bool:
        try:
            self._request("GET", "/health_generate", None, timeout=5)
            return True
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def restart(self) -> None:
        """Replace a dead (or wedged) server and restore the latest synced weights."""
        self._kill()
        self.restarts += 1
        version, synced = self.weight_version, self._synced
        self.weight_version = self.cfg.initial_weight_version
        self._released, self._synced, self._partial_sync = set(), False, False
        self._session_open = False
        self.start()
        if synced:
            if self.weights_provider is None:
                raise RuntimeError(
                    f"SGLang server restarted with the weights of {self.cfg.model_path!r} but the "
                    f"engine had synced version {version}; pass weights_provider to restore them"
                )
            buckets, provided = self.weights_provider()
            self.update_weights(buckets, provided)
        logger.warning("SGLang server restarted (%d so far), weights at v%d",
                       self.restarts, self.weight_version)

    def _kill(self) -> None:
        """End the server's whole process group: after a crash of the HTTP process its
        scheduler children may still hold GPU memory."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)
        self.process = None
        if self._reaper is not None:  # it exits by itself once the group is gone
            try:
                self._reaper.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._reaper.kill()
                self._reaper.wait()
            self._reaper = None

    # ------------------------------------------------------------------ http
    def _request(self, method: str, path: str, payload: Any, timeout: float) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(
            self.base_url + path, data=data, method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                body = resp.read()
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:500]
            raise ValueError(f"SGLang {method} {path} failed with HTTP {err.code}: {detail}") from err
        if not body:
            return None
        try:
            return json.loads(body)
        except json.JSONDecodeError:
            return body.decode(errors="replace")

    def _call(self, method: str, path: str, payload: Any = None, timeout: float = 600.0) -> Any:
        """One request; a connection failure with a dead process becomes EngineDied."""
        try:
            return self._request(method, path, payload, timeout)
        except (OSError, urllib.error.URLError) as err:
            # The kernel closes a dying process's sockets just before it becomes a zombie:
            # give the exit a moment to register before calling the server alive.
            if self.process is not None:
                try:
                    self.process.wait(timeout=2.0)
                except subprocess.TimeoutExpired:
                    pass
            if not self.alive():
                raise EngineDied(f"SGLang server died during {method} {path}: {err}") from err
            raise

    @staticmethod
    def _check_success(answer: Any, what: str) -> None:
        if isinstance(answer, dict) and answer.get("success") is False:
            raise RuntimeError(f"SGLang {what} failed: {answer.get('message')}")

    # ------------------------------------------------------------------ protocol
    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        request_ids: list[str] | None = None,
        resume: list | None = None,
    ) -> list[list[Sample]]:
        """Sample params.n responses per prompt, or continue the partial responses resume[i]
        lists (sglang_api.plan_samples); restarts the server and retries on death."""
        request_ids = request_ids or default_request_ids(len(prompts))
        if len(request_ids) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(request_ids)} request_ids")
        check_logprob_support(params, self.cfg.return_original_logprob)
        if self._released:
            raise RuntimeError(
                f"SGLang engine: generate while memory is released ({sorted(self._released)}); "
                "call resume_memory first"
            )
        if self._partial_sync:
            raise RuntimeError(
                "SGLang engine: the last weight update failed part-way, the server holds mixed "
                "weights; run a full, successful update_weights before generating"
            )
        payload = build_generate_payload(prompts, params, request_ids, resume)
        with self._inflight_lock:
            for rid in request_ids:
                self._inflight[rid] = []
            for planned in plan_samples(prompts, params, request_ids, resume):
                self._inflight[planned.request_id].append(sample_rid(planned.request_id, planned.sample_index))
        try:
            for attempt in range(self.cfg.max_restarts + 1):
                version = self.weight_version
                try:
                    answer = self._call("POST", "/generate", payload, self.cfg.request_timeout_s)
                    break
                except EngineDied as err:
                    if attempt == self.cfg.max_restarts:
                        self._unrecoverable(err)
                    logger.warning("%s; restarting and retrying the batch", err)
                    try:
                        self.restart()
                    except Exception as restart_err:
                        self._unrecoverable(restart_err)
        finally:
            with self._inflight_lock:
                for rid in request_ids:
                    self._inflight.pop(rid, None)
        return to_samples(answer, prompts, params, request_ids, version,
                          self.cfg.return_original_logprob, self.cfg.routed_experts_layout, resume)

    def _unrecoverable(self, err: Exception) -> None:
        """Give up: raise err, or end the Ray actor so its owner replaces it (exit_on_death)."""
        self._kill()
        if self.exit_on_death:
            import ray

            logger.error("SGLang engine cannot recover (%s); exiting the actor", err)
            ray.actor.exit_actor()
        raise err

    def abort(self, request_ids: list[str]) -> None:
        """Abort the samples of the named in-flight requests (they finish with "abort")."""
        with self._inflight_lock:
            rids = [s for rid in request_ids for s in self._inflight.get(rid, [])]
        for srid in rids:
            try:
                self._call("POST", "/abort_request", {"rid": srid, "abort_all": False}, 30)
            except (EngineDied, OSError, urllib.error.URLError) as err:
                logger.warning("abort of %s failed: %s", srid, err)

    # ------------------------------------------------------------------ weights
    # 0.5.23 answers every update_weights_from_tensor / _from_distributed with HTTP 400
    # unless it runs inside a session (srt/managers/scheduler_components/weight_updater.py,
    # the _session guard); end_weight_update also runs the model's post-load processing.
    def begin_weight_update(self, version: int | None = None) -> None:
        """Open the server's weight-update session (one per sync, around all buckets);
        `version` is what end_weight_update() will then serve when it is given none."""
        self._pending_version = int(version) if version is not None else self.weight_version
        if self._session_open:
            raise RuntimeError("SGLang engine: a weight-update session is already open; "
                               "call end_weight_update first")
        answer = self._call("POST", "/begin_weight_update", {}, self.cfg.request_timeout_s)
        self._check_success(answer, "begin_weight_update")
        self._session_open = True
        self._partial_sync = True  # until end_weight_update: the weights are mixed
        self._sync_stats = [time.perf_counter(), 0, 0]

    def end_weight_update(self, version: int | None = None) -> None:
        """Close the session; the server now serves weight version `version` (default: the
        one begin_weight_update was given). The radix cache is stale after new weights."""
        if not self._session_open:
            raise RuntimeError("SGLang engine: end_weight_update without begin_weight_update")
        version = self._pending_version if version is None else version
        answer = self._call("POST", "/end_weight_update", {}, self.cfg.request_timeout_s)
        if getattr(self, "_flush_at_end", False):
            self._flush_at_end = False
            self._call("GET", "/flush_cache", None, 120)
        self._session_open = False
        self._check_success(answer, "end_weight_update")
        self.weight_version = int(version)
        self._partial_sync = False
        start, total, count = self._sync_stats
        seconds = time.perf_counter() - start
        self.last_sync = {"bytes": float(total), "seconds": seconds, "buckets": float(count)}
        logger.info("SGLang weight sync v%d: %d buckets, %.1f MB in %.2f s",
                    version, count, total / 1e6, seconds)

    def update_weights_from_serialized(
        self, payloads: list[str], version: int, flush_cache: bool = False, nbytes: int = 0
    ) -> None:
        """Load one bucket serialized by its owner (sglang_api.serialize_bucket): one
        payload per engine TP rank. Only inside begin_weight_update / end_weight_update;
        flush_cache=True on the last bucket (the radix cache is stale after new weights)."""
        if not self._session_open:
            raise RuntimeError("SGLang engine: update_weights_from_serialized outside a "
                               "weight-update session; call begin_weight_update first")
        if len(payloads) != self.cfg.tp_size:
            raise ValueError(
                f"update_weights: a bucket has {len(payloads)} serialized payloads but the "
                f"engine runs tp_size={self.cfg.tp_size}: send one per SGLang TP rank"
            )
        answer = self._call(
            "POST",
            "/update_weights_from_tensor",
            {
                "serialized_named_tensors": list(payloads),
                "load_format": FLATTENED_BUCKET,
                "flush_cache": bool(flush_cache),
                "weight_version": str(version),
            },
            self.cfg.request_timeout_s,
        )
        self._check_success(answer, "update_weights_from_tensor")
        self._synced = True
        self._sync_stats[1] += int(nbytes)
        self._sync_stats[2] += 1

    def update_weights(self, buckets: Iterable[WeightBucket], version: int) -> None:
        """Push HF-named host copies, one request per bucket as given (the policy's export
        cuts them at rollout.weight_bucket_mb), one session.

        Serialized here, by value (see serialize_bucket): correct from any process but it
        copies the weights through HTTP. Colocated on GPUs, a policy rank serializes its
        CUDA tensors itself and calls begin_weight_update / update_weights_from_serialized /
        end_weight_update (zero copy).
        """
        mapped = (map_weight_names(b, self.tie_word_embeddings, self.rename) for b in buckets)
        payloads = (
            (serialize_bucket(bucket, self.cfg.tp_size), bucket_nbytes(bucket))
            for bucket in mapped if bucket  # a tied lm_head alone maps to nothing
        )
        self.update_weights_serialized(payloads, version)

    def update_weights_serialized(
        self, buckets: Iterable[list[str] | tuple[list[str], int]], version: int
    ) -> None:
        """One session over buckets already serialized (per bucket: one string per TP rank,
        optionally paired with the bucket's bytes)."""
        self.begin_weight_update()
        try:
            for bucket, last in _with_last(buckets):
                per_rank, nbytes = bucket if isinstance(bucket, tuple) else (bucket, 0)
                self.update_weights_from_serialized(per_rank, version, flush_cache=last, nbytes=nbytes)
        except BaseException:
            self._abandon_session()
            raise
        self.end_weight_update(version)

    def _abandon_session(self) -> None:
        """Close a session after a failed bucket; the weights stay marked partial."""
        if self._session_open:
            try:
                self._call("POST", "/end_weight_update", {}, 60)
            except Exception:  # noqa: BLE001 - a dead server has no session left
                logger.warning("closing the weight-update session failed", exc_info=True)
            self._session_open = False

    # The push protocol (rollout/protocol.py): policy ranks send buckets into the session.
    def load_weight_bucket(self, bucket: WeightBucket) -> None:
        """One bucket of tensors this process holds, serialized here (by value)."""
        mapped = map_weight_names(bucket, self.tie_word_embeddings, self.rename)
        self.load_weight_bucket_serialized(serialize_bucket(mapped, self.cfg.tp_size), bucket_nbytes(mapped))

    def load_weight_bucket_serialized(self, payloads: list[str], nbytes: int = 0) -> None:
        """One bucket serialized by the policy rank that owns its tensors (one payload per
        SGLang TP rank), inside the session begin_weight_update(version) opened."""
        self.update_weights_from_serialized(payloads, self._pending_version, flush_cache=False, nbytes=nbytes)
        self._flush_at_end = True  # which bucket is last is known only when the session closes

    def receive_weight_bucket(self, meta: Any, group_name: str) -> None:
        """A bucket broadcast over the weight-update group (metadata first; blocks until the
        sender's broadcasts have arrived)."""
        # Renamed as the other transports rename (map_weight_names); nothing is dropped here, since
        # the sender broadcasts every tensor of the bucket and SGLang receives one per name.
        names = [(self.rename or {}).get(n, n) for n in meta.names]
        answer = self._call("POST", "/update_weights_from_distributed", {
            "names": names, "dtypes": list(meta.dtypes), "shapes": [list(s) for s in meta.shapes],
            "group_name": group_name, "flush_cache": False,
        }, self.cfg.request_timeout_s)
        self._check_success(answer, "update_weights_from_distributed")

    def destroy_weights_update_group(self, group_name: str) -> None:
        answer = self._call("POST", "/destroy_weights_update_group", {"group_name": group_name},
                            self.cfg.request_timeout_s)
        self._check_success(answer, "destroy_weights_update_group")


    def init_weights_update_group(
        self, master_address: str, master_port: int, rank_offset: int, world_size: int,
        group_name: str = "weight_update_group", backend: str = "nccl",
    ) -> None:
        """Join the trainer's NCCL group (separate-GPU mode); rank_offset = this engine's first rank."""
        answer = self._call("POST", "/init_weights_update_group", {
            "master_address": master_address, "master_port": master_port,
            "rank_offset": rank_offset, "world_size": world_size,
            "group_name": group_name, "backend": backend,
        }, self.cfg.request_timeout_s)
        self._check_success(answer, "init_weights_update_group")

    def update_weights_from_distributed(
        self,
        buckets: Iterable[WeightBucket],
        version: int,
        broadcast: Callable[[WeightBucket], None],
        group_name: str = "weight_update_group",
    ) -> None:
        """Separate-GPU sync, one session: post each bucket's metadata, then broadcast it.

        broadcast(bucket) runs in the trainer process (rank 0 of the group) and must
        torch.distributed.broadcast each tensor in order; the HTTP call blocks until the
        server has received them, so it runs in a thread meanwhile.
        """
        mapped = (map_weight_names(b, self.tie_word_embeddings, self.rename) for b in buckets)
        self.begin_weight_update()
        try:
            for bucket, last in _with_last(b for b in mapped if b):
                self._post_distributed_bucket(bucket, last, version, broadcast, group_name)
        except BaseException:
            self._abandon_session()
            raise
        self.end_weight_update(version)

    def _post_distributed_bucket(self, bucket, last, version, broadcast, group_name) -> None:
        payload = {
            "names": [n for n, _ in bucket],
            "dtypes": [str(t.dtype).replace("torch.", "") for _, t in bucket],
            "shapes": [list(t.shape) for _, t in bucket],
            "group_name": group_name,
            "flush_cache": last,
            "weight_version": str(version),
        }
        result: dict[str, Any] = {}

        def post() -> None:
            try:
                result["answer"] = self._call("POST", "/update_weights_from_distributed",
                                              payload, self.cfg.request_timeout_s)
            except Exception as err:  # re-raised in the caller's thread below
                result["error"] = err

        thread = threading.Thread(target=post)
        thread.start()
        broadcast(bucket)
        thread.join()
        if "error" in result:
            raise result["error"]
        self._check_success(result["answer"], "update_weights_from_distributed")
        self._synced = True
        self._sync_stats[1] += bucket_nbytes(bucket)
        self._sync_stats[2] += 1

    # ------------------------------------------------------------------ memory
    def release_memory(self, tags: list[str] | None = None) -> None:
        """Free GPU memory (colocated train phase); tags default to all of MEMORY_TAGS.

        0.5.23 asserts that the server is idle (weight_updater.py,
        release_memory_occupation), so this refuses while requests are in flight, and
        releases only what is resident (a second release of a tag is a no-op here).
        """
        tags = list(MEMORY_TAGS) if not tags else list(tags)
        unknown = set(tags) - set(MEMORY_TAGS)
        if unknown:
            raise ValueError(f"release_memory: unknown tags {sorted(unknown)}; SGLang knows {MEMORY_TAGS}")
        with self._inflight_lock:
            busy = sorted(self._inflight)
        if busy:
            raise RuntimeError(f"release_memory while requests are in flight ({busy[:3]}...): "
                               "SGLang releases memory only when idle; abort or finish them first")
        todo = [t for t in tags if t not in self._released]
        if not todo:
            return
        self._call("GET", "/flush_cache", None, 120)
        self._call("POST", "/release_memory_occupation", {"tags": todo}, self.cfg.request_timeout_s)
        self._released |= set(todo)

    def resume_memory(self, tags: list[str] | None = None) -> None:
        """Re-acquire released memory; tags default to everything released. ["weights"]
        first, a weight sync, then ["kv_cache", "cuda_graph"] keeps the peak low. 0.5.23
        raises in the scheduler when a tag is resumed that is not released, so only
        released tags are sent."""
        tags = sorted(self._released) if tags is None else list(tags)
        todo = [t for t in tags if t in self._released]
        if not todo:
            return
        self._call("POST", "/resume_memory_occupation", {"tags": todo}, self.cfg.request_timeout_s)
        self._released -= set(todo)

    def released_memory(self) -> list[str]:
        return sorted(self._released)

    def health(self) -> bool:
        """Alive and answering. /health_generate runs a real generation, so while memory is
        released only /health is asked (started with generation on /health turned off)."""
        if not self.alive():
            return False
        if self._released:
            try:
                self._request("GET", "/health", None, timeout=5)
                return True
            except (OSError, urllib.error.URLError, ValueError):
                return False
        return self._ping()

    def get_tp_size(self) -> int:
        return self.cfg.tp_size

    def get_weight_version(self) -> int:
        return self.weight_version

    def shutdown(self) -> None:
        self._kill()


def sglang_config_from(cfg: Any, engine_index: int = 0, slot: Any = None) -> SGLangConfig:
    """The SGLangConfig of engine engine_index of a run (dapo_megatron.config.DapoConfig);
    slot: its dapo_megatron.resolve.EngineSlot (default: resolved from cfg), which says
    which GPUs of its node it uses."""
    r, par = cfg.rollout, cfg.parallel
    if not cfg.model.hf_dir:
        raise ValueError(
            "rollout.engine=sglang needs model.hf_dir: SGLang reads the architecture, tokenizer "
            "and initial weights from an HF checkpoint directory"
        )
    if slot is None:
        from dapo_megatron.resolve import engine_layout

        slot = engine_layout(cfg)[engine_index]
    # "auto" lets SGLang take the checkpoint's dtype, as the policy does on GPU.
    dtype = "auto" if cfg.model.params_dtype == "auto" else name_of(cfg.model.params_dtype)
    return SGLangConfig(
        model_path=cfg.model.hf_dir,
        tp_size=r.engine_tp,
        base_gpu_id=slot.base_gpu,
        mem_fraction_static=r.sglang_mem_fraction,
        enable_memory_saver=r.placement == "colocated",
        random_seed=cfg.trainer.seed + engine_index,
        deterministic_inference=r.sglang_deterministic,
        dtype=dtype,
        # A Ray actor without GPUs may see no devices; base_gpu_id indexes the node's GPUs.
        env={"CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in range(par.gpus_per_node))},
        routed_experts_layout=_routed_experts_layout(cfg),
    )


def _routed_experts_layout(cfg: Any) -> tuple[int, int] | None:
    """(num_hidden_layers, num_experts_per_tok) when the trainer replays routing, else None."""
    if cfg.algo.routing_replay == "none":
        return None
    from dapo_megatron.resolve import read_hf_config

    hf, _ = read_hf_config(cfg)
    return int(hf["num_hidden_layers"]), int(hf["num_experts_per_tok"])


def create_sglang_actor(
    cfg: Any,
    hf_config: dict | None = None,
    *,
    engine_index: int = 0,
    slot: Any = None,
    num_cpus: float = 1,
    max_concurrency: int = 4,
    **ray_options: Any,
):
    """An SGLangEngine in a Ray actor; cfg is a DapoConfig or an SGLangConfig.

    The actor reserves no GPU: the server process it starts uses the GPUs the colocated
    training actors hold (placement is the caller's, via ray_options such as
    scheduling_strategy). max_concurrency lets abort() reach a busy actor. A server that
    dies is restarted in place while the weights are still the checkpoint's; after a sync
    the actor exits instead (exit_on_death), and the caller replaces it and re-syncs.
    """
    import ray

    scfg = cfg if isinstance(cfg, SGLangConfig) else sglang_config_from(cfg, engine_index, slot)
    tied = bool((hf_config or {}).get("tie_word_embeddings", False))
    actor_cls = ray.remote(SGLangEngine)
    return actor_cls.options(num_cpus=num_cpus, num_gpus=0, max_concurrency=max_concurrency, **ray_options).remote(
        scfg, tie_word_embeddings=tied, exit_on_death=True
    )
