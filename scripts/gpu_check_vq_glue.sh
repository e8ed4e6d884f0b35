#!/usr/bin/env bash
# GPU check of the VQ glue / IDDPM / residual-diffusion fast path (k-vq branch),
# prepared for the device machine (H100/H200, python3 with torch + triton).
# Builds the extension with CUDA for sm_90 in place (16 cores: ~2-3 min), then
# runs the CUDA parametrisations of the new tests and the CUDA benchmarks.
#   bash scripts/gpu_check_vq_glue.sh            (from the repository root)
set -o pipefail
export PYTHONUNBUFFERED=1 HART_FAST_REQUIRE_EXTENSION=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
HART_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 setup.py build_ext --inplace -q \
  > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
python3 -c "import hart_fast.ops as o; assert o.HAS_CUDA_KERNELS, 'no CUDA kernels'; print('CUDA kernels OK')" || exit 1
PYTHONPATH=$PWD timeout 300 python3 -m pytest -q -x -k "cuda" \
  python_tests/test_ops_vq_glue.py python_tests/test_ops_diffusion.py 2>&1 | tee "$OUT/tests.log"
PYTHONPATH=$PWD timeout 200 python3 -m pytest -q --benchmark-only -k "cuda" \
  bench/test_bench_vq_glue.py 2>&1 | tee "$OUT/bench.log"
