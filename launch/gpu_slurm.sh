#!/usr/bin/env bash
# Train on GPU nodes with SLURM: one JAX process per node, each driving all GPUs of its node.
#
#   sbatch --nodes=2 launch/gpu_slurm.sh configs/cifar10.py runs/cifar10 [--config.x=y ...]
#   bash launch/gpu_slurm.sh configs/cifar10.py runs/cifar10      # one machine, no SLURM
#
# Under srun with several tasks, `python -m ddpm_jax.train` sees SLURM_NTASKS > 1 and calls
# jax.distributed.initialize(), which reads the coordinator and process ids from SLURM. The
# workdir must be on a file system shared by all nodes. Requeued or rerun jobs resume from the
# latest checkpoint in it; SLURM's SIGTERM before a time limit makes the run save and exit.
#
# Requeueing: SLURM requeues a preempted job itself (--requeue). When the training command fails
# under sbatch, this script requeues the job (`scontrol requeue`), at most DDPM_JAX_MAX_REQUEUES
# times (default 3; SLURM_RESTART_COUNT counts every requeue of the job), except on exit status 3:
# a non-finite loss, which a rerun would repeat from the same checkpoint, so the job ends there
# (lower config.optim.lr, say, and submit again; the last good checkpoint is intact). Status 0
# (done, or stopped at the time limit with a checkpoint saved) ends the job too. Caveat: with
# several nodes, srun reports the highest status of its tasks, 128 + n for a task it killed (n
# the signal), so a diverged run whose tasks srun killed before they exited with 3 is requeued
# (up to the limit) like any other failure.
#SBATCH --job-name=ddpm_jax
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --signal=TERM@120
#SBATCH --requeue
set -euo pipefail

CONFIG="${1:-configs/cifar10.py}"
WORKDIR="${2:-runs/$(basename "${CONFIG}" .py)}"
shift $(( $# < 2 ? $# : 2 ))

# Let XLA use most of the GPU memory, and keep TensorFlow (tf.data only) off the GPUs.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
export TF_CPP_MIN_LOG_LEVEL=2

# `python -m ddpm_jax.train`'s exit status for a non-finite loss (training.NonFiniteLossError).
readonly DO_NOT_REQUEUE=3

# Whether the job should be requeued after the training command exited with status $1.
should_requeue() {
  local status="$1"
  (( status != 0 && status != DO_NOT_REQUEUE \
     && ${SLURM_RESTART_COUNT:-0} < ${DDPM_JAX_MAX_REQUEUES:-3} ))
}

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  exec python -m ddpm_jax.train --config="${CONFIG}" --workdir="${WORKDIR}" "$@"
fi
# SLURM signals this shell too (scancel, preemption, time limit), not only srun: a trapped signal
# waits for srun, so the job lasts until the training has saved its checkpoint and exited.
trap 'echo "gpu_slurm.sh: SIGTERM: waiting for the training to save and exit." >&2' TERM
status=0
srun --kill-on-bad-exit=1 \
  python -m ddpm_jax.train --config="${CONFIG}" --workdir="${WORKDIR}" "$@" || status=$?
if (( status == DO_NOT_REQUEUE )); then
  echo "gpu_slurm.sh: non-finite loss (exit status ${status}):" \
    "not requeueing job ${SLURM_JOB_ID}." >&2
elif should_requeue "${status}"; then
  echo "gpu_slurm.sh: training exited with status ${status}: requeueing job ${SLURM_JOB_ID}" \
    "(restart $(( ${SLURM_RESTART_COUNT:-0} + 1 )) of at most ${DDPM_JAX_MAX_REQUEUES:-3})." >&2
  scontrol requeue "${SLURM_JOB_ID}"
fi
exit "${status}"
