#!/usr/bin/env bash
# The GPU check: the `gpu`-marked tests and every benchmark of docs/BENCHMARKS.md at the full-size
# preset (configs/model/unix.yaml, random weights), each under a hard timeout, all in under 8 minutes.
# Made for a GPU machine without a package registry: it uses that machine's own python and CUDA
# torch, changes nothing installed there, and runs `unix` from this tree (PYTHONPATH). Packages the
# machine lacks come from a folder of wheels built elsewhere by scripts/gpu_wheels.sh.
#
#   bash scripts/gpu_check.sh                          # on the GPU machine
#   WHEELS=gpu_wheels OUT=results bash scripts/gpu_check.sh
#   bash scripts/gpu_check.sh --dry-run                # any machine, CPU: tiny preset, proves the script
#
# Environment: PYTHON (default python3), WHEELS (wheel folder), OUT (results; default $OUT, else
# gpu_results/), SITE (where missing packages are installed, default .gpu_site/, git-ignored),
# BUDGET (seconds for everything, default 470).
# Results: OUT/gpu_check.json (per step: command, status, seconds, parsed tables and results),
# OUT/gpu_check.log (everything printed), OUT/gpu_tests.xml (JUnit). Exit 0 only if every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY=${PYTHON:-python3}
OUT=${OUT:-gpu_results}
SITE=${SITE:-$ROOT/.gpu_site}
BUDGET=${BUDGET:-470}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
STEPS=$(mktemp -d)
trap 'rm -rf "$STEPS"' EXIT
LOG=$OUT/gpu_check.log
: >"$LOG"
START=$(date +%s)
say() { echo "[gpu_check $(($(date +%s) - START))s] $*" | tee -a "$LOG"; }

# --- python packages: the machine's own, plus wheels for what it lacks -----------------------------
# module:distribution of what `unix` imports at run time beyond torch, transformers, accelerate and
# safetensors (the usual CUDA image), and pytest. requests & co. are diffusers' import-time needs.
NEEDED="omegaconf:omegaconf diffusers:diffusers PIL:pillow pyarrow:pyarrow tqdm:tqdm numpy:numpy
tokenizers:tokenizers requests:requests urllib3:urllib3 certifi:certifi charset_normalizer:charset-normalizer
idna:idna pytest:pytest iniconfig:iniconfig pluggy:pluggy"
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
missing() {
  local m
  for m in $NEEDED; do "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('${m%%:*}') is None)" 2>/dev/null || echo "${m#*:}"; done
}
"$PY" -c "import torch" 2>/dev/null || { say "FATAL: $PY has no torch; set PYTHON to the machine's CUDA python"; exit 2; }
lacking=$(missing | tr '\n' ' ')
if [ -n "${lacking// }" ]; then
  say "missing here: $lacking"
  if [ -n "${WHEELS:-}" ] && [ -d "$WHEELS" ]; then
    mkdir -p "$SITE"
    for dist in $lacking; do
      # no registry: only the folder, no dependencies resolved (the list above names them)
      "$PY" -m pip install -q --no-index --no-deps --no-compile --find-links "$WHEELS" --target "$SITE" "$dist" >>"$LOG" 2>&1 \
        || { whl=$(ls "$WHEELS"/"$(echo "$dist" | tr - _)"-*.whl "$WHEELS"/"$dist"-*.whl 2>/dev/null | head -1)
             [ -n "$whl" ] && "$PY" -m zipfile -e "$whl" "$SITE" >>"$LOG" 2>&1 && say "unpacked $whl (no pip)"; } \
        || say "no wheel for $dist in $WHEELS"
    done
    lacking=$(missing | tr '\n' ' ')
  fi
fi
if [ -n "${lacking// }" ]; then
  say "FATAL: still missing: $lacking. Build a wheel folder where pip reaches a registry"
  say "  (PY_VERSION=<this machine's python> bash scripts/gpu_wheels.sh), copy it here, and rerun with WHEELS=that/folder"
  exit 2
fi
if ! "$PY" -c "import unix.cli, unix.models.unix, unix.models.vae, unix.train.trainer, unix.infer.pipeline" >>"$LOG" 2>&1; then
  say "FATAL: unix does not import with $PY (see $LOG)"; exit 2
