#!/usr/bin/env bash
# GPU verification for the lent GPU machine (system python3 with its own CUDA torch, no network)
# or any CUDA machine with torch, pytest and hypothesis installed:
#
#   scripts/gpu_check.sh [build] [tests] [sanitize] [bench]     (no argument: all four, in order)
#
#   build     the extension from source with the CUDA kernels (GLM_EXT_CUDA=1), in place
#   tests     every CUDA test (pytest -m cuda)
#   sanitize  compute-sanitizer memcheck and racecheck on a small CUDA test subset
#   bench     every benchmarks/bench_*.py on the GPU, JSON results
#
# A device call is limited to 10 minutes: split the steps over calls if needed (the in-place build
# stays on a warm machine). Results go to $OUT (default benchmarks/results/gpu-<date>): one JSON per
# benchmark plus logs.tar.gz with every log and the JUnit XML, so that few files come back. Commit
# the JSON under benchmarks/results/. The summary printed last is what the device tool's reply shows.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%d)}"
LOGS="$(mktemp -d)"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" GLM_EXT_CUDA=1
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(build tests sanitize bench)
SUMMARY=()

run() {  # run NAME COMMAND...: logs to $LOGS/NAME.log, shows its tail, records status and time
  local name=$1
  shift
  echo "=== $name: $*"
  local start=$SECONDS
  "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  SUMMARY+=("$(printf '%-26s rc=%-3s %4ss' "$name" "$rc" "$((SECONDS - start))")")
  tail -n 15 "$LOGS/$name.log"
  return $rc
}

finish() {
  tar -C "$LOGS" -czf "$OUT/logs.tar.gz" . 2>/dev/null
  echo
  echo "=== summary ($OUT)"
  printf '%s\n' "${SUMMARY[@]}"
}
trap finish EXIT

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

for step in "${STEPS[@]}"; do
  case "$step" in
    build)
      # In place, so that nothing needs the network or a packaging toolchain beyond setuptools.
      run build "$PY" setup.py build_ext --inplace || exit 1
      "$PY" -m glm_ext info
      ;;
    tests)
      run cuda_tests "$PY" -m pytest python_tests -m cuda -q -p no:cacheprovider \
        --junitxml="$LOGS/cuda_tests.xml"
      ;;
    sanitize)
      # The sanitizers slow every launch by orders of magnitude: a small, representative subset.
      subset="out_of_range or strided or cuda_batch_equals or (float64_reference and (bfloat16 or float16))"
      subset="$subset or (cuda_within_pytorch_error and bfloat16) or cuda_bad_sep or cuda_packed_with_unknown"
      subset="$subset or (cuda_sep_and_lengths and 65)"
      for tool in memcheck racecheck; do
        run "sanitizer_$tool" compute-sanitizer --tool "$tool" --error-exitcode 99 --target-processes all \
          "$PY" -m pytest python_tests -m cuda -q -p no:cacheprovider -k "$subset"
      done
      ;;
    bench)
      for bench in benchmarks/bench_*.py; do
        name=$(basename "$bench" .py)
        run "$name" "$PY" "$bench" --device cuda --out "$OUT/${name#bench_}_cuda.json"
      done
      ;;
    *)
      echo "unknown step '$step' (expected build, tests, sanitize or bench)" >&2
      exit 2
      ;;
  esac
done
