// Per-element math of the fused nearest-codebook-entry search, shared by
// csrc/cpu/vq_cpu.cpp and csrc/cuda/vq_kernel.cu.
//
// The official HART quantizer computes, in fp32,
//     d = sum(z^2, 1, keepdim) + sum(e^2, 1)      # (N, 1) + (V,)
//     d.addmm_(z, e.T, alpha=-2, beta=1)          # + (-2) * z @ e.T
//     idx = argmin(d, 1)                          # first index on ties
// We evaluate the same expression with the same association,
//     d = (||z||^2 + ||e||^2) - 2 * (z . e),
// where every sum runs sequentially over the channel dimension.  The
// reference's GEMM sums in a different (blocked) order, so on a genuine near
// tie (two codes within fp32 rounding of each other) we may pick the other
// one; on well separated data the indices are identical.  CPU and GPU use
// exactly this order, so they always agree with each other bit for bit.
#pragma once

#include <cstdint>

#include "hart_fast/macros.h"
#include "hart_fast/numerics.h"

namespace hart_fast {

// One step of a sequential dot product / squared norm.
HF_HOST_DEVICE inline float hf_dot_step(float acc, float a, float b) {
  return hf_add(acc, hf_mul(a, b));
}

// Squared distance from the three fp32 partial quantities.  2 * dot is exact
// (power-of-two scale), so this equals the reference's (zz + ee) + (-2) * dot.
HF_HOST_DEVICE inline float hf_vq_distance(float zz, float ee, float dot) {
  return hf_sub(hf_add(zz, ee), hf_mul(2.0f, dot));
}

// Strict total order used for every argmin merge: is candidate (d, i) better
// than the current best (best_d, best_i)?  Follows torch.argmin: NaN counts as
// the minimum, and among equal values (or among NaNs) the lower index wins.
// best_i < 0 marks "no candidate yet"; candidates with i < 0 never win.
// Because the order is total, the result of any reduction tree is the same
// unique element, so parallel reductions stay deterministic.
HF_HOST_DEVICE inline bool hf_argmin_better(float d, int64_t i, float best_d, int64_t best_i) {
  if (i < 0) return false;
  if (best_i < 0) return true;
  const bool d_nan = hf_isnan(d);
  const bool b_nan = hf_isnan(best_d);
  if (d_nan || b_nan) {
    if (d_nan && b_nan) return i < best_i;
    return d_nan;
  }
  return d < best_d || (d == best_d && i < best_i);
}

}  // namespace hart_fast
