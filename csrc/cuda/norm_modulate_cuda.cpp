// Torch-facing half of the CUDA norm + modulation ops: argument checks,
// allocation and the current stream.  Compiled by the host compiler; the
// kernel itself is in norm_modulate_kernel.cu.
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../tensor_args.h"
#include "device_guard.h"
#include "launchers.h"

namespace hart_fast::ops {
namespace {

at::Tensor run(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& weight,
               const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
               const std::optional<at::Tensor>& shift, double eps, bool layer_norm) {
  // Allocations and the kernel must target x's device, whatever is current.
  const auto guard = cuda_device_guard(op, "x", x);
  NormModulateArgs a = prepare_norm_modulate(op, x, weight, bias, scale, shift, eps, layer_norm);
  C10_CUDA_CHECK(gpu::launch_norm_modulate(a.params, layer_norm,
                                           c10::cuda::getCurrentCUDAStream().stream()));
  return a.out;
}

at::Tensor rms_norm_modulate_cuda(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                  const std::optional<at::Tensor>& scale,
                                  const std::optional<at::Tensor>& shift, double eps) {
  return run("rms_norm_modulate", x, weight, std::nullopt, scale, shift, eps, false);
}

at::Tensor layer_norm_modulate_cuda(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                    const std::optional<at::Tensor>& bias,
                                    const std::optional<at::Tensor>& scale,
                                    const std::optional<at::Tensor>& shift, double eps) {
  return run("layer_norm_modulate", x, weight, bias, scale, shift, eps, true);
}

std::tuple<at::Tensor, at::Tensor> run_add(const char* op, const at::Tensor& x,
                                            const at::Tensor& branch,
                                            const std::optional<at::Tensor>& gate,
                                            const std::optional<at::Tensor>& weight,
                                            const std::optional<at::Tensor>& bias,
                                            const std::optional<at::Tensor>& scale,
                                            const std::optional<at::Tensor>& shift, double eps,
                                            bool layer_norm) {
  const auto guard = cuda_device_guard(op, "x", x);
  NormModulateArgs a =
      prepare_add_norm_modulate(op, x, branch, gate, weight, bias, scale, shift, eps, layer_norm);
  C10_CUDA_CHECK(gpu::launch_norm_modulate(a.params, layer_norm,
                                           c10::cuda::getCurrentCUDAStream().stream()));
  return {a.sum, a.out};
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_modulate_cuda(
    const at::Tensor& x, const at::Tensor& branch, const std::optional<at::Tensor>& gate,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& shift, double eps) {
  return run_add("add_rms_norm_modulate", x, branch, gate, weight, std::nullopt, scale, shift,
                 eps, false);
}

std::tuple<at::Tensor, at::Tensor> add_layer_norm_modulate_cuda(
    const at::Tensor& x, const at::Tensor& branch, const std::optional<at::Tensor>& gate,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, double eps) {
  return run_add("add_layer_norm_modulate", x, branch, gate, weight, bias, scale, shift, eps,
                 true);
}

}  // namespace

TORCH_LIBRARY_IMPL(hart_fast, CUDA, m) {
  m.impl("rms_norm_modulate", &rms_norm_modulate_cuda);
  m.impl("layer_norm_modulate", &layer_norm_modulate_cuda);
  m.impl("add_rms_norm_modulate", &add_rms_norm_modulate_cuda);
  m.impl("add_layer_norm_modulate", &add_layer_norm_modulate_cuda);
}

}  // namespace hart_fast::ops
