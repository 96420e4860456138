#!/usr/bin/env bash
# GPU verification in one call, for the lent GPU machine (system python3 with its own CUDA torch,
# no network) or any CUDA machine with torch, pytest and hypothesis installed:
#   1. build the extension from source with the CUDA kernels (GLM_EXT_CUDA=1),
#   2. run every CUDA test,
#   3. run compute-sanitizer memcheck and racecheck on a small CUDA test subset,
#   4. run every benchmark on the GPU,
# writing logs and JSON results to $OUT (default: benchmarks/results/gpu-<date>). Commit the JSON
# under benchmarks/results/. The summary printed last is what the device tool's reply shows.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%d)}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" GLM_EXT_CUDA=1
declare -A status

step() {  # step NAME LOGFILE COMMAND...: runs a step, keeps going on failure, records its status
  local name=$1 log=$2
  shift 2
  echo "=== $name: $*"
  local start=$SECONDS
  "$@" >"$OUT/$log" 2>&1
  local rc=$?
  status[$name]="rc=$rc $((SECONDS - start))s"
  tail -n 25 "$OUT/$log"
  return $rc
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

if ! step build build.log "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e .; then
  echo "build failed; see $OUT/build.log"
  exit 1
fi
"$PY" -m glm_ext info

step cuda_tests cuda_tests.log "$PY" -m pytest python_tests -m cuda -q -p no:cacheprovider \
  --junitxml="$OUT/cuda_tests.xml"

# The sanitizers slow every launch by orders of magnitude: a small, representative subset.
SANITIZE_TESTS=(python_tests -m cuda -q -p no:cacheprovider -k "out_of_range or strided or (float64_reference and (bfloat16 or float16))")
for tool in memcheck racecheck; do
  step "sanitizer_$tool" "sanitizer_$tool.log" compute-sanitizer --tool "$tool" --error-exitcode 99 \
    --target-processes all "$PY" -m pytest "${SANITIZE_TESTS[@]}"
done

for bench in benchmarks/bench_*.py; do
  name=$(basename "$bench" .py)
  step "$name" "$name.log" "$PY" "$bench" --device cuda --out "$OUT/${name#bench_}_cuda.json"
done

echo
echo "=== summary ($OUT)"
for name in "${!status[@]}"; do printf '%-24s %s\n' "$name" "${status[$name]}"; done | sort
