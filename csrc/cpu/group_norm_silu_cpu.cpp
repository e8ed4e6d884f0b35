// CPU implementation of group_norm_silu.
//
// Pass 1 (statistics): fp64 sums of x and x^2 per (batch, channel), then per
// (batch, group) by adding the group's channel sums in channel order.
//   NCHW: a channel is one contiguous row of HW elements; at::parallel_for
//         over the B * C rows, each summed into kLanes independent fp64 lanes
//         (the inner loop over lanes vectorises without reassociating).
//   NHWC: a pixel is a contiguous row of C channels; the pixels of an image
//         are cut into a fixed number of chunks (independent of the thread
//         count, so results do not depend on it), parallel_for over
//         (batch, chunk) accumulates per-channel partial sums, which are then
//         added chunk by chunk in order.
// Pass 2 (elementwise): per-(batch, channel) coefficients m, a, s (shared
// header), then y = silu(round((x - m) * a + s)) over blocks of elements, run as
// separate simple loops so each vectorises.  The SiLU is torch's formula
// x / (1 + exp(-x)) with the shared header's vectorisable hf_exp_poly (~1 ulp;
// torch's CPU kernel uses Sleef's 1-ulp exp, the GPU kernel CUDA's expf).
#include <algorithm>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../group_norm_silu_args.h"
#include "hart_fast/group_norm_silu.h"