fi
"$PY" - >"$STEPS/machine.json" <<'EOF'
import importlib.util, json, platform, torch
cuda = torch.cuda.is_available()
print(json.dumps({"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                  "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
                  "flash_attn": importlib.util.find_spec("flash_attn") is not None,
                  "triton": importlib.util.find_spec("triton") is not None}))
EOF
say "machine: $(cat "$STEPS/machine.json")"
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$DRY" = 0 ] && [ "$NGPU" = 0 ]; then say "FATAL: no CUDA device visible to torch (use --dry-run to check the script on CPU)"; exit 2; fi

# --- the steps ------------------------------------------------------------------------------------
# step NAME TIMEOUT CMD...: runs under `timeout`, cut to what is left of BUDGET; skipped when too little is.
step() {
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - ($(date +%s) - START) - 5))
  [ "$limit" -gt "$left" ] && limit=$left
  echo "$*" >"$STEPS/$name.cmd"
  echo "$name" >>"$STEPS/steps.txt"
  if [ "$limit" -lt 15 ]; then
    say "$name: skipped, ${left}s of the budget left"; echo skipped >"$STEPS/$name.rc"; return
  fi
  say "$name (timeout ${limit}s): $*"
  local t0; t0=$(date +%s%N)
  timeout -k 10 "$limit" "$@" >"$STEPS/$name.log" 2>&1
  echo $? >"$STEPS/$name.rc"
  local ms=$((($(date +%s%N) - t0) / 1000000))
  printf '%d.%03d\n' $((ms / 1000)) $((ms % 1000)) >"$STEPS/$name.seconds"
  cat "$STEPS/$name.log" >>"$LOG"
  say "$name: exit $(cat "$STEPS/$name.rc") after $(cat "$STEPS/$name.seconds")s"
}

TRAIN=("$PY" scripts/bench_train.py)
if [ "$NGPU" -gt 1 ]; then TRAIN=("$PY" -m torch.distributed.run --standalone --nproc_per_node="$NGPU" scripts/bench_train.py); fi
if [ "$DRY" = 1 ]; then
  # CPU: the tiny preset and small sizes; the gpu tests run their own logic on CPU where it can.
  export UNIX_GPU_TEST_DEVICE=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  step gpu_tests 300 "$PY" -m pytest -m gpu tests/test_gpu.py -q -rs -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml"
  step model 60 "$PY" scripts/bench_model.py --preset tiny --backends sdpa --iters 3
  step infer_256 90 "$PY" scripts/bench_infer.py --preset tiny --size 256 --steps 5 --batch 1 2 --report-batch 1 2 --report-tokens 8 --skip-naive
  step train_gen 90 "$PY" scripts/bench_train.py --preset tiny --stage gen --steps 3 --warmup 1 --images 20 --token-budget 1024 --json "$STEPS/train_gen.json"
  step train_und_fsdp2 120 "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 scripts/bench_train.py --preset tiny --stage und \
    --steps 3 --warmup 1 --images 20 --token-budget 1024 --json "$STEPS/train_und_fsdp2.json"
else
  # The order puts the goals first; the timeouts add up to the budget (a slow step cuts the last ones).
  step gpu_tests 150 "$PY" -m pytest -m gpu tests/test_gpu.py -q -rs -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml"
  step infer_256 75 "$PY" scripts/bench_infer.py --preset unix --device cuda --dtype bf16 --size 256 --batch 1 16 --report-batch 1 32 --skip-naive
  step train_gen 75 "${TRAIN[@]}" --preset unix --stage gen --device cuda --steps 20 --warmup 5 --images 200 \
    --token-budget 16384 --json "$STEPS/train_gen.json" --extra activation_checkpointing=true
  step infer_512 60 "$PY" scripts/bench_infer.py --preset unix --device cuda --dtype bf16 --size 512 --batch 1 16 --report-batch 1 --skip-naive
  step model 45 "$PY" scripts/bench_model.py --preset unix --device cuda --dtype bf16 --backends sdpa flex flash
  step train_und 65 "${TRAIN[@]}" --preset unix --stage und --device cuda --steps 20 --warmup 5 --images 200 \
    --token-budget 16384 --json "$STEPS/train_und.json" --extra activation_checkpointing=true
fi

"$PY" scripts/gpu_summary.py "$STEPS" "$OUT/gpu_check.json" | tee -a "$LOG"
