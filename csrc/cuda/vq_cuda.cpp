// Torch-facing half of the CUDA vq_nearest_code op; the kernels are in
// vq_kernel.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../tensor_args.h"
#include "device_guard.h"
#include "launchers.h"

namespace hart_fast::ops {
namespace {

at::Tensor vq_nearest_code_cuda(const at::Tensor& z, const at::Tensor& codebook) {
  const auto guard = cuda_device_guard("vq_nearest_code", "z", z);
  VQArgs a = prepare_vq_nearest_code(z, codebook);
  if (a.n == 0) return a.out;
  // Scratch for ||e_v||^2, computed once per call instead of once per block.
  at::Tensor code_sq = at::empty({a.v}, a.z.options().dtype(at::kFloat));
  C10_CUDA_CHECK(gpu::launch_vq_nearest_code(
      a.z.data_ptr(), a.codebook.data_ptr(), a.dtype, a.n, a.v, a.c,
      code_sq.data_ptr<float>(), a.out.data_ptr<int64_t>(),
      c10::cuda::getCurrentCUDAStream().stream()));
  return a.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hart_fast, CUDA, m) { m.impl("vq_nearest_code", &vq_nearest_code_cuda); }

}  // namespace hart_fast::ops
