#!/usr/bin/env bash
# Issue 13's GPU checks, in one device call that ends inside its 10-minute limit.
#
# Here (the CPU machine), once per checkout, fetch the wheels the GPU machine lacks (kornia, for the
# augmentation comparison; the GPU image has torch, numpy, pandas, scikit-learn, pyyaml, pytest):
#     scripts/gpu_check.sh --fetch-wheels
# Dry run of every step at toy sizes on this CPU (minutes; checks the plumbing, not the numbers):
#     GPU_CHECK_DRY=1 OUT=/tmp/gpu-dry scripts/gpu_check.sh
# On the GPU machine (device tool: carry [".whl"], timeout_s 600):
#     scripts/gpu_check.sh            # writes $OUT/gpu_check.log and the benchmarks' JSON files
#
# Steps run in order of importance; each has its own time limit, and a step is skipped once the
# total budget ($BUDGET_S, default 540 s) would be exceeded, so the call always returns its files.
# docs/performance.md says what each number is compared with.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--fetch-wheels" ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl kornia==0.9.0 kornia-rs==0.2.0
  ls -l .whl
  exit
fi

OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-540}
export PYTHONUNBUFFERED=1
log="$OUT/gpu_check.log"
: > "$log"
t_start=$(date +%s)

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi

# step NAME LIMIT_S COMMAND...: run with a time limit, log its output, say rc and seconds.
step() {
  local name=$1 limit=$2; shift 2
  local used=$(( $(date +%s) - t_start ))
  if (( used + limit > BUDGET_S )); then
    echo "== $name: SKIPPED (used ${used}s, needs up to ${limit}s of the ${BUDGET_S}s budget)" | tee -a "$log"
    return
  fi
  echo "== $name (limit ${limit}s): $*" | tee -a "$log"
  local t0=$(date +%s)
  timeout -k 5 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  echo "== $name: rc $rc in $(( $(date +%s) - t0 ))s" | tee -a "$log"
}

if [ -n "${GPU_CHECK_DRY:-}" ]; then
  SMALL=(--steps 2 --rounds 1 --warmup 1 --images 512 --workers 1)
  PRESET=(--preset cpu --device cpu); CIFAR=(--device cpu --image-size 32 --batch-size 64)
  SMOKE=(--device cpu --images 512 --epochs 1); COMPILE_METHODS=simclr; AUG=(--device cpu --sizes 32 --batch-size 64 --steps 1 --rounds 1)
else
  SMALL=(--steps 40 --rounds 5 --warmup 3 --images 8192 --workers 14)
  PRESET=(--preset gpu); CIFAR=(--preset gpu --image-size 32 --batch-size 512)
  SMOKE=(--device cuda); COMPILE_METHODS=simclr,moco; AUG=(--device cuda --sizes 32,96 --batch-size 256 --steps 5 --rounds 5 --workers 14)
fi

step environment 60 bash -c "nvidia-smi || true; $PY -c 'import torch, torchvision; print(torch.__version__, torchvision.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())'"
# The CUDA-only test (skipped on the CPU CI) and the GPU claiming beside it.
step cuda-tests 120 $PY -m pytest -q -p no:cacheprovider tests/test_augment.py tests/test_gpus.py
# The training stage's library path: amp auto (bf16), channels_last, on-device data, GPU features.
step smoke-pretrain 120 $PY scripts/gpu_smoke.py "${SMOKE[@]}" --out "$OUT/smoke.json"
# Paper preset (ResNet-18, 96x96, batch 256, bf16): 4 methods, λ 0/1, the PIL-fed step, the ceiling.
step bench-preset 240 $PY bench/bench_pretrain.py "${PRESET[@]}" "${SMALL[@]}" --out "$OUT/pretrain-cuda.json"
# CIFAR size, SimCLR, against the public ~4 200 img/s anchor (A100, fp32, CPU augmentation).
step bench-cifar-fp32 90 $PY bench/bench_pretrain.py "${CIFAR[@]}" --amp off --methods simclr "${SMALL[@]}" --out "$OUT/pretrain-cuda-cifar-fp32.json"
step bench-cifar-bf16 60 $PY bench/bench_pretrain.py "${CIFAR[@]}" --amp bf16 --methods simclr --no-pil "${SMALL[@]}" --out "$OUT/pretrain-cuda-cifar-bf16.json"
# Our batched augmentation against kornia's on the same device.
$PY -c 'import kornia' 2>/dev/null || AUG+=(--no-kornia)
step bench-augment 60 $PY bench/bench_augment.py "${AUG[@]}" --no-pil --out "$OUT/augment-cuda.json"
# torch.compile (MoCo's in-place queue update under compile); the first steps compile.
step bench-compile 180 $PY bench/bench_pretrain.py "${PRESET[@]}" --compile --methods "$COMPILE_METHODS" --no-pil \
  "${SMALL[@]}" --out "$OUT/pretrain-cuda-compile.json"
echo "== total $(( $(date +%s) - t_start ))s" | tee -a "$log"
