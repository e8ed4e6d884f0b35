// Per-element math of the VQ glue between HART's AR stages (bicubic
// upsample, area downsample, phi blend) and of the fused IDDPM update,
// shared by csrc/cpu/vq_glue_cpu.cpp and csrc/cuda/vq_glue_kernel.cu.
//
// Every operation is an explicitly rounded fp32 op (numerics.h), so the CPU
// build (compiled with -ffp-contract=off) and the CUDA build give identical
// bits for identical inputs.
#pragma once

#include <cmath>
#include <cstdint>

#include "hart_fast/macros.h"
#include "hart_fast/numerics.h"

namespace hart_fast {

// ---------------------------------------------------------------------------
// Bicubic (F.interpolate(mode="bicubic", align_corners=False), size given).
// ---------------------------------------------------------------------------

// The four source indices (clamped to [0, in - 1]) and weights of one output
// coordinate along one axis.
struct CubicTaps {
  int64_t idx[4];
  float w[4];
};

HF_HOST_DEVICE inline float hf_floor(float v) {
#if defined(__CUDA_ARCH__)
  return floorf(v);
#else
  return std::floor(v);
#endif
}

// PyTorch's cubic convolution kernels with A = -0.75, same association:
//   |x| <= 1: ((A + 2) x - (A + 3)) x x + 1
//   1 < |x| < 2: ((A x - 5A) x + 8A) x - 4A
HF_HOST_DEVICE inline float hf_cubic_conv1(float x) {
  const float A = -0.75f;
  return hf_add(hf_mul(hf_mul(hf_sub(hf_mul(hf_add(A, 2.0f), x), hf_add(A, 3.0f)), x), x), 1.0f);
}
HF_HOST_DEVICE inline float hf_cubic_conv2(float x) {
  const float A = -0.75f;
  return hf_sub(
      hf_mul(hf_add(hf_mul(hf_sub(hf_mul(A, x), hf_mul(5.0f, A)), x), hf_mul(8.0f, A)), x),
      hf_mul(4.0f, A));
}

// Taps of output coordinate `dst` for an axis resized from `in` to `out`.
// scale = float(in) / out (PyTorch: input_size as opmath_t / output_size);
// real index = scale * (dst + 0.5) - 0.5, NOT clamped at 0 for cubic; the
// integer part is floor(real) capped at in - 1 and t = clamp(real - idx, 0, 1).
HF_HOST_DEVICE inline CubicTaps hf_cubic_taps(int64_t dst, int64_t in, int64_t out) {
  const float scale = hf_div(static_cast<float>(in), static_cast<float>(out));
  const float real = hf_sub(hf_mul(scale, hf_add(static_cast<float>(dst), 0.5f)), 0.5f);
  int64_t i0 = static_cast<int64_t>(hf_floor(real));
  if (i0 > in - 1) i0 = in - 1;
  float t = hf_sub(real, static_cast<float>(i0));
  t = t < 0.0f ? 0.0f : (t > 1.0f ? 1.0f : t);
  CubicTaps taps;
  taps.w[0] = hf_cubic_conv2(hf_add(t, 1.0f));
  taps.w[1] = hf_cubic_conv1(t);
  const float t2 = hf_sub(1.0f, t);
  taps.w[2] = hf_cubic_conv1(t2);
  taps.w[3] = hf_cubic_conv2(hf_add(t2, 1.0f));
  for (int j = 0; j < 4; ++j) {
    int64_t k = i0 + j - 1;
    k = k < 0 ? 0 : (k > in - 1 ? in - 1 : k);
    taps.idx[j] = k;
  }
  return taps;
}

// ((v0 w0 + v1 w1) + v2 w2) + v3 w3, each op rounded (PyTorch's order).
HF_HOST_DEVICE inline float hf_cubic_combine(float v0, float v1, float v2, float v3,
                                             const float* w) {
  float acc = hf_mul(v0, w[0]);
  acc = hf_add(acc, hf_mul(v1, w[1]));
  acc = hf_add(acc, hf_mul(v2, w[2]));
  return hf_add(acc, hf_mul(v3, w[3]));
}

// ---------------------------------------------------------------------------
// Area downsample == adaptive_avg_pool2d: window [floor(i*in/out),
// ceil((i+1)*in/out)), fp32 sum row by row, then sum / kh / kw.
// ---------------------------------------------------------------------------
HF_HOST_DEVICE inline int64_t hf_area_start(int64_t i, int64_t out, int64_t in) {
  return (i * in) / out;
}
HF_HOST_DEVICE inline int64_t hf_area_end(int64_t i, int64_t out, int64_t in) {
  return ((i + 1) * in + out - 1) / out;
}
HF_HOST_DEVICE inline float hf_area_average(float sum, int64_t kh, int64_t kw) {
  return hf_div(hf_div(sum, static_cast<float>(kh)), static_cast<float>(kw));
}

// ---------------------------------------------------------------------------
// Phi blend: f_hat += round_S(round_S(up * (1 - r)) + round_S(conv * r)).
// The reference evaluates `h.mul(1 - r) + conv(h).mul_(r)` in h's dtype S and
// then `f_hat.add_(...)` in fp32.  one_minus_r / r are the Python scalars
// rounded to float once (how torch applies a double scalar to a float tensor).
// ---------------------------------------------------------------------------
template <typename S>
HF_HOST_DEVICE inline float hf_phi_blend_accumulate(float f, float up, float conv,
                                                    float one_minus_r, float r) {
  const float a = hf_round_to<S>(hf_mul(up, one_minus_r));
  const float b = hf_round_to<S>(hf_mul(conv, r));
  return hf_add(f, hf_round_to<S>(hf_add(a, b)));
}

// ---------------------------------------------------------------------------
// IDDPM p_sample update (hart_fast/model/diffusion.py::iddpm_step).
// ---------------------------------------------------------------------------
struct IddpmScalars {
  float one_plus_cfg = 1.0f;  // float(1 + cfg)
  float cfg = 0.0f;           // float(cfg)
  float recip = 0.0f;         // sqrt_recip_alphas_cumprod[s]
  float recipm1 = 0.0f;       // sqrt_recipm1_alphas_cumprod[s]
  float coef1 = 0.0f;         // posterior_mean_coef1[s]
  float coef2 = 0.0f;         // posterior_mean_coef2[s]
  float min_log = 0.0f;       // posterior_log_variance_clipped[s]
  float max_log = 0.0f;       // log_betas[s]
  float nonzero = 0.0f;       // 1 if s != 0 else 0
  float temperature = 1.0f;
  bool guided = false;
};

HF_HOST_DEVICE inline float hf_expf(float v) {
#if defined(__CUDA_ARCH__)
  return expf(v);  // CUDA's IEEE-mode expf (<= 2 ulp; never __expf)
#else
  return std::exp(v);
#endif
}

// eps_c, eps_u: conditional / unconditional eps; var: conditional variance
// interpolation value.  Association exactly as the reference:
//   eps   = eps_c * (1 + cfg) - cfg * eps_u                 (guided)
//   frac  = (v + 1) / 2
//   lv    = frac * max_log + (1 - frac) * min_log
//   x0    = clamp(recip * x - recipm1 * eps, -1, 1)
//   mean  = coef1 * x0 + coef2 * x
//   out   = mean + ((nonzero * exp(0.5 * lv)) * noise) * temperature
HF_HOST_DEVICE inline float hf_iddpm_update(float x, float eps_c, float eps_u, float var,
                                            float noise, const IddpmScalars& s) {
  const float eps =
      s.guided ? hf_sub(hf_mul(eps_c, s.one_plus_cfg), hf_mul(s.cfg, eps_u)) : eps_c;
  const float frac = hf_div(hf_add(var, 1.0f), 2.0f);
  const float log_var =
      hf_add(hf_mul(frac, s.max_log), hf_mul(hf_sub(1.0f, frac), s.min_log));
  float x0 = hf_sub(hf_mul(s.recip, x), hf_mul(s.recipm1, eps));
  // torch.clamp propagates NaN: comparisons with NaN are false, keeping x0.
  x0 = x0 < -1.0f ? -1.0f : (x0 > 1.0f ? 1.0f : x0);
  const float mean = hf_add(hf_mul(s.coef1, x0), hf_mul(s.coef2, x));
  const float sd = hf_expf(hf_mul(0.5f, log_var));
  const float term = hf_mul(hf_mul(hf_mul(s.nonzero, sd), noise), s.temperature);
  return hf_add(mean, term);
}

}  // namespace hart_fast
