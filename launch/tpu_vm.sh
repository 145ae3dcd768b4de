#!/usr/bin/env bash
# Train on a Cloud TPU VM (single host, e.g. v3-8/v4-8) or a multi-host pod slice.
#
#   TPU_NAME=my-tpu ZONE=us-central2-b CONFIG=configs/cifar10.py WORKDIR=gs://bucket/runs/cifar10 \
#     bash launch/tpu_vm.sh
#
# Runs the same command on every host (--worker=all); each host is one JAX process, and
# --distributed makes `python -m ddpm_jax.train` call jax.distributed.initialize(), which finds
# the other hosts through the TPU metadata (harmless on a single host). On a pod slice WORKDIR
# must be shared by all hosts (a gs:// bucket). Rerunning the command after a preemption resumes
# from the latest checkpoint in WORKDIR.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
CONFIG="${CONFIG:-configs/cifar10.py}"
WORKDIR="${WORKDIR:-runs/$(basename "${CONFIG}" .py)}"
REPO_DIR="${REPO_DIR:-~/ddpm_jax}"  # where the repository is checked out on the TPU hosts

gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" --worker=all --command="
  set -e
  cd ${REPO_DIR}
  pip install -q -e '.[tpu]'
  python -m ddpm_jax.train --distributed --config=${CONFIG} --workdir=${WORKDIR} $*
"
