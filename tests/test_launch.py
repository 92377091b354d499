"""The Slurm launcher: hostlist parsing, the cluster wait, and slurm/launch.sh end to end on one
machine, with 2 Ray nodes on loopback behind a stand-in `srun` that runs one task per node."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from dapo_megatron.launch import (
    LaunchError, RayNode, RayOptions, SlurmJob, expand_counts, expand_nodelist, ray_auth_env, ray_start_command,
    wait_for_cluster, wait_for_port,
)
from dapo_megatron.ports import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH_SH = os.path.join(ROOT, "slurm", "launch.sh")
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "slurm", "*.sh")) + glob.glob(os.path.join(ROOT, "slurm", "*.sbatch")))


# --------------------------------------------------------------------------- Slurm variables


@pytest.mark.parametrize("spec,hosts", [
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("gpu7", ["gpu7"]),
    ("a,b[1-2],c", ["a", "b1", "b2", "c"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("r[1-2]-n[1,3]", ["r1-n1", "r1-n3", "r2-n1", "r2-n3"]),
    ("x[5]y", ["x5y"]),
])
def test_expand_nodelist(spec, hosts):
    assert expand_nodelist(spec) == hosts


@pytest.mark.parametrize("spec", ["node[3-1]", "node[01-03", "node01]", "a,,b", "node[a-b]", ""])
def test_expand_nodelist_rejects_malformed(spec):
    with pytest.raises(LaunchError, match="node list"):
        expand_nodelist(spec)


def test_expand_counts():
    assert expand_counts("72(x2),36") == [72, 72, 36]
    assert expand_counts("8") == [8]
    with pytest.raises(LaunchError, match="72x2"):
        expand_counts("72x2")


def _env(**kw):
    env = {"SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "gpu[1-3]", "SLURM_NNODES": "3",
           "SLURM_NODEID": "1", "SLURM_GPUS_ON_NODE": "8", "SLURM_JOB_CPUS_PER_NODE": "96(x2),48"}
    env.update(kw)
    return {k: v for k, v in env.items() if v is not None}


def test_slurm_job_from_env():
    job = SlurmJob.from_env(_env())
    assert job.nodes == ("gpu1", "gpu2", "gpu3") and job.head_node == "gpu1"
    assert (job.node_id, job.is_head, job.num_nodes) == (1, False, 3)
    assert (job.total_gpus, job.total_cpus, job.cpus_per_node) == (24, 240, (96, 96, 48))
    assert SlurmJob.from_env(_env(SLURM_GPUS_ON_NODE=None, CUDA_VISIBLE_DEVICES="0,1,2,3")).gpus_per_node == 4
    assert SlurmJob.from_env(_env(SLURM_GPUS_ON_NODE=None)).gpus_per_node == 0


@pytest.mark.parametrize("change,message", [
    ({"SLURM_JOB_NODELIST": None}, "SLURM_JOB_NODELIST is not set"),
    ({"SLURM_NODEID": None}, "SLURM_NODEID is not set"),
    ({"SLURM_NODEID": "3"}, "SLURM_NODEID=3 is outside 0..2"),
    ({"SLURM_NNODES": "2"}, "SLURM_NNODES=2 but SLURM_JOB_NODELIST='gpu\\[1-3\\]' names 3 nodes"),
    ({"SLURM_GPUS_ON_NODE": "eight"}, "SLURM_GPUS_ON_NODE='eight' is not an integer"),
    ({"SLURM_JOB_CPUS_PER_NODE": "96(x2)"}, "lists 2 nodes, the job has 3"),
])
def test_slurm_job_errors_name_the_variable(change, message):
    with pytest.raises(LaunchError, match=message):
        SlurmJob.from_env(_env(**change))


def test_ray_start_commands():
    head = SlurmJob.from_env(_env(SLURM_NODEID="0"))
    worker = SlurmJob.from_env(_env())
    opts = RayOptions(port=7000, temp_dir="/tmp/r", object_store_bytes=10**9)
    h = ray_start_command(head, opts, "10.0.0.1")
    assert h[:3] == ["ray", "start", "--block"]
    assert {"--head", "--port=7000", "--num-cpus=96", "--node-ip-address=10.0.0.1",
            "--temp-dir=/tmp/r/42-0", "--object-store-memory=1000000000"} <= set(h)
    assert not any(a.startswith("--num-gpus") for a in h)  # Ray detects them; the wait checks them
    w = ray_start_command(worker, opts, "10.0.0.1")
    assert "--address=10.0.0.1:7000" in w and "--head" not in w and "--temp-dir=/tmp/r/42-1" in w
    assert not any(a.startswith("--port") for a in w)  # head-only flag; ray start refuses it


def test_ray_auth_mode_is_made_explicit():
    # Unset, Ray 2.60 enables tokens on a head that finds ~/.ray/auth_token but not on joiners.
    assert ray_auth_env({"RAY_AUTH_TOKEN": "ab" * 32}) == {"RAY_AUTH_MODE": "token"}
    assert ray_auth_env({}) == {"RAY_AUTH_MODE": "disabled"}
    assert ray_auth_env({"RAY_AUTH_MODE": "token"}) == {}


def test_wait_for_cluster_counts_alive_nodes_and_resources():
    node = lambda host, gpus, alive=True: {"Alive": alive, "NodeManagerHostname": host,  # noqa: E731
                                          "Resources": {"CPU": 4.0, "GPU": float(gpus)}}
    views = iter([[node("a", 8)], [node("a", 8), node("b", 7)], [node("a", 8), node("b", 8), node("c", 8, False)]])
    seen = wait_for_cluster(lambda: next(views), nodes=2, gpus=16, cpus=8, timeout_s=10, poll_s=0.01)
    assert [n["NodeManagerHostname"] for n in seen] == ["a", "b"]


def test_wait_for_cluster_timeout_says_what_is_missing():
    nodes = [{"Alive": True, "NodeManagerHostname": "gpu1.cluster", "Resources": {"CPU": 96.0, "GPU": 8.0}},
             {"Alive": False, "NodeManagerHostname": "gpu2", "Resources": {"CPU": 96.0, "GPU": 8.0}}]
    t0 = time.monotonic()
    with pytest.raises(LaunchError) as err:
        wait_for_cluster(lambda: nodes, nodes=3, gpus=24, cpus=240, timeout_s=0.3, poll_s=0.05,
                         expected_hosts=["gpu1", "gpu2", "gpu3"])
    assert time.monotonic() - t0 < 5
    text = str(err.value)
    assert "1 of 3 nodes" in text and "8 of 24 GPUs" in text and "96 of 240 CPUs" in text
    assert "not seen: gpu2, gpu3" in text and "DAPO_CLUSTER_TIMEOUT_S" in text


def test_worker_gives_up_on_an_absent_head():
    port = free_port()  # closed again: nothing listens there
    t0 = time.monotonic()
    with pytest.raises(LaunchError, match=f"127.0.0.1:{port} did not answer within 1 s"):
        wait_for_port("127.0.0.1", port, timeout_s=1.0, poll_s=0.2)
    assert time.monotonic() - t0 < 5


def test_ray_node_starts_workers_at_its_own_priority(tmp_path, monkeypatch):
    # The raylet adds RAY_worker_niceness (Ray's default 15) to its niceness for every worker.
    monkeypatch.delenv("RAY_worker_niceness", raising=False)
    out = tmp_path / "env"
    node = RayNode([sys.executable, "-c", f"import os; open({str(out)!r}, 'w').write(os.environ['RAY_worker_niceness'])"])
    node.start()
    assert node.proc.wait(timeout=60) == 0
    assert out.read_text() == "0"


# --------------------------------------------------------------------------- shell scripts


def test_shell_scripts_parse_and_pass_shellcheck():
    assert {os.path.basename(p) for p in SCRIPTS} >= {"launch.sh", "dapo_32b.sbatch", "dapo_moe.sbatch"}
    for path in SCRIPTS:
        subprocess.run(["bash", "-n", path], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck); bash -n passed")
    out = subprocess.run(["shellcheck", "-x", *SCRIPTS], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_sbatch_scripts_forward_signals_and_requeue():
    for name in ("dapo_32b.sbatch", "dapo_moe.sbatch"):
        text = open(os.path.join(ROOT, "slurm", name)).read()
        for line in ("#SBATCH --ntasks-per-node=1", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@",
                     "exec slurm/launch.sh"):
            assert line in text, f"{name}: {line}"
        config = text.split("CONFIG=", 1)[1].split()[0]
        assert os.path.exists(os.path.join(ROOT, config)), f"{name}: {config}"


def test_launch_sh_outside_slurm_says_so():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    out = subprocess.run(["bash", LAUNCH_SH, "examples/qwen2.5_7b_dapo.yaml"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "runs inside a Slurm job" in out.stderr


# --------------------------------------------------------------------------- 2 Ray nodes on loopback

FAKE_SRUN = r"""#!/usr/bin/env bash
# Stand-in for srun: one local process per node of the job, signals forwarded to all of them.
while [[ $# -gt 0 && "$1" == -* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do
    SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 "$@" > "$FAKE_SLURM_DIR/task$i.log" 2>&1 &
    pids+=("$!")
done
trap 'kill -s USR1 "${pids[@]}" 2>/dev/null' USR1
trap 'kill -s TERM "${pids[@]}" 2>/dev/null' TERM
rc=0
for pid in "${pids[@]}"; do
    while true; do
        if wait "$pid"; then r=0; else r=$?; fi
        kill -0 "$pid" 2>/dev/null || break
    done
    if [[ $r -ne 0 ]]; then rc=$r; fi
done
exit "$rc"
"""

FAKE_SCONTROL = """#!/usr/bin/env bash
echo "$@" >> "$FAKE_SLURM_DIR/scontrol.log"
"""

# The command run on the cluster: records what Ray shows it, then waits for SIGUSR1 or SIGTERM.
PROBE = r"""
import json, os, signal, sys, time
import ray
ray.init(log_to_driver=False)
alive = [n for n in ray.nodes() if n["Alive"]]
report = {"nodes": len(alive), "cpus": sum(n["Resources"].get("CPU", 0) for n in alive),
          "address": os.environ.get("RAY_ADDRESS")}
ray.shutdown()
got = []  # handlers after ray.init/shutdown: Ray replaces the driver's SIGTERM handler
signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
with open(sys.argv[1] + ".tmp", "w") as f:
    json.dump(report, f)
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
deadline = time.time() + 120
while not got and time.time() < deadline:
    time.sleep(0.1)
with open(sys.argv[1] + ".signal", "w") as f:
    f.write(",".join(signal.Signals(s).name for s in got))
"""


def _processes_mentioning(tag: str) -> list[int]:
    pids = []
    for path in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(path, "rb") as f:
                if tag.encode() in f.read():
                    pids.append(int(path.split("/")[2]))
        except OSError:
            pass
    return [p for p in pids if p != os.getpid()]


@pytest.fixture
def slurm_sandbox(tmp_path):
    """SLURM_* variables for a 2-node job on this host, stand-in srun/scontrol on PATH, and a
    short Ray temp dir (Unix socket paths must stay under 108 bytes). Tests append the batch
    processes they start (each in its own session) to the list; afterwards their process groups
    and anything left running under the Ray temp dir are killed, whatever the test's outcome."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bindir / name).write_text(text)
        (bindir / name).chmod(0o755)
    ray_tmp = tempfile.mkdtemp(prefix="dmr", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RAY_"))}
    env.update({
        "PATH": f"{bindir}:{os.path.dirname(sys.executable)}:{env.get('PATH', '')}",
        "PYTHONPATH": ROOT,
        "FAKE_SLURM_DIR": str(tmp_path),
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[01-02]", "SLURM_NNODES": "2",
        "SLURM_JOB_CPUS_PER_NODE": "2(x2)", "SLURM_GPUS_ON_NODE": "0",
        "DAPO_PYTHON": sys.executable,
        "DAPO_RAY_HEAD_IP": "127.0.0.1",  # node01/node02 do not resolve here
        "DAPO_RAY_PORT": str(free_port()),
        "DAPO_RAY_TEMP_DIR": ray_tmp,
        "DAPO_RAY_OBJECT_STORE_BYTES": str(150 * 2**20),
        "DAPO_CLUSTER_TIMEOUT_S": "120",
        "DAPO_TERM_GRACE_S": "30",
        "DAPO_HEAD_GONE_S": "2",
        "DAPO_LAUNCH_PIDFILE": str(tmp_path / "launch.pid"),
    })
    started: list[subprocess.Popen] = []
    yield env, tmp_path, started
    for proc in started:  # a failed test: SIGTERM lets the launchers stop Ray, then SIGKILL
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in _processes_mentioning(ray_tmp):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(ray_tmp, ignore_errors=True)


def _logs(tmp_path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-6000:]}" for p in sorted(tmp_path.glob("*.log")))


def _wait_for_file(path, proc, timeout_s, tmp_path):
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        assert proc.poll() is None, f"launch.sh exited with {proc.returncode} early\n{_logs(tmp_path)}"
        assert time.monotonic() < deadline, f"no {os.path.basename(path)} after {timeout_s} s\n{_logs(tmp_path)}"
        time.sleep(0.2)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_sbatch_two_ray_nodes_signal_requeue_teardown(slurm_sandbox, sig):
    """dapo_32b.sbatch --exec -> launch.sh -> srun (2 tasks) -> dapo_megatron.launch: head and
    worker Ray nodes on loopback;
    the command sees both nodes; SIGUSR1 (sbatch --signal=B:USR1) or SIGTERM to the batch shell
    reaches it through node 0's launcher (not through srun); the job requeues; Ray is gone on
    both nodes. (SIGTERM caught a real bug: ray.init/shutdown had reset the launcher's handler.)"""
    env, tmp_path, started = slurm_sandbox
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    report = tmp_path / "report.json"
    with open(tmp_path / "batch.log", "w") as log:
        sbatch = os.path.join(ROOT, "slurm", "dapo_32b.sbatch")
        proc = subprocess.Popen(["bash", sbatch, "--exec", sys.executable, str(probe), str(report)],
                                cwd=str(tmp_path), env=dict(env, SLURM_SUBMIT_DIR=ROOT),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    started.append(proc)
    _wait_for_file(report, proc, 150, tmp_path)
    seen = json.loads(report.read_text())
    assert seen == {"nodes": 2, "cpus": 4.0, "address": f"127.0.0.1:{env['DAPO_RAY_PORT']}"}
    assert int((tmp_path / "launch.pid").read_text()) > 0  # node 0's launcher, for the batch shell
    proc.send_signal(sig)  # SIGUSR1: what sbatch --signal=B:USR1@300 does
    rc = proc.wait(timeout=90)
    assert rc == 0, _logs(tmp_path)
    assert (tmp_path / "report.json.signal").read_text() == sig.name
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert "Ray cluster ready" in (tmp_path / "task0.log").read_text()
    assert "head at 127.0.0.1" in (tmp_path / "task1.log").read_text()  # the worker saw it go
    assert not (tmp_path / "launch.pid").exists()
    assert _processes_mentioning(env["DAPO_RAY_TEMP_DIR"]) == [], "Ray processes outlived the job"


def _controller_ready() -> bool:
    """The trainer's controller exists (the lead wires it; until then the test is skipped)."""
    try:
        import dapo_megatron.controller.loop  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _controller_ready(), reason="dapo_megatron.controller.loop is not written yet")
def test_train_tiny_config_across_two_ray_nodes(slurm_sandbox):
    """The sbatch path with the real trainer: launch.sh CONFIG -> 2 Ray nodes -> dapo-megatron
    train on the tiny CPU config for 2 steps; parallel.nodes=2 comes from the allocation."""
    env, tmp_path, started = slurm_sandbox
    run_dir = tmp_path / "run"
    cmd = ["bash", LAUNCH_SH, "examples/tiny_cpu.yaml", "trainer.max_steps=2",
           "eval.every=0", "parallel.gpus_per_node=1", f"trainer.run_dir={run_dir}"]
    with open(tmp_path / "batch.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    started.append(proc)
    rc = proc.wait(timeout=540)
    head = (tmp_path / "task0.log").read_text()
    assert rc == 0, _logs(tmp_path)
    assert "Ray cluster ready" in head and "2 nodes" in head
    assert not (tmp_path / "scontrol.log").exists()  # finished normally: no requeue
    assert run_dir.exists() and any(run_dir.iterdir()), f"the trainer wrote nothing to {run_dir}"
    assert _processes_mentioning(env["DAPO_RAY_TEMP_DIR"]) == [], "Ray processes outlived the job"