namespace hart_fast::cpu {
namespace {

constexpr int kLanes = 8;
constexpr int64_t kBlock = 1024;  // elements per elementwise block (stack buffer)

// The hot loops are templates forced inline into the per-dtype entry points
// below, which GCC compiles twice (target_clones: AVX2 and baseline x86-64)
// and picks between at load time.  The extension thus runs 32-byte vectors
// where the CPU has them without assuming AVX2.  The ISA changes no result:
// every operation is the same correctly rounded IEEE op (no FMA contraction,
// -ffp-contract=off).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HF_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define HF_CPU_CLONES
#endif
#define HF_ALWAYS_INLINE inline __attribute__((always_inline))

template <typename S>
HF_ALWAYS_INLINE void row_sums(const S* __restrict__ x, int64_t n, double* sum_out, double* sq_out) {
  double s[kLanes] = {0};
  double q[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const double v = static_cast<double>(hf_load(x[i + j]));
      s[j] += v;
      q[j] += v * v;
    }
  }
  for (int j = 0; i < n; ++i, ++j) {
    const double v = static_cast<double>(hf_load(x[i]));
    s[j] += v;
    q[j] += v * v;
  }
  double ts = 0.0;
  double tq = 0.0;
  for (int j = 0; j < kLanes; ++j) {
    ts += s[j];
    tq += q[j];
  }
  *sum_out = ts;
  *sq_out = tq;
}

// y[i] = silu(y[i]) in place, n elements.
HF_ALWAYS_INLINE void silu_inplace(float* __restrict__ y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = hf_silu_poly(y[i]);
}

// y[0..m) (normalised, fp32) -> out[0..m): the same steps as
// hf_gn_silu_apply, one loop each so each vectorises.
template <typename S>
HF_ALWAYS_INLINE void finish_block(float* __restrict__ y, S* __restrict__ out, int64_t m, bool silu) {
  if (silu) {
    for (int64_t j = 0; j < m; ++j) y[j] = hf_round_to<S>(y[j]);
    silu_inplace(y, m);
  }
  for (int64_t j = 0; j < m; ++j) out[j] = Storage<S>::store(y[j]);
}

// Normalises n elements x[0..n) of one NCHW channel row (coefficients k0).
template <typename S>
HF_ALWAYS_INLINE void apply_block(const S* __restrict__ x, S* __restrict__ out, int64_t n, GnCoef k0,
                                  bool silu) {
  alignas(64) float y[kBlock];
  for (int64_t base = 0; base < n; base += kBlock) {
    const int64_t m = std::min(kBlock, n - base);
    const S* __restrict__ xb = x + base;
    for (int64_t j = 0; j < m; ++j) y[j] = hf_gn_affine(hf_load(xb[j]), k0.m, k0.a, k0.s);
    finish_block<S>(y, out + base, m, silu);
  }
}

// Per-channel sums of pixels [p0, p1) of one NHWC image xb into s / q (C each).
// Blocks of kSumChannels channels are summed over all the pixels with their
// accumulators in registers (one 64-byte line of each fp32 pixel row per step);
// every channel still adds its pixels in pixel order, so the sums are the
// same bits as a pixel-major loop.
constexpr int64_t kSumChannels = 16;

template <typename S>
HF_ALWAYS_INLINE void nhwc_sums(const S* __restrict__ xb, int64_t C, int64_t p0, int64_t p1,
                                double* __restrict__ s, double* __restrict__ q) {
  // GCC's vectoriser leaves the plain loop scalar (and spills the 32
  // accumulators), so the lanes are spelled out as vectors of 4 doubles: each
  // lane is still one channel's IEEE adds in pixel order.
  typedef double v4d __attribute__((vector_size(32)));
  constexpr int kVecs = kSumChannels / 4;
  int64_t c0 = 0;
  for (; c0 + kSumChannels <= C; c0 += kSumChannels) {
    v4d ls[kVecs], lq[kVecs];
    for (int k = 0; k < kVecs; ++k) {
      for (int j = 0; j < 4; ++j) {
        ls[k][j] = s[c0 + 4 * k + j];
        lq[k][j] = q[c0 + 4 * k + j];
      }
    }
    for (int64_t px = p0; px < p1; ++px) {
      const S* __restrict__ xr = xb + px * C + c0;
      for (int k = 0; k < kVecs; ++k) {
        const v4d v = {static_cast<double>(hf_load(xr[4 * k])), static_cast<double>(hf_load(xr[4 * k + 1])),
                       static_cast<double>(hf_load(xr[4 * k + 2])), static_cast<double>(hf_load(xr[4 * k + 3]))};
        ls[k] += v;
        lq[k] += v * v;
      }
    }
    for (int k = 0; k < kVecs; ++k) {
      for (int j = 0; j < 4; ++j) {
        s[c0 + 4 * k + j] = ls[k][j];
        q[c0 + 4 * k + j] = lq[k][j];
      }
    }
  }
  for (int64_t px = p0; px < p1 && c0 < C; ++px) {  // the last C % kSumChannels channels
    const S* __restrict__ xr = xb + px * C;
    for (int64_t c = c0; c < C; ++c) {
      const double v = static_cast<double>(hf_load(xr[c]));
      s[c] += v;
      q[c] += v * v;
    }
  }
}

template <typename S>
HF_ALWAYS_INLINE void apply_rows_nchw_impl(const S* x, S* out, int64_t hw, const GnCoef* coef,
                                           int64_t begin, int64_t end, bool silu) {
  for (int64_t r = begin; r < end; ++r) {
    apply_block<S>(x + r * hw, out + r * hw, hw, coef[r], silu);
  }
}

// NHWC coefficients of one image as three arrays (m, a, s), each repeated for
// `pixels` consecutive pixels, so a run of whole pixels reads them with unit
// stride (the GnCoef structs' stride of 3 floats stops the vectoriser).
struct TiledCoef {
  const float* m;
  const float* a;
  const float* s;
};

// Normalises n elements (whole pixels of one image, n <= the tiled length).
template <typename S>
HF_ALWAYS_INLINE void apply_pixels(const S* __restrict__ x, S* __restrict__ out, int64_t n,
                                   TiledCoef k, bool silu) {
  alignas(64) float y[kBlock];
  for (int64_t base = 0; base < n; base += kBlock) {  // one pass unless C > kBlock
    const int64_t m = std::min(kBlock, n - base);
    const S* __restrict__ xb = x + base;
    const float* __restrict__ km = k.m + base;
    const float* __restrict__ ka = k.a + base;
    const float* __restrict__ ks = k.s + base;
    for (int64_t j = 0; j < m; ++j) y[j] = hf_gn_affine(hf_load(xb[j]), km[j], ka[j], ks[j]);
    finish_block<S>(y, out + base, m, silu);
  }
}

// Pixel rows [begin, end) of B * HW, in runs of at most `pixels` pixels of one
// image; tiled holds 3 * pixels * C floats per image (m, a, s).
template <typename S>
HF_ALWAYS_INLINE void apply_rows_nhwc_impl(const S* x, S* out, int64_t C, int64_t hw,
                                           const float* tiled, int64_t pixels, int64_t begin,
                                           int64_t end, bool silu) {
  const int64_t len = pixels * C;
  for (int64_t r = begin; r < end;) {
    const int64_t b = r / hw;
    const int64_t n = std::min({pixels, end - r, (b + 1) * hw - r});
    const float* t = tiled + b * 3 * len;
    apply_pixels<S>(x + r * C, out + r * C, n * C, TiledCoef{t, t + len, t + 2 * len}, silu);
    r += n;
  }
}

// Cloned, non-template entry points, one overload per storage type.
#define HF_GN_ENTRY_POINTS(S)                                                                  \
  HF_CPU_CLONES void sum_rows(const S* x, int64_t hw, double* sums, int64_t begin,            \
                              int64_t end) {                                                   \
    for (int64_t r = begin; r < end; ++r) row_sums(x + r * hw, hw, &sums[2 * r], &sums[2 * r + 1]); \
  }                                                                                            \
  HF_CPU_CLONES void sum_pixels(const S* xb, int64_t C, int64_t p0, int64_t p1, double* s,    \
                                double* q) {                                                   \
    nhwc_sums(xb, C, p0, p1, s, q);                                                            \
  }                                                                                            \
  HF_CPU_CLONES void apply_rows_nchw(const S* x, S* out, int64_t hw, const GnCoef* coef,      \
                                     int64_t begin, int64_t end, bool silu) {                  \
    apply_rows_nchw_impl(x, out, hw, coef, begin, end, silu);                                  \
  }                                                                                            \
  HF_CPU_CLONES void apply_rows_nhwc(const S* x, S* out, int64_t C, int64_t hw,               \
                                     const float* tiled, int64_t pixels, int64_t begin,        \
                                     int64_t end, bool silu) {                                 \
    apply_rows_nhwc_impl(x, out, C, hw, tiled, pixels, begin, end, silu);                      \
  }
HF_GN_ENTRY_POINTS(float)
HF_GN_ENTRY_POINTS(half_t)
HF_GN_ENTRY_POINTS(bf16_t)
#undef HF_GN_ENTRY_POINTS

// Per-(batch, channel) fp64 sums of x and x^2; sums has 2 * B * C entries
// (sum, sum_sq interleaved).
template <typename S>
void channel_sums(const GroupNormSiluParams& p, std::vector<double>& sums) {
  const S* x = static_cast<const S*>(p.x);
  const int64_t B = p.batch, C = p.channels, HW = p.hw;
  sums.assign(static_cast<size_t>(2 * B * C), 0.0);
  if (!p.channels_last) {
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(HW, 1));
    at::parallel_for(0, B * C, grain, [&](int64_t begin, int64_t end) {
      sum_rows(x, HW, sums.data(), begin, end);
    });
    return;
  }
  const int64_t chunks = std::min<int64_t>(64, std::max<int64_t>(1, HW / 64));
  const int64_t per_chunk = (HW + chunks - 1) / chunks;
  std::vector<double> part(static_cast<size_t>(B * chunks * 2 * C), 0.0);
  at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / chunks, k = t % chunks;
      const int64_t p0 = k * per_chunk, p1 = std::min(HW, p0 + per_chunk);
      double* s = &part[static_cast<size_t>(t * 2 * C)];
      sum_pixels(x + b * HW * C, C, p0, p1, s, s + C);
    }
  });
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t k = 0; k < chunks; ++k) {
      const double* s = &part[static_cast<size_t>((b * chunks + k) * 2 * C)];
      for (int64_t c = 0; c < C; ++c) {
        sums[2 * (b * C + c)] += s[c];
        sums[2 * (b * C + c) + 1] += s[C + c];
      }
    }
  }
}

