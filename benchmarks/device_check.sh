#!/usr/bin/env bash
# The device check: what a session lent a GPU runs as it is, in under 8 minutes, from the repo root.
#
#   bash benchmarks/device_check.sh            # GPU sizes: CIFAR-10 model, batch 128
#   bash benchmarks/device_check.sh --tiny     # CPU-sized smoke run (what CI runs; no time limits
#                                              # but --budget, default 900 s there)
#   bash benchmarks/device_check.sh --skip=tests,compile_report   # leave steps out
#
# Steps, each under its own timeout and together within --budget seconds (default 450; --tiny 900):
#   1. environment: device, versions, which packages import (each later step that lacks one is
#      skipped with the reason printed and written as its row);
#   2. the GPU-relevant tests that need no TFDS (UNet, diffusion, samplers, guidance) on the GPU;
#   3. the compile report of the CIFAR-10 config (benchmarks/compile_report.py, if present);
#   4. training throughput of the CIFAR-10 config, float32 and bfloat16, batch 128, the config's
#      steps per dispatch (benchmarks/train_throughput.py);
#   5. FID feature extraction images/s (benchmarks/inception_throughput.py);
#   6. ddpm_jax's sampling images/s, and training and sampling against diffusers where torch (with
#      CUDA on a GPU) and diffusers import (benchmarks/diffusers_side_by_side.py; else ddpm_jax's
#      figures alone).
# Writes RESULTS.md rows (date, device, versions, command, figure) to <out>/device_check_rows.md
# and echoes them; every step's output goes to <out>/device_check.log; <out> is $OUT if set, else
# ./device_check_out. The exit status is 0 when every step that ran succeeded (skips included).
#
# Packages: the GPU image lacks ml_collections, diffusers and TensorFlow, and nothing can be
# downloaded there. Wheels in ./.whl (or $DEVICE_CHECK_WHEELS) are installed first into a
# temporary directory, e.g. prepared where pip works with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl ml_collections diffusers
# (both pure Python). Without TensorFlow, ddpm_jax.training (hence steps 4 and 6) does not import
# as long as it imports ddpm_jax.input_pipeline at module level.
set -uo pipefail
cd "$(dirname "$0")/.."

STEPS="tests compile_report train_throughput inception side_by_side"
TINY=0
BUDGET=""
SKIP=""
for arg in "$@"; do
  case "$arg" in
    --tiny) TINY=1 ;;
    --budget=*) BUDGET="${arg#--budget=}" ;;
    --skip=*) SKIP="${arg#--skip=}" ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "device_check.sh: unknown argument $arg (use --tiny, --budget=SECONDS," \
         "--skip=STEP,... of: $STEPS)" >&2; exit 2 ;;
  esac
done
for name in ${SKIP//,/ }; do
  case " $STEPS " in
    *" $name "*) ;;
    *) echo "device_check.sh: --skip=$SKIP: no step $name (steps: $STEPS)" >&2; exit 2 ;;
  esac
done
# Full-size steps have their own limits within 450 s; tiny ones only the budget (a shared CI host
# may be slow, and their sizes cannot run long).
if [ $TINY = 1 ]; then BUDGET="${BUDGET:-900}"; else BUDGET="${BUDGET:-450}"; fi
wanted() { case ",$SKIP," in *",$1,"*) return 1 ;; *) return 0 ;; esac; }

PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-./device_check_out}"
mkdir -p "$OUT_DIR"
ROWS="$OUT_DIR/device_check_rows.md"
LOG="$OUT_DIR/device_check.log"
: >"$LOG"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SCRATCH="$(mktemp -d /tmp/device_check.XXXXXX)"
trap 'rm -rf "$SCRATCH"' EXIT
# One compilation cache for all steps: the side by side reuses the train steps compiled in step 4.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$SCRATCH/xla}"
START=$SECONDS
FAILED=0

say() { echo "$*" | tee -a "$LOG"; }

