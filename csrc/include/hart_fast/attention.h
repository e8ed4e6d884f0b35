// Shared math and raw parameter blocks of HART's attention ops
// (qkv_rope_cache, ms_attention, ms_attention_block_causal) and of the
// CFG + top-k logit filter (cfg_top_k_filter), used by csrc/cpu/*_cpu.cpp and
// csrc/cuda/*_kernel.cu.
//
// Per-element semantics (hart_fast/model/transformer.py, LlamaAttention):
//   x      = round_T(qkv + bias)                        (bias optional)
//   l2:    n = round_T(sqrt(sum x^2)); den = round_T(max(n, 1e-12))
//          x = round_T(x / den); q = round_T(q * scale_mul[h])   (F.normalize, .mul)
//   rope:  y = round_T(round_T(x * cos_T) + round_T(rotate_half(x) * sin_T))
//          with cos_T = round_T(cos), rotate_half(x)[c] = -x[c + d/2] for c < d/2,
//          x[c - d/2] otherwise.
// Every step is an explicitly rounded operation, as PyTorch evaluates the
// element-wise expression, so the rotary embedding is bit-exact against the
// reference; only the l2 sum (a reduction) may differ in its order.
#pragma once

#include <cstdint>

#include "hart_fast/macros.h"
#include "hart_fast/numerics.h"

namespace hart_fast {

// ---------------------------------------------------------------------------
// qkv + bias -> l2 norm -> RoPE -> cache write
// ---------------------------------------------------------------------------
struct QkvRopeParams {
  const void* qkv = nullptr;       // (B, l, 3, H, d) contiguous, dtype
  const void* bias = nullptr;      // (3, H, d) contiguous, dtype, or null
  const float* cos = nullptr;      // (Bc, l, d) contiguous fp32, Bc in {1, B}
  const float* sin = nullptr;
  const float* scale_mul = nullptr;  // (H,) fp32 or null (no l2 norm)
  void* k_cache = nullptr;         // (B, H, S, d), last dim contiguous
  void* v_cache = nullptr;
  void* q_out = nullptr;           // (B, H, l, d) contiguous
  int64_t kc_strides[3] = {0, 0, 0};  // element strides of b, h, s
  int64_t vc_strides[3] = {0, 0, 0};
  int64_t rope_b_stride = 0;       // 0 when the tables are shared by the batch
  int64_t B = 0, l = 0, H = 0, d = 0, start = 0;
  DType dtype = DType::kFloat32;
};

// F.normalize's denominator from the fp32 sum of squares of one head vector:
// the norm is returned by torch in T, then clamp_min(1e-12) rounds to T again
// (1e-12 underflows to 0 in fp16, as in PyTorch).
template <typename S>
HF_HOST_DEVICE inline float hf_l2_denominator(float sum_sq) {
  const float n = hf_round_to<S>(hf_sqrt(sum_sq));
  return hf_round_to<S>(n > 1e-12f ? n : 1e-12f);
}

template <typename S>
HF_HOST_DEVICE inline float hf_l2_normalize(float x, float den) {
  return hf_round_to<S>(hf_div(x, den));
}

template <typename S>
HF_HOST_DEVICE inline float hf_scale_mul(float x, float s) {
  return hf_round_to<S>(hf_mul(x, s));
}

// RoPE of one pair (x1 = x[c], x2 = x[c + d/2]) with the fp32 table entries
// of both positions; writes the rotated pair in fp32 (representable in S).
template <typename S>
HF_HOST_DEVICE inline void hf_rope_pair(float x1, float x2, float cos1, float sin1, float cos2,
                                        float sin2, float* y1, float* y2) {
  const float c1 = hf_round_to<S>(cos1), s1 = hf_round_to<S>(sin1);
  const float c2 = hf_round_to<S>(cos2), s2 = hf_round_to<S>(sin2);
  // rotate_half: (-x2, x1); negation is exact.
  *y1 = hf_round_to<S>(hf_add(hf_round_to<S>(hf_mul(x1, c1)), hf_round_to<S>(hf_mul(-x2, s1))));
  *y2 = hf_round_to<S>(hf_add(hf_round_to<S>(hf_mul(x2, c2)), hf_round_to<S>(hf_mul(x1, s2))));
}

// ---------------------------------------------------------------------------
// Attention
// ---------------------------------------------------------------------------
// One attention call: out[b, i, h*d + c] = softmax_j(scale * q_i . k_j) v_j
// over keys j in [0, kv_end(i)), where kv_end(i) = kv_end[i] when given (the
// block-causal prefix of query i) and kv_len otherwise.  All accumulation in
// fp32; the output rounds once to the dtype.
struct AttnParams {
  const void* q = nullptr;  // (B, H, lq, d), last dim contiguous
  const void* k = nullptr;  // (B, H, >= kv_len, d), last dim contiguous
  const void* v = nullptr;
  void* out = nullptr;      // (B, lq, H, d) contiguous
  const int64_t* kv_end = nullptr;  // (lq,) or null
  int64_t q_strides[3] = {0, 0, 0};  // element strides of b, h, i
  int64_t k_strides[3] = {0, 0, 0};  // b, h, j
  int64_t v_strides[3] = {0, 0, 0};
  int64_t B = 0, H = 0, lq = 0, d = 0, kv_len = 0;
  float scale = 1.0f;
  DType dtype = DType::kFloat32;
};

// Scores are kept in the log2 domain (scale * log2(e) folded into one
// multiplier) so the softmax uses exp2, which is cheaper than exp on both
// devices; mathematically the same softmax.
constexpr float kLog2e = 1.4426950408889634f;

// exp2(s - m) guarded for m == -inf (no key seen yet / all keys masked): the
// running max is then replaced by 0 so -inf - -inf never produces NaN.
HF_HOST_DEVICE inline float hf_safe_max(float m) { return m == hf_bits_as_float(0xff800000u) ? 0.0f : m; }

// ---------------------------------------------------------------------------
// CFG combine + top-k
// ---------------------------------------------------------------------------
// (1 + t) * cond - t * uncond, each operation rounded to fp32 as PyTorch
// evaluates it for a Python-float t (the scalars are cast to fp32 first).
HF_HOST_DEVICE inline float hf_cfg_combine(float cond, float uncond, float one_plus_t, float t) {
  return hf_sub(hf_mul(one_plus_t, cond), hf_mul(t, uncond));
}

// Order-preserving map of a float onto uint32 (larger float -> larger key),
// used by the radix select of the CUDA top-k and by the tests.
HF_HOST_DEVICE inline uint32_t hf_float_order_key(float f) {
  const uint32_t u = hf_float_as_bits(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
HF_HOST_DEVICE inline float hf_order_key_float(uint32_t k) {
  return hf_bits_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

}  // namespace hart_fast
