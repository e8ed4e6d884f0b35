// Math of the fused GroupNorm + SiLU op (the VAE decoder's `F.silu(norm(x))`),
// shared by csrc/cpu/group_norm_silu_cpu.cpp and
// csrc/cuda/group_norm_silu_kernel.cu.
//
// Semantics (mirrors hart_fast/ops/group_norm.py::group_norm_silu_reference):
//   mean, var = biased statistics of x over each (batch, group)
//   y = (x - mean) * (1 / sqrt(var + eps)) * weight + bias   fp32, rounded to T
//   y = silu(y) = y / (1 + exp(-y))                     fp32, rounded to T
// where T = x.dtype.  The intermediate rounding to T only matters for fp16 /
// bf16: there the reference is F.group_norm (which returns x.dtype) followed
// by F.silu in x.dtype, i.e. PyTorch rounds between the two ops and so do we.
//
// Statistics: every element contributes x and x^2 to sums kept in fp64
// (single pass over the data, and partial sums of any partition of the group
// combine by plain addition, which the split GPU reduction needs).
// var = E[x^2] - mean^2 in fp64 loses log2(mean^2 / var) of fp64's 53 bits to
// cancellation; the fp32 result needs 24, so this is exact to fp32 rounding
// unless |mean| / std exceeds ~2^14, far outside what activations do.
//
// Per element the op is then y = (x - mean) * a + bias with per-(batch,
// channel) a = rstd * weight.  (PyTorch's kernels fold mean into the shift,
// x * a + (bias - mean * a); that cancels catastrophically when the group's
// spread is small next to |mean| (a 1-element group has var 0 and
// a = 1 / sqrt(eps)), so we subtract the mean first, one extra subtraction on
// a memory-bound pass.)
#pragma once

#include <cmath>
#include <cstdint>

#include "hart_fast/macros.h"
#include "hart_fast/numerics.h"

