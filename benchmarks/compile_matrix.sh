#!/usr/bin/env bash
# The compile report of every paper config on TPU v5e and v4 (8 chips each), for RESULTS.md.
#
#   benchmarks/compile_matrix.sh REMAT [OUT]
#
# REMAT is the value given to --config.model.remat for the third setting of each config ("none"
# leaves that setting out); OUT (default runs/compile_matrix) receives one <name>.json and
# <name>.log per compile, matrix.log, and rows.md (the RESULTS.md table rows of every JSON).
# PYTHON (default /work/tpuvenv/bin/python, else python) must have libtpu:
# pip install "jax[tpu]==<jax version>" in a separate venv.
#
# Settings, each on v5e:2x4 and on v4:2x2x2 (8 megacore chips), one compile at a time:
#   <config>_<topology>_f32         float32 at the paper batch: train, sample (and for cifar10 the
#                                   FID Inception, which is the same network for every config)
#   <config>_<topology>_bf16        model.dtype=bfloat16 at the paper batch: train, sample
#   <config>_<topology>_bf16_remat  bfloat16 with model.remat=REMAT at twice the paper batch: train
# for cifar10 and celebahq256. celebahq256 stands for lsun_church256 and lsun_bedroom256 too:
# the three share _paper256.py's model, batch and optimizer and differ only in the dataset, the
# run length and flips, none of which is in a compiled program.
# A paper config's train step takes 5-9 minutes and up to 9 GB of memory to compile on a 2-core
# host (the FID Inception took 32 minutes on a loaded one); the whole matrix takes hours. It runs in the background (nohup) and skips the settings
# whose JSON is already in OUT, so a rerun resumes.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 REMAT_POLICY|none [OUT]" >&2
  exit 2
fi
remat=$1
out=${2:-runs/compile_matrix}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)

if [[ -z "${COMPILE_MATRIX_CHILD:-}" ]]; then  # start the sequence in the background, return
  COMPILE_MATRIX_CHILD=1 nohup "$0" "$@" > "$out/matrix.log" 2>&1 &
  echo "Started the compile matrix (PID $!); progress in $out/matrix.log, rows in $out/rows.md."
  exit 0
fi

if [[ -z "${PYTHON:-}" ]]; then
  PYTHON=python
  [[ -x /work/tpuvenv/bin/python ]] && PYTHON=/work/tpuvenv/bin/python
fi
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

declare -A paper_batch=([cifar10]=128 [celebahq256]=64)

compile() {  # name, then compile_report.py's arguments
  local name=$1
  shift
  if [[ -s "$out/$name.json" ]]; then
    echo "$(date +%T) $name: done before, skipped"
    return
  fi
  echo "$(date +%T) $name: $*"
  if "$PYTHON" benchmarks/compile_report.py "$@" --json="$out/$name.json" > "$out/$name.log" 2>&1; then
    echo "$(date +%T) $name: ok"
  else
    echo "$(date +%T) $name: FAILED (see $out/$name.log)"
  fi
}

for topology in v5e:2x4 v4:2x2x2; do
  tag=${topology/:/_}
  for config in cifar10 celebahq256; do
    batch=${paper_batch[$config]}
    common=(--config="$config" --topology="$topology")
    programs=train,sample
    [[ $config == cifar10 ]] && programs+=,inception
    compile "${config}_${tag}_f32" "${common[@]}" --programs=$programs
    compile "${config}_${tag}_bf16" "${common[@]}" --config.model.dtype=bfloat16 \
      --programs=train,sample
    if [[ "$remat" != none ]]; then
      compile "${config}_${tag}_bf16_remat" "${common[@]}" --config.model.dtype=bfloat16 \
        --config.model.remat="$remat" --config.data.batch_size=$((2 * batch)) --programs=train
    fi
  done
done

"$PYTHON" benchmarks/compile_report.py --markdown="$out" > "$out/rows.md"
echo "$(date +%T) all done; RESULTS.md rows in $out/rows.md"
