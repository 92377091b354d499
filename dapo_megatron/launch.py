"""Start a Ray cluster over the nodes of a Slurm job, run one command on it, tear it down.

`slurm/launch.sh` runs this module once per node (`srun --ntasks-per-node=1`):

    python -m dapo_megatron.launch [options] -- dapo-megatron train cfg.yaml key=value ...

Every task reads the job's SLURM_* variables (`SlurmJob.from_env`), then

- node 0 starts `ray start --head`, waits until every node, CPU and GPU of the allocation
  has registered with Ray (bounded by `--timeout`, with an error that says what is missing),
  runs the command with RAY_ADDRESS pointing at the head, forwards SIGUSR1 / SIGTERM /
  SIGINT to it (the trainer checkpoints on them), stops Ray and exits with the command's code.
  It writes its pid to `--pidfile` (DAPO_LAUNCH_PIDFILE): the batch shell, which runs on the
  same host, signals this process directly. Signalling through srun would not do: with
  proctrack/cgroup, slurmstepd delivers the signal to every process of the step, and SIGUSR1
  kills the Ray daemons and actors before the trainer could checkpoint;
- node k > 0 waits for the head's port, runs `ray start --address=<head>`, and stays until
  the head goes away, then stops its Ray node. A SIGTERM does not stop it at once: the
  trainer on node 0 may still need this node's actors to write its checkpoint.

Ray's token authentication must be set the same way on every node and in the command: with
RAY_AUTH_MODE unset, Ray 2.60 turns it on for a head that finds ~/.ray/auth_token (a shared home
has one as soon as anyone ran `ray.init()`), while joining nodes and drivers keep it off and are
refused. `ray_auth_env` therefore makes the mode explicit; slurm/launch.sh exports a fresh
per-job RAY_AUTH_TOKEN that srun hands to every node.

Ray runs as a child `ray start --block` in its own process group and is stopped by that
process id, never with `ray stop`, which kills every Ray process of the user on the host.
Two nodes of one job can therefore share a host (the tests do, on loopback) if each gets its
own `--temp-dir`.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

logger = logging.getLogger(__name__)

DEFAULT_PORT = 6379  # Ray's own default GCS port


class LaunchError(RuntimeError):
    """The cluster could not be formed or the Slurm environment is incomplete."""


# --------------------------------------------------------------------------- Slurm variables


_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def expand_nodelist(spec: str) -> list[str]:
    """Expand a Slurm hostlist as `scontrol show hostnames` does.

    `node[01-03,07]` -> node01 node02 node03 node07 (zero padding kept from the range's
    first number); `a,b[1-2]` -> a b1 b2; several bracket groups in one name expand as a
    product (`r[1-2]n[1-2]` -> r1n1 r1n2 r2n1 r2n2). Order is kept, duplicates are not removed.
    """
    hosts: list[str] = []
    for item in _split_top_level(spec.strip(), spec):
        hosts.extend(_expand_host(item, spec))
    if not hosts:
        raise LaunchError(f"empty Slurm node list {spec!r}")
    return hosts


def _split_top_level(spec: str, whole: str) -> list[str]:
    """Split at commas outside brackets."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(spec):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise LaunchError(f"nested '[' in Slurm node list {whole!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise LaunchError(f"unbalanced ']' in Slurm node list {whole!r}")
        elif ch == "," and depth == 0:
            items.append(spec[start:i])
            start = i + 1
    if depth != 0:
        raise LaunchError(f"unbalanced '[' in Slurm node list {whole!r}")
    items.append(spec[start:])
    for item in items:
        if not item:
            raise LaunchError(f"empty host name in Slurm node list {whole!r}")
    return items


def _expand_host(item: str, whole: str) -> list[str]:
    open_at = item.find("[")
    if open_at < 0:
        return [item]
    close_at = item.index("]", open_at)
    prefix, body, rest = item[:open_at], item[open_at + 1 : close_at], item[close_at + 1 :]
    values: list[str] = []
    for part in body.split(","):
        m = _RANGE.match(part)
        if not m:
            raise LaunchError(f"bad range {part!r} in Slurm node list {whole!r} (expected N or N-M)")
        lo_text, hi_text = m.group(1), m.group(2) or m.group(1)
        lo, hi = int(lo_text), int(hi_text)
        if hi < lo:
            raise LaunchError(f"descending range {part!r} in Slurm node list {whole!r}")
        width = len(lo_text)
        values.extend(str(n).zfill(width) for n in range(lo, hi + 1))
    tails = _expand_host(rest, whole) if rest else [""]
    return [prefix + v + t for v in values for t in tails]


def expand_counts(spec: str) -> list[int]:
    """Expand Slurm's per-node count list, e.g. SLURM_JOB_CPUS_PER_NODE `72(x2),36` -> [72, 72, 36]."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise LaunchError(f"bad per-node count list {spec!r} (expected e.g. '72(x2),36')")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


def _gpus_on_node(env: Mapping[str, str]) -> int:
    """GPUs Slurm gave this node: SLURM_GPUS_ON_NODE, else the CUDA_VISIBLE_DEVICES list."""
    if env.get("SLURM_GPUS_ON_NODE"):
        return _int_var(env, "SLURM_GPUS_ON_NODE")
    visible = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible and visible not in ("-1", "NoDevFiles"):
        return len([d for d in visible.split(",") if d.strip()])
    return 0


def _int_var(env: Mapping[str, str], name: str) -> int:
    text = env.get(name)
    if text is None or text == "":
        raise LaunchError(f"{name} is not set: run this inside a Slurm allocation (sbatch/srun), "
                          f"or set it by hand for a local test")
    try:
        return int(text)
    except ValueError:
        raise LaunchError(f"{name}={text!r} is not an integer") from None


@dataclass(frozen=True)
class SlurmJob:
    """What one task needs to know about its Slurm job. Nodes are assumed to have equal GPUs
    (sbatch --gpus-per-node); CPUs may differ per node."""

    job_id: str
    nodes: tuple[str, ...]
    node_id: int
    gpus_per_node: int
    cpus_per_node: tuple[int, ...]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "SlurmJob":
        env = os.environ if env is None else env
        spec = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not spec:
            raise LaunchError("SLURM_JOB_NODELIST is not set: run this inside a Slurm allocation "
                              "(sbatch/srun), or set it by hand for a local test")
        nodes = tuple(expand_nodelist(spec))
        num_nodes = _int_var(env, "SLURM_NNODES") if env.get("SLURM_NNODES") else len(nodes)
        if num_nodes != len(nodes):
            raise LaunchError(f"SLURM_NNODES={num_nodes} but SLURM_JOB_NODELIST={spec!r} names "
                              f"{len(nodes)} nodes")
        node_id = _int_var(env, "SLURM_NODEID")
        if not 0 <= node_id < num_nodes:
            raise LaunchError(f"SLURM_NODEID={node_id} is outside 0..{num_nodes - 1}")
        cpus_spec = env.get("SLURM_JOB_CPUS_PER_NODE")
        if cpus_spec:
            cpus = tuple(expand_counts(cpus_spec))
            if len(cpus) != num_nodes:
                raise LaunchError(f"SLURM_JOB_CPUS_PER_NODE={cpus_spec!r} lists {len(cpus)} nodes, "
                                  f"the job has {num_nodes}")
        elif env.get("SLURM_CPUS_ON_NODE"):
            cpus = (_int_var(env, "SLURM_CPUS_ON_NODE"),) * num_nodes
        else:
            cpus = (os.cpu_count() or 1,) * num_nodes
        return cls(env.get("SLURM_JOB_ID", "local"), nodes, node_id, _gpus_on_node(env), cpus)

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    @property
    def is_head(self) -> bool:
        return self.node_id == 0

    @property
    def head_node(self) -> str:
        return self.nodes[0]

    @property
    def total_gpus(self) -> int:
        return self.gpus_per_node * self.num_nodes

    @property
    def total_cpus(self) -> int:
        return sum(self.cpus_per_node)


def resolve_head_ip(job: SlurmJob, override: str | None = None) -> str:
    """The head's IP: `override` (DAPO_RAY_HEAD_IP) when given, else the first node's name
    resolved through DNS. Multi-NIC nodes may need the override to pick the fast network."""
    if override:
        return override
    try:
        return socket.gethostbyname(job.head_node)
    except OSError as e:
        raise LaunchError(f"cannot resolve the head node {job.head_node!r} ({e}); set "
                          f"DAPO_RAY_HEAD_IP to its address") from None


# --------------------------------------------------------------------------- Ray commands


@dataclass
class RayOptions:
    port: int = DEFAULT_PORT
    head_ip: Optional[str] = None  # default: resolve the first node of the job
    node_ip: Optional[str] = None  # default: Ray picks the address that reaches the head
    temp_dir: Optional[str] = None  # base; each node uses <base>/<job>-<node> (one host may run several)
    object_store_bytes: Optional[int] = None  # default: Ray's (30% of RAM)
    timeout_s: float = 600.0  # for the whole cluster to register (head) / the head to appear (workers)
    head_gone_s: float = 10.0  # workers stop when the head has been unreachable this long
    term_grace_s: float = 300.0  # workers keep Ray up this long after SIGTERM for the checkpoint
    poll_s: float = 1.0
    extra_args: tuple[str, ...] = ()
    pidfile: Optional[str] = None  # node 0 writes its pid here for the batch shell


def ray_start_command(job: SlurmJob, opts: RayOptions, head_ip: str, ray_exe: str = "ray") -> list[str]:
    """The `ray start --block` command line for this task's node."""
    cmd = [ray_exe, "start", "--block", "--disable-usage-stats", f"--num-cpus={job.cpus_per_node[job.node_id]}"]
    # GPUs are left to Ray's detection (CUDA_VISIBLE_DEVICES from Slurm) on purpose: the
    # registration check then catches a node whose GPUs Ray cannot see.
    if job.is_head:
        cmd += ["--head", f"--port={opts.port}", "--include-dashboard=false"]
    else:
        cmd += [f"--address={head_ip}:{opts.port}"]
    if opts.node_ip:
        cmd.append(f"--node-ip-address={opts.node_ip}")
    elif job.is_head:
        cmd.append(f"--node-ip-address={head_ip}")
    if opts.temp_dir:
        cmd.append(f"--temp-dir={node_temp_dir(job, opts.temp_dir)}")
    if opts.object_store_bytes:
        cmd.append(f"--object-store-memory={opts.object_store_bytes}")
    # Ray's fixed default (52365) would collide when two nodes share a host; nothing here
    # uses the agent's HTTP port, so any free port does.
    cmd.append("--dashboard-agent-listen-port=0")
    return cmd + list(opts.extra_args)


def node_temp_dir(job: SlurmJob, base: str) -> str:
    return os.path.join(base, f"{job.job_id}-{job.node_id}")


def ray_auth_env(env: Mapping[str, str]) -> dict[str, str]:
    """RAY_AUTH_MODE made explicit: the user's if set, else "token" when RAY_AUTH_TOKEN is given
    (every node and driver then shares it), else "disabled" (and a warning)."""
    if env.get("RAY_AUTH_MODE"):
        return {}
    if env.get("RAY_AUTH_TOKEN"):
        return {"RAY_AUTH_MODE": "token"}
    logger.warning("RAY_AUTH_TOKEN is not set: Ray runs without token authentication (slurm/launch.sh "
                   "sets a per-job token; set RAY_AUTH_MODE yourself to choose)")
    return {"RAY_AUTH_MODE": "disabled"}


class RayNode:
    """One `ray start --block` child process in its own process group."""

    def __init__(self, cmd: Sequence[str]):
        self.cmd = list(cmd)
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> None:
        logger.info("starting Ray: %s", " ".join(self.cmd))
        env = dict(os.environ)
        # Stop at once on SIGTERM; Ray otherwise drains for 30 s (a serving feature).
        env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
        # Workers (policy ranks, engines) at this task's priority, not Ray's default +15.
        env.setdefault("RAY_worker_niceness", "0")
        self.proc = subprocess.Popen(self.cmd, env=env, start_new_session=True)

    def exited(self) -> Optional[int]:
        return None if self.proc is None else self.proc.poll()

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM to `ray start` (it kills its raylet, GCS, workers), then SIGKILL the group."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session made it the group leader
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("Ray did not stop within %.0f s; killing its process group", timeout_s)
        try:
            os.killpg(pgid, signal.SIGKILL)  # leftovers that share the group (none, normally)
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)
        self.proc = None