namespace hart_fast {

// Raw, torch-free description of one call.  x and out hold B * C * HW
// elements of `dtype`, either NCHW-contiguous (channels_last == false) or
// NHWC-contiguous (channels_last == true).  weight / bias are fp32 (C,) or
// null.  Group g covers channels [g * C / groups, (g + 1) * C / groups).
struct GroupNormSiluParams {
  const void* x = nullptr;
  void* out = nullptr;
  const float* weight = nullptr;
  const float* bias = nullptr;
  int64_t batch = 0;
  int64_t channels = 0;
  int64_t hw = 0;
  int64_t groups = 1;
  float eps = 0.0f;
  bool silu = true;
  bool channels_last = false;
  DType dtype = DType::kFloat32;
};

// mean and 1 / sqrt(var + eps) of a group from its fp64 sums over n elements
// (biased variance, clamped at 0 against cancellation noise, eps inside the
// square root; the division and root are done in fp64 and rounded once).
HF_HOST_DEVICE inline void hf_gn_moments(double sum, double sum_sq, int64_t n, float eps,
                                         float* mean_out, float* rstd_out) {
  const double inv_n = 1.0 / static_cast<double>(n);
  const double mean = sum * inv_n;
  double var = sum_sq * inv_n - mean * mean;
  var = var > 0.0 ? var : 0.0;
  *mean_out = static_cast<float>(mean);
  *rstd_out = static_cast<float>(1.0 / sqrt(var + static_cast<double>(eps)));
}

// Per-channel coefficients of y = (x - m) * a + s: m = the group mean,
// a = rstd * weight, s = bias.  weight / bias may be null (affine=False):
// a = rstd, s = 0.
struct GnCoef {
  float m;
  float a;
  float s;
};
HF_HOST_DEVICE inline GnCoef hf_gn_coeffs(float mean, float rstd, const float* weight,
                                          const float* bias, int64_t c) {
  GnCoef k;
  k.m = mean;
  k.a = weight != nullptr ? hf_mul(rstd, weight[c]) : rstd;
  k.s = bias != nullptr ? bias[c] : 0.0f;
  return k;
}

HF_HOST_DEVICE inline float hf_exp(float v) {
#if defined(__CUDA_ARCH__)
  return expf(v);  // full-accuracy expf (we never build with --use_fast_math)
#else
  return std::exp(v);
#endif
}

// PyTorch's fp32 SiLU formula on both devices: x / (1 + exp(-x)).
HF_HOST_DEVICE inline float hf_silu(float v) { return hf_div(v, hf_add(1.0f, hf_exp(-v))); }

// Branch-free expf (Cephes: x = n ln2 + r, |r| <= ln2 / 2, degree-6
// polynomial, scale by 2^n through the exponent bits), ~1 ulp.  The CPU
// kernel uses it because, unlike std::exp, the compiler vectorises it: the
// SiLU pass would otherwise be bound by scalar exp calls.  Above 88.72 it
// returns +inf (as expf); below -86 it returns exp(-86) instead of a tiny or
// zero value, which leaves 1 + exp(x) (its only use) unchanged.
HF_HOST_DEVICE inline float hf_exp_poly(float x) {
  // Clamp with bit selects: a ternary is control flow that stops GCC's vectoriser.
  uint32_t xb = hf_float_as_bits(x);
  xb = hf_select(x < -86.0f, hf_float_as_bits(-86.0f), xb);
  xb = hf_select(x > 88.72283935546875f, hf_float_as_bits(88.72283935546875f), xb);
  const float xc = hf_bits_as_float(xb);
  // n = round(x / ln2) with the 1.5 * 2^23 trick (round-to-nearest-even add).
  const float t = hf_add(hf_mul(xc, 1.44269504088896341f), 12582912.0f);
  const float n = hf_sub(t, 12582912.0f);
  float r = hf_sub(xc, hf_mul(n, 0.693359375f));  // ln2 split in two (Cody-Waite)
  r = hf_sub(r, hf_mul(n, -2.12194440e-4f));
  float p = 1.9875691500e-4f;
  p = hf_add(hf_mul(p, r), 1.3981999507e-3f);
  p = hf_add(hf_mul(p, r), 8.3334519073e-3f);
  p = hf_add(hf_mul(p, r), 4.1665795894e-2f);
  p = hf_add(hf_mul(p, r), 1.6666665459e-1f);
  p = hf_add(hf_mul(p, r), 5.0000001201e-1f);
  const float e = hf_add(hf_add(hf_mul(hf_mul(p, r), r), r), 1.0f);
  // 2^n as 2 * 2^(n - 1): n reaches 128 near ln(FLT_MAX), whose 2^n alone
  // has no fp32 encoding; e * 2 is exact.
  const int32_t ni = static_cast<int32_t>(n);
  const float scale = hf_bits_as_float(static_cast<uint32_t>(ni + 126) << 23);
  const float y = hf_mul(hf_mul(e, 2.0f), scale);
  return hf_bits_as_float(hf_select(x > 88.72283935546875f, 0x7f800000u, hf_float_as_bits(y)));
}

HF_HOST_DEVICE inline float hf_silu_poly(float v) {
  return hf_div(v, hf_add(1.0f, hf_exp_poly(-v)));
}

// One element: affine normalisation, rounding to the norm's output dtype S,
// then optional SiLU in fp32.  The caller stores (rounds to S) the result.
HF_HOST_DEVICE inline float hf_gn_affine(float x, float m, float a, float s) {
  return hf_add(hf_mul(hf_sub(x, m), a), s);
}

template <typename S>
HF_HOST_DEVICE inline float hf_gn_silu_apply(float x, GnCoef k, bool silu) {
  float y = hf_gn_affine(x, k.m, k.a, k.s);
  if (silu) y = hf_silu(hf_round_to<S>(y));
  return y;
}

}  // namespace hart_fast
