// Torch-facing half of the CUDA group_norm_silu: argument checks, scratch
// allocation (caching allocator) and the current stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../group_norm_silu_args.h"
#include "device_guard.h"
#include "group_norm_silu_launch.h"

namespace hart_fast::ops {
namespace {

at::Tensor group_norm_silu_cuda(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& bias, int64_t groups, double eps,
                                bool silu) {
  const auto guard = cuda_device_guard("group_norm_silu", "x", x);
  GroupNormSiluArgs a = prepare_group_norm_silu(x, weight, bias, groups, eps, silu);
  const GroupNormSiluParams& p = a.params;
  if (p.batch * p.channels * p.hw == 0) return a.out;
  const int64_t splits = gpu::group_norm_silu_splits(p);
  at::Tensor partials =
      at::empty({2 * p.batch * p.channels * splits}, x.options().dtype(at::kDouble));
  static_assert(sizeof(GnCoef) == 3 * sizeof(float), "GnCoef is three packed floats");
  at::Tensor coefs = at::empty({3 * p.batch * p.channels}, x.options().dtype(at::kFloat));
  C10_CUDA_CHECK(gpu::launch_group_norm_silu(p, partials.data_ptr<double>(),
                                             reinterpret_cast<GnCoef*>(coefs.data_ptr<float>()),
                                             splits,
                                             c10::cuda::getCurrentCUDAStream().stream()));
  return a.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hart_fast, CUDA, m) { m.impl("group_norm_silu", &group_norm_silu_cuda); }

}  // namespace hart_fast::ops