def port_open(host: str, port: int, timeout_s: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout_s: float, poll_s: float = 1.0,
                  alive: Callable[[], bool] = lambda: True, what: str = "the Ray head") -> None:
    """Block until host:port accepts connections; LaunchError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not port_open(host, port, timeout_s=min(1.0, poll_s)):
        if not alive():
            raise LaunchError(f"{what} exited before {host}:{port} opened; see its output above")
        if time.monotonic() >= deadline:
            raise LaunchError(f"{what} at {host}:{port} did not answer within {timeout_s:.0f} s: check "
                              f"that node 0 started Ray (its log), that the port is not firewalled, "
                              f"and DAPO_RAY_HEAD_IP / DAPO_RAY_PORT")
        time.sleep(poll_s)


def wait_for_cluster(list_nodes: Callable[[], list[dict]], *, nodes: int, gpus: int, cpus: int,
                     timeout_s: float, poll_s: float = 1.0, expected_hosts: Sequence[str] = ()) -> list[dict]:
    """Poll `list_nodes()` (ray.nodes()) until `nodes` alive nodes with at least `gpus` GPUs and
    `cpus` CPUs in total have registered. Returns the alive nodes; LaunchError on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [n for n in list_nodes() if n.get("Alive")]
        have_gpus = sum(int(n.get("Resources", {}).get("GPU", 0)) for n in alive)
        have_cpus = sum(int(n.get("Resources", {}).get("CPU", 0)) for n in alive)
        if len(alive) >= nodes and have_gpus >= gpus and have_cpus >= cpus:
            return alive
        if time.monotonic() >= deadline:
            seen = sorted(str(n.get("NodeManagerHostname", n.get("NodeManagerAddress", "?"))) for n in alive)
            missing = sorted(set(expected_hosts) - {s.split(".")[0] for s in seen}) if expected_hosts else []
            raise LaunchError(
                f"Ray cluster incomplete after {timeout_s:.0f} s: {len(alive)} of {nodes} nodes, "
                f"{have_gpus} of {gpus} GPUs, {have_cpus} of {cpus} CPUs registered "
                f"(registered: {', '.join(seen) or 'none'}"
                + (f"; not seen: {', '.join(missing)}" if missing else "")
                + "). Check the missing nodes' task output for `ray start` errors and their GPUs "
                "with nvidia-smi; raise the wait with DAPO_CLUSTER_TIMEOUT_S if nodes are just slow."
            )
        time.sleep(poll_s)