template <typename S>
void run_typed(const GroupNormSiluParams& p) {
  const int64_t B = p.batch, C = p.channels, HW = p.hw, G = p.groups;
  const int64_t D = C / G;
  std::vector<double> sums;
  channel_sums<S>(p, sums);

  // Group moments -> per-(batch, channel) coefficients.
  std::vector<GnCoef> coef(static_cast<size_t>(B * C));
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t g = 0; g < G; ++g) {
      double s = 0.0, q = 0.0;
      for (int64_t c = g * D; c < (g + 1) * D; ++c) {
        s += sums[2 * (b * C + c)];
        q += sums[2 * (b * C + c) + 1];
      }
      float mean = 0.0f, rstd = 0.0f;
      hf_gn_moments(s, q, D * HW, p.eps, &mean, &rstd);
      for (int64_t c = g * D; c < (g + 1) * D; ++c) {
        coef[b * C + c] = hf_gn_coeffs(mean, rstd, p.weight, p.bias, c);
      }
    }
  }

  const S* x = static_cast<const S*>(p.x);
  S* out = static_cast<S*>(p.out);
  if (!p.channels_last) {
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(HW, 1));
    at::parallel_for(0, B * C, grain, [&](int64_t begin, int64_t end) {
      apply_rows_nchw(x, out, HW, coef.data(), begin, end, p.silu);
    });
    return;
  }
  // NHWC: runs of whole pixels of one image, up to kBlock elements (one pixel,
  // in kBlock pieces, when C > kBlock).
  const int64_t pixels = std::max<int64_t>(1, kBlock / C);
  const int64_t len = pixels * C;
  std::vector<float> tiled(static_cast<size_t>(B * 3 * len));
  for (int64_t b = 0; b < B; ++b) {
    float* t = &tiled[static_cast<size_t>(b * 3 * len)];
    for (int64_t i = 0; i < len; ++i) {
      const GnCoef& k = coef[b * C + i % C];
      t[i] = k.m;
      t[len + i] = k.a;
      t[2 * len + i] = k.s;
    }
  }
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / C);
  at::parallel_for(0, B * HW, grain, [&](int64_t begin, int64_t end) {
    apply_rows_nhwc(x, out, C, HW, tiled.data(), pixels, begin, end, p.silu);
  });
}

}  // namespace

void group_norm_silu(const GroupNormSiluParams& p) {
  if (p.batch * p.channels * p.hw <= 0) return;
  switch (p.dtype) {
    case DType::kFloat32:
      run_typed<float>(p);
      break;
    case DType::kFloat16:
      run_typed<half_t>(p);
      break;
    case DType::kBFloat16:
      run_typed<bf16_t>(p);
      break;
  }
}

}  // namespace hart_fast::cpu

namespace hart_fast::ops {
namespace {

at::Tensor group_norm_silu_cpu(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, int64_t groups, double eps,
                               bool silu) {
  GroupNormSiluArgs a = prepare_group_norm_silu(x, weight, bias, groups, eps, silu);
  cpu::group_norm_silu(a.params);
  return a.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hart_fast, CPU, m) { m.impl("group_norm_silu", &group_norm_silu_cpu); }

}  // namespace hart_fast::ops
