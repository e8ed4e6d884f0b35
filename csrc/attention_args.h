// Torch-facing argument validation for the attention / sampling ops, shared
// by their CPU and CUDA registrations (kept apart from tensor_args.h so the
// op families can evolve independently).
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>

#include "hart_fast/attention.h"

namespace hart_fast::ops {

struct QkvRopeArgs {
  at::Tensor q_out, qkv, bias, cos, sin, scale_mul;  // keep buffers alive
  QkvRopeParams params;
};

QkvRopeArgs prepare_qkv_rope_cache(const at::Tensor& qkv, const std::optional<at::Tensor>& bias,
                                   const at::Tensor& cos, const at::Tensor& sin,
                                   const at::Tensor& k_cache, const at::Tensor& v_cache,
                                   int64_t start, const std::optional<at::Tensor>& scale_mul);

struct AttnArgs {
  at::Tensor out, q, k, v, kv_end;
  AttnParams params;
};

// ms_attention: keys [0, kv_len) of the caches.
AttnArgs prepare_ms_attention(const at::Tensor& q, const at::Tensor& k_cache,
                              const at::Tensor& v_cache, int64_t kv_len, double scale);

// ms_attention_block_causal: kv_end[i] = #{j : level[j] <= level[i]}
// (computed with searchsorted on the device of level).
AttnArgs prepare_block_causal(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& level, double scale);

struct CfgTopKArgs {
  at::Tensor out, logits;
  int64_t rows = 0;  // B * l
  int64_t V = 0;
  int64_t half_offset = 0;  // element offset of the unconditional half
  int64_t k = 0;            // 0: keep all
  float one_plus_t = 1.0f, t = 0.0f;
};

CfgTopKArgs prepare_cfg_top_k(const at::Tensor& logits, double t, int64_t top_k, double top_p);

}  // namespace hart_fast::ops
