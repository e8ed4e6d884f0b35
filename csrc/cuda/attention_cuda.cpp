// Torch-facing half of the CUDA attention / sampling ops: argument checks,
// workspace allocation and the current stream; kernels in attention_kernel.cu.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../attention_args.h"
#include "attention_launch.h"
#include "device_guard.h"

namespace hart_fast::ops {
namespace {

at::Tensor qkv_rope_cache_cuda(const at::Tensor& qkv, const std::optional<at::Tensor>& qkv_bias,
                               const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache,
                               at::Tensor& v_cache, int64_t start,
                               const std::optional<at::Tensor>& scale_mul) {
  const auto guard = cuda_device_guard("qkv_rope_cache", "qkv", qkv);
  QkvRopeArgs a = prepare_qkv_rope_cache(qkv, qkv_bias, cos, sin, k_cache, v_cache, start, scale_mul);
  TORCH_CHECK_VALUE(a.params.d <= 128, "qkv_rope_cache: the CUDA kernel supports head dims up to 128, got ",
                    a.params.d, ".");
  C10_CUDA_CHECK(gpu::launch_qkv_rope_cache(a.params, c10::cuda::getCurrentCUDAStream().stream()));
  return a.q_out;
}

at::Tensor run_attention(AttnArgs& a) {
  const AttnParams& p = a.params;
  const int num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int splits = gpu::attention_num_splits(p, num_sms);
  at::Tensor part_acc, part_ml;
  float* pa = nullptr;
  float* pm = nullptr;
  if (splits > 1) {
    const int64_t rows = splits * p.B * p.H * p.lq;
    part_acc = at::empty({rows * p.d}, a.q.options().dtype(at::kFloat));
    part_ml = at::empty({rows * 2}, a.q.options().dtype(at::kFloat));
    pa = part_acc.data_ptr<float>();
    pm = part_ml.data_ptr<float>();
  }
  C10_CUDA_CHECK(gpu::launch_attention(p, splits, pa, pm, c10::cuda::getCurrentCUDAStream().stream()));
  return a.out;
}

at::Tensor ms_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache,
                             const at::Tensor& v_cache, int64_t kv_len, double scale) {
  const auto guard = cuda_device_guard("ms_attention", "q", q);
  AttnArgs a = prepare_ms_attention(q, k_cache, v_cache, kv_len, scale);
  return run_attention(a);
}

at::Tensor ms_attention_block_causal_cuda(const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& v, const at::Tensor& level,
                                          double scale) {
  const auto guard = cuda_device_guard("ms_attention_block_causal", "q", q);
  AttnArgs a = prepare_block_causal(q, k, v, level, scale);
  return run_attention(a);
}

at::Tensor cfg_top_k_filter_cuda(const at::Tensor& logits, double t, int64_t top_k, double top_p) {
  const auto guard = cuda_device_guard("cfg_top_k_filter", "logits", logits);
  CfgTopKArgs a = prepare_cfg_top_k(logits, t, top_k, top_p);
  C10_CUDA_CHECK(gpu::launch_cfg_top_k(a.logits.data_ptr<float>(), a.out.data_ptr<float>(), a.rows,
                                       a.V, a.half_offset, a.k, a.one_plus_t, a.t,
                                       c10::cuda::getCurrentCUDAStream().stream()));
  return a.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hart_fast, CUDA, m) {
  m.impl("qkv_rope_cache", &qkv_rope_cache_cuda);
  m.impl("ms_attention", &ms_attention_cuda);
  m.impl("ms_attention_block_causal", &ms_attention_block_causal_cuda);
  m.impl("cfg_top_k_filter", &cfg_top_k_filter_cuda);
}

}  // namespace hart_fast::ops