wheels="${DEVICE_CHECK_WHEELS:-.whl}"
if compgen -G "$wheels/*.whl" >/dev/null; then
  site="$SCRATCH/site"
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
      "$wheels"/*.whl >>"$LOG" 2>&1; then
    export PYTHONPATH="$PYTHONPATH:$site"
    say "installed the wheels of $wheels into $site"
  else
    say "could not install the wheels of $wheels (see $LOG)"
  fi
fi

# ------------------------------------------------------------------------------------------------
# 1. Environment.
# ------------------------------------------------------------------------------------------------
DEVICE=""
if command -v nvidia-smi >/dev/null 2>&1; then
  DEVICE="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
fi
ENV_REPORT="$("$PY" - <<'EOF' 2>>"$LOG"
import importlib, platform
from importlib import metadata

def version(p):
    try:
        return metadata.version(p)
    except metadata.PackageNotFoundError:
        return None

def imports(module):
    try:
        importlib.import_module(module)
        return "ok"
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"

mods = {m: imports(m) for m in ("jax", "flax", "optax", "orbax.checkpoint", "chex",
                                "ml_collections", "tensorflow", "tensorflow_datasets", "torch",
                                "diffusers", "ddpm_jax.generation", "ddpm_jax.training")}
backend, kind = "none", ""
if mods["jax"] == "ok":
    import jax
    backend, kind = jax.default_backend(), jax.devices()[0].device_kind
    if backend == "cpu":
        try:
            with open("/proc/cpuinfo") as f:
                kind = next(line.split(":", 1)[1].strip() for line in f
                            if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
cuda = "no"
if mods["torch"] == "ok":
    import torch
    cuda = "yes" if torch.cuda.is_available() else "no"
vers = ", ".join(f"{p} {version(p)}" for p in ("jax", "jaxlib", "flax", "optax", "torch",
                                                "diffusers") if version(p))
print(f"BACKEND={backend}")
print(f"KIND={kind}")
print(f"TORCH_CUDA={cuda}")
print(f"VERSIONS=python {platform.python_version()}, {vers}")
for m, status in mods.items():
    print(f"IMPORT {m}: {status}")
EOF
)"
echo "$ENV_REPORT" >>"$LOG"
field() { echo "$ENV_REPORT" | sed -n "s/^$1=//p"; }
import_status() { echo "$ENV_REPORT" | sed -n "s/^IMPORT $1: //p"; }
BACKEND="$(field BACKEND)"
TORCH_CUDA="$(field TORCH_CUDA)"
VERSIONS="$(field VERSIONS)"
[ -n "$DEVICE" ] || DEVICE="$(field KIND) ($BACKEND)"
[ "$BACKEND" = cpu ] && DEVICE="$DEVICE, $(nproc) cores, no accelerator"
say "device:   $DEVICE"
say "versions: $VERSIONS"
echo "$ENV_REPORT" | grep '^IMPORT' | tee -a "$LOG"

echo "| date | device | versions | command | figure |" >"$ROWS"
echo "|---|---|---|---|---|" >>"$ROWS"
row() {  # row COMMAND FIGURE
  local line="| $(date -u +%Y-%m-%d) | $DEVICE | $VERSIONS | \`$1\` | $2 |"
  echo "$line" >>"$ROWS"
}

# Runs one step: step NAME SECONDS COMMAND...; its output is in $STEP_OUT afterwards.
# Returns 0 on success, 1 on failure or timeout, 2 when too little of the budget is left.
STEP_OUT=""
step() {
  local name="$1" limit="$2"; shift 2
  local left=$((BUDGET - (SECONDS - START))) shown="$*"
  [ $TINY = 1 ] && limit=$left
  shown="${shown/"$PY"/python}"
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 15 ]; then
    say "--- $name: skipped, the ${BUDGET}s budget is spent"
    row "$shown" "skipped: the ${BUDGET}s budget was spent"
    STEP_OUT=""
    return 2
  fi
  say "--- $name (limit ${limit}s): $*"
  local t0=$SECONDS status
  STEP_OUT="$(timeout --kill-after=10 "$limit" "$@" 2>&1)"
  status=$?
  echo "$STEP_OUT" >>"$LOG"
  if [ $status -ne 0 ]; then
    FAILED=1
    local why="exit status $status"
    [ $status -eq 124 ] && why="timed out after ${limit}s"
    say "--- $name: FAILED ($why, $((SECONDS - t0))s); last lines:"
    echo "$STEP_OUT" | tail -n 5 | tee -a "$LOG"
    row "$shown" "FAILED: $why"
    return 1
  fi
  say "--- $name: done in $((SECONDS - t0))s"
  return 0
}
skip() {  # skip COMMAND REASON
  say "--- skipped: $1: $2"
  row "$1" "skipped: $2"
}
value() { echo "$STEP_OUT" | sed -n "s|^$1 *||p" | tail -n 1; }  # value 'images/s:'

if [ "$(import_status jax)" != ok ] || [ "$(import_status ddpm_jax.generation)" != ok ]; then
  skip "import ddpm_jax" "ddpm_jax does not import: $(import_status ddpm_jax.generation)"
  echo; cat "$ROWS"; exit 1
fi
if [ "$(import_status ddpm_jax.training)" = ok ]; then
  TRAINING=ok
else
  TRAINING="ddpm_jax.training does not import ($(import_status ddpm_jax.training))"
fi

# ------------------------------------------------------------------------------------------------
# 2. Tests (no TFDS needed) on this backend.
# ------------------------------------------------------------------------------------------------
if [ $TINY = 1 ]; then
  TESTS=(tests/test_diffusion.py -k "q_sample_moments or conversions_invert")
  PLATFORM="${JAX_PLATFORMS:-cpu}"
else
  TESTS=(tests/test_unet.py tests/test_diffusion.py tests/test_sampling.py tests/test_guidance.py)
  PLATFORM=cpu
  [ "$BACKEND" = gpu ] && PLATFORM=cuda
fi
if ! wanted tests; then
  say "--- tests: skipped (--skip)"
elif ! "$PY" -c "import pytest" 2>/dev/null; then
  skip "pytest ${TESTS[*]}" "pytest is not installed"
elif step tests 120 env JAX_PLATFORMS="$PLATFORM" "$PY" -m pytest -q -x -p no:cacheprovider \
    "${TESTS[@]}"; then
  row "JAX_PLATFORMS=$PLATFORM python -m pytest -q -x ${TESTS[*]}" \
    "$(echo "$STEP_OUT" | grep -E '[0-9]+ (passed|failed)' | tail -n 1)"
fi

# ------------------------------------------------------------------------------------------------
# 3. The compile report.
# ------------------------------------------------------------------------------------------------
CONFIG=cifar10
[ $TINY = 1 ] && CONFIG=tiny
REPORT_CMD=(benchmarks/compile_report.py "--config=$CONFIG" "--json=$OUT_DIR/compile_report.json")
if ! wanted compile_report; then
  say "--- compile_report: skipped (--skip)"
elif [ ! -f benchmarks/compile_report.py ]; then
  skip "python ${REPORT_CMD[*]}" "benchmarks/compile_report.py is not in this checkout"
elif [ "$TRAINING" != ok ]; then
  skip "python ${REPORT_CMD[*]}" "$TRAINING"
elif step compile_report 90 "$PY" "${REPORT_CMD[@]}"; then
  row "python ${REPORT_CMD[*]}" "done: $OUT_DIR/compile_report.json; $(echo "$STEP_OUT" \
    | grep -v '^ *$' | tail -n 1)"
fi

# ------------------------------------------------------------------------------------------------
# 4. Training throughput, float32 and bfloat16.
# ------------------------------------------------------------------------------------------------
if [ $TINY = 1 ]; then
  TRAIN_ARGS=(--config=configs/tiny.py --steps=2 --warmup=1)
else
  # cifar10 runs 500 steps per dispatch (its docstring): 2 timed dispatches are 1,000 steps.
  TRAIN_ARGS=(--config=configs/cifar10.py --config.data.batch_size=128 --steps=2 --warmup=1)
fi
for dtype in float32 bfloat16; do
  cmd=(benchmarks/train_throughput.py "${TRAIN_ARGS[@]}" "--config.model.dtype=$dtype")
  if ! wanted train_throughput; then
    say "--- train_throughput $dtype: skipped (--skip)"
  elif [ "$TRAINING" != ok ]; then
    skip "python ${cmd[*]}" "$TRAINING"
  elif step "train_throughput $dtype" 120 "$PY" "${cmd[@]}"; then
    row "python ${cmd[*]}" "$(value 'images/s:') images/s, $(value 'steps/s:') steps/s, compile \
$(value 'compile:') ($(value 'config:' | sed 's/^[^(]*(//; s/)$//'))"
  fi
done

# ------------------------------------------------------------------------------------------------
# 5. FID feature extraction.
# ------------------------------------------------------------------------------------------------
if [ $TINY = 1 ]; then
  INCEPTION_ARGS=(--image_size=8 --batch_size=2 --batches=1)
else
  INCEPTION_ARGS=(--image_size=32 --batch_size=500 --batches=5)
fi
cmd=(benchmarks/inception_throughput.py "${INCEPTION_ARGS[@]}")
if ! wanted inception; then
  say "--- inception: skipped (--skip)"
elif step inception 60 "$PY" "${cmd[@]}"; then
  row "python ${cmd[*]}" "$(value 'images/s:') images/s (compile + first batch $(value \
'compile+first:'))"
fi

# ------------------------------------------------------------------------------------------------
# 6. Sampling, and the side by side with diffusers.
# ------------------------------------------------------------------------------------------------
if [ $TINY = 1 ]; then
  SBS_ARGS=(--tiny --skip_compile --dtypes=float32)
else
  # One training call of ddpm_jax is one dispatch: 500 steps with cifar10's steps_per_dispatch.
  SBS_ARGS=(--config=cifar10 --batch=128 --calls=1 --repeats=3 --warmup=1 --sample_steps=10)
  # torch.compile of four programs takes minutes: only with enough of the budget left.
  [ $((BUDGET - (SECONDS - START))) -lt 240 ] && SBS_ARGS+=(--skip_compile)
fi
WHY_NO_TORCH=""
if [ "$(import_status torch)" != ok ] || [ "$(import_status diffusers)" != ok ]; then
  WHY_NO_TORCH="torch: $(import_status torch); diffusers: $(import_status diffusers)"
elif [ "$BACKEND" = gpu ] && [ "$TORCH_CUDA" != yes ]; then
  WHY_NO_TORCH="this torch has no CUDA"
elif [ "$BACKEND" != gpu ] && [ "$BACKEND" != cpu ]; then
  WHY_NO_TORCH="PyTorch cannot run on JAX's backend $BACKEND"
fi
if [ -n "$WHY_NO_TORCH" ]; then
  say "--- diffusers side skipped ($WHY_NO_TORCH): timing ddpm_jax alone"
  SBS_ARGS+=(--frameworks=ddpm_jax)
fi
cmd=(benchmarks/diffusers_side_by_side.py "${SBS_ARGS[@]}")
if ! wanted side_by_side; then
  say "--- side_by_side: skipped (--skip)"
elif [ "$TRAINING" != ok ]; then
  skip "python ${cmd[*]}" "$TRAINING"
elif step side_by_side 300 "$PY" "${cmd[@]}"; then
  context="$(value 'config:' | sed 's/^[^(]*(//; s/)[^)]*$//')"
  while IFS='|' read -r _ task framework mode dtype first rate range _; do
    task="$(echo $task)"
    [ "$task" = train ] || [ "$task" = sample ] || continue
    unit="images/s"
    [ "$task" = sample ] && unit="images x steps/s"
    rate="$(echo $rate)"
    if [ "${rate#skipped}" != "$rate" ]; then
      row "python ${cmd[*]}" "$task $(echo $framework $mode $dtype): $rate"
    else
      row "python ${cmd[*]}" "$task $(echo $framework $mode $dtype): $rate $unit \
(range $(echo $range), first call $(echo $first) s; $context)"
    fi
  done <<<"$(echo "$STEP_OUT" | grep -E '^\| (train|sample) \|')"
  while read -r line; do
    row "python ${cmd[*]}" "$line"
  done <<<"$(echo "$STEP_OUT" | grep '^ratio ')"
  [ -n "$WHY_NO_TORCH" ] && row "python ${cmd[*]}" "diffusers side skipped: $WHY_NO_TORCH"
fi

say ""
say "=== device check done in $((SECONDS - START))s; rows in $ROWS:"
cat "$ROWS" | tee -a "$LOG"
exit $FAILED
