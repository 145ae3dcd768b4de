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

if [[ -n "${SLURM_JOB_ID:-}" ]]; then
  exec srun --kill-on-bad-exit=1 python -m ddpm_jax.train --config="${CONFIG}" --workdir="${WORKDIR}" "$@"
else
  exec python -m ddpm_jax.train --config="${CONFIG}" --workdir="${WORKDIR}" "$@"
fi