def wait_for_ray_cluster(address: str, job: SlurmJob, timeout_s: float, poll_s: float = 1.0) -> list[dict]:
    """Connect to the cluster as a driver, wait for every node of `job`, disconnect."""
    import ray  # here, not at import time: the Slurm helpers above need no Ray

    # ray.init installs its own SIGTERM handler and ray.shutdown leaves SIGTERM at the default
    # (terminate), which would kill this launcher without stopping Ray: keep ours in place.
    saved = {sig: signal.getsignal(sig) for sig in _Signals.HANDLED}
    ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    try:
        _restore(saved)
        return wait_for_cluster(ray.nodes, nodes=job.num_nodes, gpus=job.total_gpus, cpus=job.total_cpus,
                                timeout_s=timeout_s, poll_s=poll_s, expected_hosts=job.nodes)
    finally:
        ray.shutdown()
        _restore(saved)


def _restore(handlers: dict) -> None:
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


# --------------------------------------------------------------------------- per-node roles


class _Signals:
    """Forward SIGUSR1/SIGTERM/SIGINT to a child process group (head) or just note them (workers)."""

    HANDLED = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.target_pgid: Optional[int] = None
        self.received: list[int] = []
        self._old = {}

    def __enter__(self):
        for sig in self.HANDLED:
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum, _frame):
        self.received.append(signum)
        if self.target_pgid is not None:
            logger.info("forwarding %s to the command", signal.Signals(signum).name)
            try:
                os.killpg(self.target_pgid, signum)
            except ProcessLookupError:
                pass


