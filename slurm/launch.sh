#!/usr/bin/env bash
# Shared launcher for the sbatch scripts in this directory (run as the batch step).
#
#   slurm/launch.sh CONFIG [KEY=VALUE ...]     train: dapo-megatron train CONFIG KEY=VALUE ...
#   slurm/launch.sh --exec COMMAND [ARGS ...]  run any command on the job's Ray cluster
#                                              (e.g. --exec python -m dapo_megatron.cli eval ...)
#
# What it does:
#  1. srun starts one task per node: `python -m dapo_megatron.launch` (dapo_megatron/launch.py).
#     Node 0 starts the Ray head, the other nodes join it; node 0 waits until every node, CPU
#     and GPU of the allocation has registered (DAPO_CLUSTER_TIMEOUT_S, default 600 s, then a
#     clear error), then runs the command with RAY_ADDRESS set. Training gets
#     parallel.nodes / parallel.gpus_per_node from the allocation (your overrides come later
#     and win).
#  2. SIGUSR1 or SIGTERM to this script (sbatch --signal=B:USR1@300 sends SIGUSR1 300 s before
#     the time limit) goes to node 0's launcher (this script runs on node 0; the launcher's pid
#     is in DAPO_LAUNCH_PIDFILE), which passes it on to the trainer; the trainer writes a
#     checkpoint and exits. Not through srun: slurmstepd would signal every process of the
#     step, Ray's daemons and actors included, and SIGUSR1 kills them. This script then runs
#     `scontrol requeue $SLURM_JOB_ID`: the job goes back to the queue and resumes from that
#     checkpoint (checkpoint.resume: true). DAPO_NO_REQUEUE=1 turns the requeue off.
#  3. Ray is torn down on every node when the command ends, whatever its exit code.
#
# Environment, all optional:
#   DAPO_PYTHON          Python with dapo_megatron installed (default: python3 on the nodes)
#   DAPO_SRUN_ARGS       extra srun options, e.g. a container through pyxis/enroot:
#                          DAPO_SRUN_ARGS="--container-image=/shared/dapo.sqsh
#                                          --container-mounts=/shared:/shared --container-workdir=$PWD"
#   DAPO_CONTAINER_EXEC  a command prefix run on every node, e.g. apptainer/singularity:
#                          DAPO_CONTAINER_EXEC="apptainer exec --nv --bind /shared /shared/dapo.sif"
#   DAPO_RAY_PORT (6379), DAPO_RAY_HEAD_IP (default: node 0's name resolved; set it to pick the
#   fast NIC), DAPO_RAY_NODE_IP, DAPO_RAY_TEMP_DIR, DAPO_RAY_OBJECT_STORE_BYTES,
#   DAPO_RAY_START_ARGS, DAPO_CLUSTER_TIMEOUT_S, DAPO_TERM_GRACE_S: see dapo_megatron/launch.py.
#   RAY_AUTH_MODE        unset: Ray token authentication with a fresh per-job RAY_AUTH_TOKEN.
# NCCL / InfiniBand settings are site-specific: export them in the sbatch script (see the
# comments there); srun passes the environment on to every node.
set -euo pipefail

usage() {
    echo "usage: $0 CONFIG [KEY=VALUE ...] | $0 --exec COMMAND [ARGS ...]" >&2
    exit 2
}

[[ $# -ge 1 ]] || usage
PY="${DAPO_PYTHON:-python3}"

if [[ "$1" == "--exec" ]]; then
    shift
    [[ $# -ge 1 ]] || usage
    COMMAND=("$@")
else
    CONFIG="$1"
    shift
    [[ -f "$CONFIG" ]] || { echo "launch.sh: config file not found: $CONFIG (submit from the repository root)" >&2; exit 2; }
    COMMAND=("$PY" -m dapo_megatron.cli train "$CONFIG" "parallel.nodes=${SLURM_NNODES:-1}")
    GPUS="${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}"
    GPUS="${GPUS##*:}"  # --gpus-per-node=h100:8 gives "h100:8"
    if [[ "$GPUS" =~ ^[0-9]+$ && "$GPUS" -gt 0 ]]; then
        COMMAND+=("parallel.gpus_per_node=$GPUS")
    fi
    COMMAND+=("$@")
fi

: "${SLURM_JOB_ID:?launch.sh runs inside a Slurm job: submit an sbatch script (see slurm/*.sbatch)}"
: "${SLURM_NNODES:?SLURM_NNODES is not set: submit an sbatch script (see slurm/*.sbatch)}"

# Ray token authentication with a fresh token per job: srun hands it to every node, and the
# trainer's ray.init() inherits it. Set RAY_AUTH_MODE yourself to manage tokens another way.
if [[ -z "${RAY_AUTH_MODE:-}" ]]; then
    RAY_AUTH_TOKEN="$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')"
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN
fi

# Slurm >= 22.05 no longer hands --cpus-per-task from sbatch to srun.
if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
    export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"
fi

read -r -a SRUN_EXTRA <<< "${DAPO_SRUN_ARGS:-}"
read -r -a CONTAINER <<< "${DAPO_CONTAINER_EXEC:-}"

# Node 0's launcher writes its pid here. In a container, keep the host's PID namespace (the
# default of pyxis/enroot and apptainer) and a path both sides see.
export DAPO_LAUNCH_PIDFILE="${DAPO_LAUNCH_PIDFILE:-${TMPDIR:-/tmp}/dapo-launch-${SLURM_JOB_ID}.pid}"
rm -f "$DAPO_LAUNCH_PIDFILE"
SRUN_PID=""
SIGNALLED=""
# shellcheck disable=SC2317  # invoked from the traps below
forward() {
    SIGNALLED="$1"
    if [[ -s "$DAPO_LAUNCH_PIDFILE" ]]; then
        echo "launch.sh: SIG$1 received; passing it to the trainer so the run checkpoints" >&2
        kill -s "$1" "$(cat "$DAPO_LAUNCH_PIDFILE")" 2>/dev/null || true
    elif [[ -n "$SRUN_PID" ]]; then
        # The launcher has not started yet: nothing to checkpoint, stop the step.
        echo "launch.sh: SIG$1 received before the cluster was up; stopping" >&2
        kill -s TERM "$SRUN_PID" 2>/dev/null || true
    fi
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

echo "launch.sh: job $SLURM_JOB_ID on $SLURM_NNODES node(s): ${COMMAND[*]}" >&2
srun --nodes="$SLURM_NNODES" --ntasks="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    ${SRUN_EXTRA[@]+"${SRUN_EXTRA[@]}"} \
    ${CONTAINER[@]+"${CONTAINER[@]}"} "$PY" -m dapo_megatron.launch -- "${COMMAND[@]}" &
SRUN_PID=$!

# `wait` returns early when a trapped signal arrives; wait again until srun has really exited.
rc=0
while true; do
    if wait "$SRUN_PID"; then rc=0; else rc=$?; fi
    kill -0 "$SRUN_PID" 2>/dev/null || break
done

if [[ -n "$SIGNALLED" && "${DAPO_NO_REQUEUE:-0}" != "1" ]]; then
    echo "launch.sh: run stopped by SIG$SIGNALLED (exit $rc); requeueing job $SLURM_JOB_ID to resume" >&2
    scontrol requeue "$SLURM_JOB_ID"
fi
rm -f "$DAPO_LAUNCH_PIDFILE"
exit "$rc"
