// Torch-facing half of the CUDA VQ-glue / IDDPM ops; kernels in
// vq_glue_kernel.cu.  Argument checks are shared with the CPU registration
// (vq_glue_args.h).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../vq_glue_args.h"
#include "device_guard.h"
#include "vq_glue_launch.h"

namespace hart_fast::ops {
namespace {

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

at::Tensor bicubic_upsample_cuda(const at::Tensor& x, int64_t out_h, int64_t out_w) {
  const auto guard = cuda_device_guard("bicubic_upsample", "x", x);
  ResizeArgs a = prepare_resize("bicubic_upsample", x, out_h, out_w);
  C10_CUDA_CHECK(gpu::launch_bicubic_upsample(a.x.data_ptr(), a.out.data_ptr(), a.dtype, a.planes,
                                              a.in_h, a.in_w, a.out_h, a.out_w, stream()));
  return a.out;
}

at::Tensor area_downsample_cuda(const at::Tensor& x, int64_t out_h, int64_t out_w) {
  const auto guard = cuda_device_guard("area_downsample", "x", x);
  ResizeArgs a = prepare_resize("area_downsample", x, out_h, out_w);
  C10_CUDA_CHECK(gpu::launch_area_downsample(a.x.data_ptr(), a.out.data_ptr(), a.dtype, a.planes,
                                             a.in_h, a.in_w, a.out_h, a.out_w, stream()));
  return a.out;
}

void phi_blend_accumulate_cuda(const at::Tensor& f_hat, const at::Tensor& up,
                               const at::Tensor& conv_out, double ratio) {
  const auto guard = cuda_device_guard("phi_blend_accumulate", "f_hat", f_hat);
  PhiArgs a = prepare_phi(f_hat, up, conv_out);
  C10_CUDA_CHECK(gpu::launch_phi_blend_accumulate(
      f_hat.data_ptr<float>(), a.up.data_ptr(), a.conv.data_ptr(), a.dtype, a.numel,
      static_cast<float>(1.0 - ratio), static_cast<float>(ratio), stream()));
}

at::Tensor iddpm_step_fused_cuda(const at::Tensor& x, const at::Tensor& model_out,
                                 const at::Tensor& noise, double cfg, bool guided,
                                 double c_recip, double c_recipm1, double c_coef1,
                                 double c_coef2, double min_log, double max_log, double nonzero,
                                 double temperature) {
  const auto guard = cuda_device_guard("iddpm_step_fused", "x", x);
  IddpmArgs a = prepare_iddpm(x, model_out, noise, guided);
  const IddpmScalars s = iddpm_scalars(cfg, guided, c_recip, c_recipm1, c_coef1, c_coef2,
                                       min_log, max_log, nonzero, temperature);
  C10_CUDA_CHECK(gpu::launch_iddpm_step(a.x.data_ptr<float>(), a.model_out.data_ptr<float>(),
                                        a.noise.data_ptr<float>(), a.out.data_ptr<float>(), a.n,
                                        a.c, s, stream()));
  return a.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hart_fast, CUDA, m) {
  m.impl("bicubic_upsample", &bicubic_upsample_cuda);
  m.impl("area_downsample", &area_downsample_cuda);
  m.impl("phi_blend_accumulate_", &phi_blend_accumulate_cuda);
  m.impl("iddpm_step_fused", &iddpm_step_fused_cuda);
}

}  // namespace hart_fast::ops