def run_head(job: SlurmJob, command: Sequence[str], opts: RayOptions, ray_exe: str = "ray") -> int:
    head_ip = resolve_head_ip(job, opts.head_ip)
    address = f"{head_ip}:{opts.port}"
    node = RayNode(ray_start_command(job, opts, head_ip, ray_exe))
    with _Signals() as signals:
        try:
            if opts.pidfile:
                with open(opts.pidfile, "w") as f:
                    f.write(f"{os.getpid()}\n")
            node.start()
            t0 = time.monotonic()
            wait_for_port(head_ip, opts.port, opts.timeout_s, opts.poll_s, alive=lambda: node.exited() is None)
            if signals.received:
                return 128 + signals.received[0]
            alive = wait_for_ray_cluster(address, job, max(1.0, opts.timeout_s - (time.monotonic() - t0)), opts.poll_s)
            logger.info("Ray cluster ready at %s: %d nodes, %d GPUs, %d CPUs (%.1f s)", address, len(alive),
                        job.total_gpus, job.total_cpus, time.monotonic() - t0)
            if signals.received:  # asked to stop while the cluster formed: nothing to checkpoint yet
                return 128 + signals.received[0]
            env = dict(os.environ, RAY_ADDRESS=address)
            proc = subprocess.Popen(list(command), env=env, start_new_session=True)
            signals.target_pgid = proc.pid
            for sig in signals.received:  # a signal that raced the start still reaches the command
                os.killpg(proc.pid, sig)
            rc = proc.wait()
            signals.target_pgid = None
            logger.info("command exited with %d; stopping Ray", rc)
            return rc if rc >= 0 else 128 - rc  # killed by signal N: 128+N, as a shell reports it
        finally:
            node.stop()
            if opts.pidfile:
                try:
                    os.remove(opts.pidfile)
                except FileNotFoundError:
                    pass


