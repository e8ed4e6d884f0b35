// Per-row / per-element math of the fused RMSNorm / LayerNorm + AdaLN
// modulation, shared by csrc/cpu/norm_modulate_cpu.cpp and
// csrc/cuda/norm_modulate_kernel.cu.
//
// Semantics (mirrors hart_fast/ops/norm.py::*_reference; T = x's dtype, round_T
// the identity for fp32), rounded where the official HART code rounds:
//   rms:   y = round_T(x * (1 / sqrt(mean(x^2) + eps)))      the fused rms_norm kernel
//          [y = round_T(y * round_T(weight))]                weight cast to T, product in T
//          y = round_T(y * round_T(1 + scale))               `.mul(1 + scale)` in T
//          y = round_T(y + shift)                            `.add(shift)` in T
//   layer: y = (x - mean) * (1 / sqrt(var + eps)) [* weight] [+ bias]  in fp32
//          (biased variance, two-pass, like F.layer_norm)
//          y = y * round_T(1 + scale) + shift                in fp32 (autocast's LayerNorm)
//          y = round_T(y)                                    once, when stored
//
// The residual-add variants (add_*_norm_modulate) first form the block's
// residual stream  s = round_T(x + round_T(branch * gate))  (or
// round_T(x + branch) without gate), exactly `x + branch.mul(gate)` in T,
// store s, and normalise s as above.  HART's blocks end in such a gated add
// that is immediately followed by the next norm, so fusing the two saves a
// full read + write of the stream and a launch.
//
// Reduction order: row sums are accumulated in kNormLanes partial sums (lane
// j owns elements j, j + kNormLanes, ... in increasing order) and the lanes
// are folded with a fixed pairwise tree.  The CUDA kernel runs one block of
// kNormLanes threads per row and does exactly this, so CPU and GPU results are
// bit-identical; they differ from torch's own (cascade / Welford) reduction
// order only by fp32 rounding noise.
#pragma once

#include <cstdint>

#include "hart_fast/macros.h"
#include "hart_fast/numerics.h"

