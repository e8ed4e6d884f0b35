#!/usr/bin/env bash
# The GPU session's one prepared check: build the extension for Hopper, run the
# CUDA tests, run the benchmark report. Prints a short table; writes
# $OUT/report.json and the logs. Run through the device tool, e.g.
#   run(command="bash bench/device_check.sh", timeout_s=480)
# The device machine has torch, triton, nvcc, ninja and pybind11 but no network,
# so nothing is pip-installed there: the extension is built in place.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/hart-fast-out}"
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" HART_FAST_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"

start=$(date +%s)
if ! python setup.py build_ext --inplace -q > "$OUT/build.log" 2>&1; then
  echo "BUILD FAILED"; tail -40 "$OUT/build.log"; exit 1
fi
echo "build: $(( $(date +%s) - start )) s"

# CUDA tests (plus the conformance on both paths) with the extension required,
# selected by marker: python_tests/markers.py marks every test that uses a GPU
# `cuda` at collection (device parameters, cuda_kernel_device, no-CUDA skips),
# whatever its name says, and test_conformance.py `conformance`.
# --maxfail rather than -x: one run should show every failing kernel, not the first.
start=$(date +%s)
HART_FAST_REQUIRE_EXTENSION=1 python -m pytest python_tests -q --maxfail=20 -m "cuda or conformance" \
  -p no:cacheprovider > "$OUT/tests.log" 2>&1
echo "tests: exit $? ($(tail -1 "$OUT/tests.log")) in $(( $(date +%s) - start )) s"
grep -E "^FAILED|^ERROR" "$OUT/tests.log" | head -20

# The report writes report.json after every section and starts no section after
# REPORT_BUDGET_S seconds, so a call cut short by the device limit keeps its figures.
python bench/report.py --out "$OUT/report.json" --budget-s "${REPORT_BUDGET_S:-300}" ${REPORT_ARGS:-} \
  2>&1 | tee "$OUT/report.txt"