def run_worker(job: SlurmJob, opts: RayOptions, ray_exe: str = "ray") -> int:
    head_ip = resolve_head_ip(job, opts.head_ip)
    with _Signals() as signals:
        wait_for_port(head_ip, opts.port, opts.timeout_s, opts.poll_s)
        node = RayNode(ray_start_command(job, opts, head_ip, ray_exe))
        node.start()
        try:
            gone_since: Optional[float] = None
            term_at: Optional[float] = None
            while True:
                rc = node.exited()
                if rc is not None:
                    raise LaunchError(f"ray start on node {job.node_id} ({job.nodes[job.node_id]}) exited "
                                      f"with {rc}; see its output above")
                now = time.monotonic()
                if term_at is None and any(s != signal.SIGUSR1 for s in signals.received):
                    term_at = now  # SIGUSR1 is the head's business (it reaches the trainer there)
                if term_at is not None and now - term_at > opts.term_grace_s:
                    logger.info("node %d: stopping Ray %.0f s after SIGTERM", job.node_id, opts.term_grace_s)
                    return 0
                if port_open(head_ip, opts.port, timeout_s=min(1.0, opts.poll_s)):
                    gone_since = None
                elif gone_since is None:
                    gone_since = now
                elif now - gone_since >= opts.head_gone_s:
                    logger.info("node %d: the head at %s:%d is gone; stopping Ray", job.node_id, head_ip, opts.port)
                    return 0
                time.sleep(opts.poll_s)
        finally:
            node.stop()


# --------------------------------------------------------------------------- entry point


def _parser() -> argparse.ArgumentParser:
    env = os.environ
    p = argparse.ArgumentParser(
        prog="python -m dapo_megatron.launch",
        description="Per-node launcher (run once per node by srun): form a Ray cluster from the Slurm "
                    "job, run COMMAND on node 0, tear Ray down. Defaults come from DAPO_* variables.")
    p.add_argument("--port", type=int, default=int(env.get("DAPO_RAY_PORT", DEFAULT_PORT)))
    p.add_argument("--head-ip", default=env.get("DAPO_RAY_HEAD_IP") or None)
    p.add_argument("--node-ip", default=env.get("DAPO_RAY_NODE_IP") or None)
    p.add_argument("--temp-dir", default=env.get("DAPO_RAY_TEMP_DIR") or None)
    p.add_argument("--object-store-bytes", type=int,
                   default=int(env["DAPO_RAY_OBJECT_STORE_BYTES"]) if env.get("DAPO_RAY_OBJECT_STORE_BYTES") else None)
    p.add_argument("--timeout", type=float, default=float(env.get("DAPO_CLUSTER_TIMEOUT_S", 600)))
    p.add_argument("--head-gone-s", type=float, default=float(env.get("DAPO_HEAD_GONE_S", 10)))
    p.add_argument("--term-grace-s", type=float, default=float(env.get("DAPO_TERM_GRACE_S", 300)))
    p.add_argument("--poll-s", type=float, default=1.0)
    p.add_argument("--pidfile", default=env.get("DAPO_LAUNCH_PIDFILE") or None,
                   help="node 0 writes its pid here (the batch shell signals it)")
    p.add_argument("--ray", default=os.path.join(os.path.dirname(sys.executable), "ray"),
                   help="the ray executable (default: next to this Python)")
    p.add_argument("--ray-arg", action="append", default=env.get("DAPO_RAY_START_ARGS", "").split(),
                   help="extra argument for `ray start` (repeatable)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...] to run on node 0")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s launch[%(process)d] %(levelname)s %(message)s")
    args = _parser().parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    opts = RayOptions(port=args.port, head_ip=args.head_ip, node_ip=args.node_ip, temp_dir=args.temp_dir,
                      object_store_bytes=args.object_store_bytes, timeout_s=args.timeout,
                      head_gone_s=args.head_gone_s, term_grace_s=args.term_grace_s, poll_s=args.poll_s,
                      extra_args=tuple(args.ray_arg), pidfile=args.pidfile)
    ray_exe = args.ray if os.path.exists(args.ray) else "ray"
    os.environ.update(ray_auth_env(os.environ))  # inherited by `ray start`, our driver and the command
    try:
        job = SlurmJob.from_env()
        if job.is_head:
            if not command:
                raise LaunchError("no command given: python -m dapo_megatron.launch [options] -- COMMAND ...")
            return run_head(job, command, opts, ray_exe)
        return run_worker(job, opts, ray_exe)
    except LaunchError as e:
        logger.error("%s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