namespace hart_fast {

// Number of partial sums per row.  Also the CUDA block size: changing it
// changes results in the last fp32 bit on both devices together.
constexpr int kNormLanes = 256;
// The lane folds halve the lane count each step: a power of two, at most one
// CUDA block.
static_assert((kNormLanes & (kNormLanes - 1)) == 0 && kNormLanes <= 1024,
              "kNormLanes must be a power of two <= 1024");

// Maps a flattened row index of x (rows = prod(x.shape[:-1])) to the row of
// a broadcast operand (scale / shift / gate), whose rows have `cols`
// contiguous elements each, `row_stride` apart: operand_row = (row / inner) % outer.  This covers the
// broadcast patterns that occur in practice without materialising them:
//   (C,) / (1, 1, C)        -> outer = 1
//   (B, 1, C) vs (B, L, C)  -> inner = L, outer = B
//   (1, L, C) vs (B, L, C)  -> inner = 1, outer = L
//   (B, L, C) vs (B, L, C)  -> inner = 1, outer = B * L
// Other patterns are expanded to full size by the torch-facing code.
struct RowBroadcast {
  int64_t inner = 1;
  int64_t outer = 1;
  // Elements between consecutive operand rows; 0 means `cols` (contiguous).
  // A column slice of a wider matrix (the diffusion MLP's shift / scale /
  // gate are slices of one adaLN GEMM output) is read in place this way.
  int64_t row_stride = 0;
};

HF_HOST_DEVICE inline int64_t hf_broadcast_row(int64_t row, RowBroadcast b) {
  return (row / b.inner) % b.outer;
}

// Element offset of the operand row that x's row `row` reads.
HF_HOST_DEVICE inline int64_t hf_operand_offset(int64_t row, RowBroadcast b, int64_t cols) {
  return hf_broadcast_row(row, b) * (b.row_stride > 0 ? b.row_stride : cols);
}

// Raw, torch-free description of one norm+modulate call.  Pointers of type
// void refer to elements of `dtype`; weight and bias are always fp32 (the
// torch glue upcasts them, which is exact).  x and out are contiguous
// (rows, cols); scale / shift rows of `cols` elements are found through their
// maps (broadcast and row stride: they may be column slices read in place).
// Null pointers mean "absent".
struct NormModulateParams {
  const void* x = nullptr;
  void* out = nullptr;
  // Residual-add variant (all null otherwise): branch is contiguous
  // (rows, cols) like x; gate rows found through gate_map; the sum
  // x + branch * gate is written to sum_out (rows, cols) and then normalised.
  const void* branch = nullptr;
  const void* gate = nullptr;
  RowBroadcast gate_map;
  void* sum_out = nullptr;
  const float* weight = nullptr;
  const float* bias = nullptr;  // layer norm only
  const void* scale = nullptr;
  const void* shift = nullptr;
  RowBroadcast scale_map;
  RowBroadcast shift_map;
  int64_t rows = 0;
  int64_t cols = 0;
  float eps = 0.0f;
  DType dtype = DType::kFloat32;
};

// `x + branch.mul(gate)` (or `x + branch`) evaluated by PyTorch in dtype S:
// the product rounds to S, then the sum.  Inputs are representable in S.
template <typename S>
HF_HOST_DEVICE inline float hf_residual_add(float x, float branch, const S* gate_row, int64_t c) {
  if (gate_row != nullptr) branch = hf_round_to<S>(hf_mul(branch, hf_load(gate_row[c])));
  return hf_round_to<S>(hf_add(x, branch));
}

// Element contribution to the first row sum.
HF_HOST_DEVICE inline float hf_rms_term(float x) { return hf_mul(x, x); }

// Fold kNormLanes partial sums in place with the fixed pairwise tree; the
// result ends up in lanes[0].  The CUDA kernel performs the same pairings.
HF_HOST_DEVICE inline void hf_fold_lanes(float* lanes) {
  for (int stride = kNormLanes / 2; stride > 0; stride >>= 1) {
    for (int t = 0; t < stride; ++t) {
      lanes[t] = hf_add(lanes[t], lanes[t + stride]);
    }
  }
}

// 1 / sqrt(mean(x^2) + eps) from the row's sum of squares.  mean = sum / C
// (torch's CPU mean divides; its CUDA mean multiplies by 1/C, which can
// differ in the last bit).
HF_HOST_DEVICE inline float hf_rms_inv(float sum_sq, int64_t cols, float eps) {
  const float mean_sq = hf_div(sum_sq, static_cast<float>(cols));
  return hf_rsqrt(hf_add(mean_sq, eps));
}

HF_HOST_DEVICE inline float hf_mean(float sum, int64_t cols) {
  return hf_div(sum, static_cast<float>(cols));
}

// Contribution of one element to the (biased) variance sum of pass two.
HF_HOST_DEVICE inline float hf_centered_sq(float x, float mean) {
  const float d = hf_sub(x, mean);
  return hf_mul(d, d);
}

HF_HOST_DEVICE inline float hf_layer_rstd(float sum_centered_sq, int64_t cols, float eps) {
  const float var = hf_div(sum_centered_sq, static_cast<float>(cols));
  return hf_rsqrt(hf_add(var, eps));
}

// Element-wise steps.  The CUDA kernel applies them through the composed
// helpers below; the CPU kernel runs each step as its own loop over a row
// (which vectorises).  Either way every element sees the same operations in
// the same order, hence the same bits.
HF_HOST_DEVICE inline float hf_rms_normalize(float x, float inv_rms) { return hf_mul(x, inv_rms); }
HF_HOST_DEVICE inline float hf_layer_normalize(float x, float mean, float rstd) {
  return hf_mul(hf_sub(x, mean), rstd);
}
HF_HOST_DEVICE inline float hf_weight_step(float y, float w) { return hf_mul(y, w); }
HF_HOST_DEVICE inline float hf_bias_step(float y, float b) { return hf_add(y, b); }

// `.mul(1 + scale)` evaluated by PyTorch in dtype S: `1 + scale` rounds to S,
// the product rounds to S.  y is already representable in S.
template <typename S>
HF_HOST_DEVICE inline float hf_scale_step(float y, float scale) {
  const float one_plus = hf_round_to<S>(hf_add(1.0f, scale));
  return hf_round_to<S>(hf_mul(y, one_plus));
}
// `.add(shift)` in dtype S.
template <typename S>
HF_HOST_DEVICE inline float hf_shift_step(float y, float shift) {
  return hf_round_to<S>(hf_add(y, shift));
}

// The RMSNorm weight as HART's fused rms_norm applies it: the official module
// casts its weight to x's dtype S and the kernel multiplies the normalised
// value, already rounded to S, by it, rounding the product to S.  (For fp32
// both roundings are exact: y * w.)
template <typename S>
HF_HOST_DEVICE inline float hf_rms_weight_step(float y_s, float w) {
  return hf_round_to<S>(hf_mul(y_s, hf_round_to<S>(w)));
}

// Normalised element of RMSNorm, rounded at the official points: round_S(x *
// inv), then round_S(. * round_S(w)).  The result is representable in S.
template <typename S>
HF_HOST_DEVICE inline float hf_rms_apply(float x, float inv_rms, const float* weight,
                                         int64_t c) {
  float y = hf_round_to<S>(hf_rms_normalize(x, inv_rms));
  if (weight != nullptr) y = hf_rms_weight_step<S>(y, weight[c]);
  return y;
}

HF_HOST_DEVICE inline float hf_layer_apply(float x, float mean, float rstd,
                                           const float* weight, const float* bias,
                                           int64_t c) {
  float y = hf_layer_normalize(x, mean, rstd);
  if (weight != nullptr) y = hf_weight_step(y, weight[c]);
  if (bias != nullptr) y = hf_bias_step(y, bias[c]);
  return y;
}

// RMSNorm's modulation, as HART's blocks evaluate it on a stream in dtype S:
// rounds the normalised value to S (a no-op after hf_rms_apply), then each of
// `.mul(1 + scale)` and `.add(shift)` rounds to S.  Returns the stored value.
// scale_row / shift_row point at the operand row for this x row (or null).
template <typename S>
HF_HOST_DEVICE inline S hf_modulate_store(float y, const S* scale_row, const S* shift_row,
                                          int64_t c) {
  y = hf_round_to<S>(y);
  if (scale_row != nullptr) y = hf_scale_step<S>(y, hf_load(scale_row[c]));
  if (shift_row != nullptr) y = hf_shift_step<S>(y, hf_load(shift_row[c]));
  return Storage<S>::store(y);
}

// `.mul(1 + scale)` on a float32 LayerNorm output: `1 + scale` rounds to S
// (scale's dtype), the product stays float32 (type promotion).
template <typename S>
HF_HOST_DEVICE inline float hf_layer_scale_step(float y, float scale) {
  return hf_mul(y, hf_round_to<S>(hf_add(1.0f, scale)));
}

// LayerNorm's modulation as the official residual-diffusion MLP runs under
// autocast: the LayerNorm (an fp32 op there) leaves float32 values, the
// modulation `y * (1 + scale) + shift` promotes to float32, and the result
// rounds once to S when it is stored (the next Linear's autocast cast).
template <typename S>
HF_HOST_DEVICE inline S hf_layer_modulate_store(float y, const S* scale_row, const S* shift_row,
                                                int64_t c) {
  if (scale_row != nullptr) y = hf_layer_scale_step<S>(y, hf_load(scale_row[c]));
  if (shift_row != nullptr) y = hf_add(y, hf_load(shift_row[c]));
  return Storage<S>::store(y);
}

// The stored output of either norm (what the CUDA kernel and the tests call).
template <typename S, bool kLayer>
HF_HOST_DEVICE inline S hf_norm_store(float y, const S* scale_row, const S* shift_row, int64_t c) {
  return kLayer ? hf_layer_modulate_store<S>(y, scale_row, shift_row, c)
                : hf_modulate_store<S>(y, scale_row, shift_row, c);
}

}  // namespace hart_fast
