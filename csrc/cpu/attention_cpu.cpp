// CPU implementations of qkv_rope_cache, ms_attention,
// ms_attention_block_causal and cfg_top_k_filter.
//
// Attention is a tiled online softmax (flash-attention's recurrence) run by
// at::parallel_for over (b, h, query block) tasks.  Inside a task a block of
// up to kQBlock queries is held in fp32 and the keys are visited in tiles of
// kKBlock: the tile of K is transposed into fp32 so the score loop runs over
// contiguous keys (it vectorises without reassociating any sum), then the
// running max / sum / accumulator are updated once per tile.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HF_X86_AVX2_KERNELS 1
#else
#define HF_X86_AVX2_KERNELS 0
#endif
#include <functional>
#include <limits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "../attention_args.h"
#include "hart_fast/attention.h"

namespace hart_fast::cpu {
namespace {

constexpr int64_t kQBlock = 32;
constexpr int64_t kKBlock = 64;

// ----------------------------------------------------------------------------
// qkv_rope_cache
// ----------------------------------------------------------------------------
template <typename S>
void qkv_rope_rows(const QkvRopeParams& p, int64_t begin, int64_t end) {
  const int64_t H = p.H, d = p.d, half = d / 2, l = p.l;
  const S* qkv = static_cast<const S*>(p.qkv);
  const S* bias = static_cast<const S*>(p.bias);
  std::vector<float> buf(static_cast<size_t>(d));
  float* x = buf.data();
  // Row index r = (b * l + i) * H + h: one head of one token.
  for (int64_t r = begin; r < end; ++r) {
    const int64_t h = r % H;
    const int64_t bi = r / H;
    const int64_t i = bi % l, b = bi / l;
    const float* cos = p.cos + b * p.rope_b_stride + i * d;
    const float* sin = p.sin + b * p.rope_b_stride + i * d;
    for (int which = 0; which < 3; ++which) {  // q, k, v
      const int64_t off = (which * H + h) * d;
      const S* src = qkv + bi * 3 * H * d + off;
      for (int64_t c = 0; c < d; ++c) {
        x[c] = hf_load(src[c]);
        if (bias != nullptr) x[c] = hf_round_to<S>(hf_add(x[c], hf_load(bias[off + c])));
      }
      S* dst;
      if (which == 0) {
        dst = static_cast<S*>(p.q_out) + ((b * H + h) * l + i) * d;
      } else {
        const int64_t* st = which == 1 ? p.kc_strides : p.vc_strides;
        S* cache = static_cast<S*>(which == 1 ? p.k_cache : p.v_cache);
        dst = cache + b * st[0] + h * st[1] + (p.start + i) * st[2];
      }
      if (which == 2) {  // v: bias only
        for (int64_t c = 0; c < d; ++c) dst[c] = Storage<S>::store(x[c]);
        continue;
      }
      if (p.scale_mul != nullptr) {
        float sq = 0.0f;
        for (int64_t c = 0; c < d; ++c) sq = hf_add(sq, hf_mul(x[c], x[c]));
        const float den = hf_l2_denominator<S>(sq);
        for (int64_t c = 0; c < d; ++c) x[c] = hf_l2_normalize<S>(x[c], den);
        if (which == 0) {
          const float s = p.scale_mul[h];
          for (int64_t c = 0; c < d; ++c) x[c] = hf_scale_mul<S>(x[c], s);
        }
      }
      for (int64_t c = 0; c < half; ++c) {
        float y1, y2;
        hf_rope_pair<S>(x[c], x[c + half], cos[c], sin[c], cos[c + half], sin[c + half], &y1, &y2);
        dst[c] = Storage<S>::store(y1);
        dst[c + half] = Storage<S>::store(y2);
      }
    }
  }
}

// ----------------------------------------------------------------------------
// attention
// ----------------------------------------------------------------------------

#if HF_X86_AVX2_KERNELS
// AVX2 + FMA micro-kernels of the attention tile (selected at run time, see
// attention_task).  Four queries share every load of the K / V tile; the
// accumulators live in registers across the head-dim (scores) or key (p.v)
// loop, which the auto-vectoriser did not manage (it kept them in memory).
__attribute__((target("avx2,fma"))) inline void scores4_avx2(const float* q0, const float* q1,
                                                             const float* q2, const float* q3,
                                                             const float* kt, int D, int64_t nk,
                                                             float* s0, float* s1, float* s2,
                                                             float* s3) {
  // kt: (D, kKBlock) row-major, zero padded up to kKBlock keys.  Two 8-key
  // vectors per step give 8 independent FMA chains (FMA latency x throughput).
  for (int64_t j = 0; j < nk; j += 16) {
    __m256 r0 = _mm256_setzero_ps(), r1 = _mm256_setzero_ps();
    __m256 r2 = _mm256_setzero_ps(), r3 = _mm256_setzero_ps();
    __m256 t0 = _mm256_setzero_ps(), t1 = _mm256_setzero_ps();
    __m256 t2 = _mm256_setzero_ps(), t3 = _mm256_setzero_ps();
    for (int c = 0; c < D; ++c) {
      const __m256 kv = _mm256_load_ps(kt + c * kKBlock + j);
      const __m256 kw = _mm256_load_ps(kt + c * kKBlock + j + 8);
      const __m256 b0 = _mm256_broadcast_ss(q0 + c), b1 = _mm256_broadcast_ss(q1 + c);
      const __m256 b2 = _mm256_broadcast_ss(q2 + c), b3 = _mm256_broadcast_ss(q3 + c);
      r0 = _mm256_fmadd_ps(b0, kv, r0);
      r1 = _mm256_fmadd_ps(b1, kv, r1);
      r2 = _mm256_fmadd_ps(b2, kv, r2);
      r3 = _mm256_fmadd_ps(b3, kv, r3);
      t0 = _mm256_fmadd_ps(b0, kw, t0);
      t1 = _mm256_fmadd_ps(b1, kw, t1);
      t2 = _mm256_fmadd_ps(b2, kw, t2);
      t3 = _mm256_fmadd_ps(b3, kw, t3);
    }
    _mm256_storeu_ps(s0 + j, r0);
    _mm256_storeu_ps(s1 + j, r1);
    _mm256_storeu_ps(s2 + j, r2);
    _mm256_storeu_ps(s3 + j, r3);
    _mm256_storeu_ps(s0 + j + 8, t0);
    _mm256_storeu_ps(s1 + j + 8, t1);
    _mm256_storeu_ps(s2 + j + 8, t2);
    _mm256_storeu_ps(s3 + j + 8, t3);
  }
}

__attribute__((target("avx2,fma"))) inline void pv4_avx2(const float* p0, const float* p1,
                                                         const float* p2, const float* p3,
                                                         const float* vt, int D, int64_t nk,
                                                         float* a0, float* a1, float* a2,
                                                         float* a3) {
  // vt: (kKBlock, D) row-major; a*: D accumulators each (D % 16 == 0).  Two
  // 8-dim vectors per step: 8 independent FMA chains.
  for (int c = 0; c < D; c += 16) {
    __m256 r0 = _mm256_load_ps(a0 + c), r1 = _mm256_load_ps(a1 + c);
    __m256 r2 = _mm256_load_ps(a2 + c), r3 = _mm256_load_ps(a3 + c);
    __m256 t0 = _mm256_load_ps(a0 + c + 8), t1 = _mm256_load_ps(a1 + c + 8);
    __m256 t2 = _mm256_load_ps(a2 + c + 8), t3 = _mm256_load_ps(a3 + c + 8);
    for (int64_t j = 0; j < nk; ++j) {
      const __m256 vv = _mm256_load_ps(vt + j * D + c);
      const __m256 vw = _mm256_load_ps(vt + j * D + c + 8);
      const __m256 b0 = _mm256_broadcast_ss(p0 + j), b1 = _mm256_broadcast_ss(p1 + j);
      const __m256 b2 = _mm256_broadcast_ss(p2 + j), b3 = _mm256_broadcast_ss(p3 + j);
      r0 = _mm256_fmadd_ps(b0, vv, r0);
      r1 = _mm256_fmadd_ps(b1, vv, r1);
      r2 = _mm256_fmadd_ps(b2, vv, r2);
      r3 = _mm256_fmadd_ps(b3, vv, r3);
      t0 = _mm256_fmadd_ps(b0, vw, t0);
      t1 = _mm256_fmadd_ps(b1, vw, t1);
      t2 = _mm256_fmadd_ps(b2, vw, t2);
      t3 = _mm256_fmadd_ps(b3, vw, t3);
    }
    _mm256_store_ps(a0 + c, r0);
    _mm256_store_ps(a1 + c, r1);
    _mm256_store_ps(a2 + c, r2);
    _mm256_store_ps(a3 + c, r3);
    _mm256_store_ps(a0 + c + 8, t0);
    _mm256_store_ps(a1 + c + 8, t1);
    _mm256_store_ps(a2 + c + 8, t2);
    _mm256_store_ps(a3 + c + 8, t3);
  }
}
#endif

// a * b + c: one fused operation in the AVX2/FMA build (attention needs no
// bit-faithfulness, only fp32 accumulation), two roundings otherwise.
template <bool kFma>
__attribute__((always_inline)) inline float madd(float a, float b, float c) {
  if constexpr (kFma) {
    return __builtin_fmaf(a, b, c);
  } else {
    return c + a * b;
  }
}


// 2^x for x <= 0 in the softmax loop, written so that the loop vectorises
// (std::exp2 is a scalar libm call, which dominated the CPU kernel).  Range
// reduction x = n + f, |f| <= 1/2, then a degree-7 Taylor polynomial of
// e^(f ln 2) (truncation error < 1e-8 relative, below fp32 rounding) scaled
// by 2^n through the exponent bits.  Inputs below -126 flush to 2^-126 * p,
// i.e. ~1e-38 instead of 0, which is invisible next to the row sum (>= 1).
__attribute__((always_inline)) inline float exp2_poly(float x) {
  x = std::max(x, -126.0f);
  const float n = std::floor(x + 0.5f);
  const float f = x - n;
  float p = 1.525273380405984e-05f;
  p = p * f + 1.5403530393381606e-04f;
  p = p * f + 1.3333558146428443e-03f;
  p = p * f + 9.618129107628477e-03f;
  p = p * f + 5.550410866482158e-02f;
  p = p * f + 2.402265069591007e-01f;
  p = p * f + 6.931471805599453e-01f;
  p = p * f + 1.0f;
  const int32_t e = static_cast<int32_t>(n) + 127;
  float scale;
  const uint32_t bits = static_cast<uint32_t>(e) << 23;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

#if HF_X86_AVX2_KERNELS
// Softmax pieces of one score row: s *= mult and the row max; then
// s = 2^(s - ref) and the row sum.  Vector versions of the scalar loops in
// attention_task_body (those stayed scalar: float max / sum reductions and the
// exp2 polynomial's conversions were not auto-vectorised).
__attribute__((target("avx2,fma"))) inline float scale_max_avx2(float* s, int64_t n, float mult) {
  const __m256 vm = _mm256_set1_ps(mult);
  __m256 mx = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(s + j), vm);
    _mm256_storeu_ps(s + j, v);
    mx = _mm256_max_ps(mx, v);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, mx);
  float m = lanes[0];
  for (int t = 1; t < 8; ++t) m = std::max(m, lanes[t]);
  for (; j < n; ++j) {
    s[j] *= mult;
    m = std::max(m, s[j]);
  }
  return m;
}

__attribute__((target("avx2,fma"))) inline __m256 exp2_avx2(__m256 x) {
  // Same reduction and polynomial as exp2_poly, 8 lanes at a time.
  x = _mm256_max_ps(x, _mm256_set1_ps(-126.0f));
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(x, n);
  __m256 p = _mm256_set1_ps(1.525273380405984e-05f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.5403530393381606e-04f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428443e-03f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618129107628477e-03f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550410866482158e-02f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402265069591007e-01f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931471805599453e-01f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

__attribute__((target("avx2,fma"))) inline float exp2_sum_avx2(float* s, int64_t n, float ref) {
  const __m256 vr = _mm256_set1_ps(ref);
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 v = exp2_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + j), vr));
    _mm256_storeu_ps(s + j, v);
    acc = _mm256_add_ps(acc, v);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  float sum = 0.0f;
  for (int t = 0; t < 8; ++t) sum += lanes[t];
  for (; j < n; ++j) {
    s[j] = exp2_poly(s[j] - ref);
    sum += s[j];
  }
  return sum;
}
#endif

template <typename S, int D, bool kFma>
__attribute__((always_inline)) inline void attention_task_body(const AttnParams& p, int64_t b,
                                                               int64_t h, int64_t q0, int64_t q1) {
  const int64_t nq = q1 - q0;
  alignas(64) float qf[kQBlock][D];
  alignas(64) float acc[kQBlock][D];
  alignas(64) float kt[D][kKBlock];  // K tile transposed: kt[c][j]
  alignas(64) float vt[kKBlock][D];
  alignas(64) float s[kQBlock][kKBlock];
  float m[kQBlock], lsum[kQBlock];
  int64_t qend[kQBlock];
  const float mult = hf_mul(p.scale, kLog2e);
  const float neg_inf = -std::numeric_limits<float>::infinity();

  const S* qb = static_cast<const S*>(p.q) + b * p.q_strides[0] + h * p.q_strides[1];
  const S* kb = static_cast<const S*>(p.k) + b * p.k_strides[0] + h * p.k_strides[1];
  const S* vb = static_cast<const S*>(p.v) + b * p.v_strides[0] + h * p.v_strides[1];
  int64_t kv_max = 0;
  for (int64_t i = 0; i < nq; ++i) {
    const S* qr = qb + (q0 + i) * p.q_strides[2];
    for (int c = 0; c < D; ++c) {
      qf[i][c] = hf_load(qr[c]);
      acc[i][c] = 0.0f;
    }
    m[i] = neg_inf;
    lsum[i] = 0.0f;
    qend[i] = p.kv_end != nullptr ? std::min(p.kv_end[q0 + i], p.kv_len) : p.kv_len;
    kv_max = std::max(kv_max, qend[i]);
  }

  // Rows nq..nq_pad-1 are zero padding so the score and p.v loops can run in
  // groups of four queries that share every load of the K / V tile.
  // One query (the first stages and most of decoding) runs unpadded.
  const int64_t nq_pad = nq == 1 ? 1 : (nq + 3) / 4 * 4;
  for (int64_t i = nq; i < nq_pad; ++i) {
    for (int c = 0; c < D; ++c) {
      qf[i][c] = 0.0f;
      acc[i][c] = 0.0f;
    }
    m[i] = neg_inf;
    lsum[i] = 0.0f;
    qend[i] = 0;
  }

  for (int64_t j0 = 0; j0 < kv_max; j0 += kKBlock) {
    const int64_t nk = std::min(kKBlock, kv_max - j0);
    for (int64_t j = 0; j < nk; ++j) {
      const S* kr = kb + (j0 + j) * p.k_strides[2];
      const S* vr = vb + (j0 + j) * p.v_strides[2];
      for (int c = 0; c < D; ++c) {
        kt[c][j] = hf_load(kr[c]);
        vt[j][c] = hf_load(vr[c]);
      }
    }
    for (int c = 0; c < D; ++c) {
      for (int64_t j = nk; j < kKBlock; ++j) kt[c][j] = 0.0f;  // the micro-kernels read whole 16-key blocks
    }
    if (nq_pad == 1) {
      float* __restrict__ s0 = s[0];
      for (int64_t j = 0; j < nk; ++j) s0[j] = 0.0f;
      for (int c = 0; c < D; ++c) {
        const float a0 = qf[0][c];
        const float* __restrict__ kc = kt[c];
        for (int64_t j = 0; j < nk; ++j) s0[j] = madd<kFma>(a0, kc[j], s0[j]);
      }
    }
    for (int64_t i = 0; i + 4 <= nq_pad; i += 4) {
#if HF_X86_AVX2_KERNELS
      if constexpr (kFma) {
        scores4_avx2(qf[i], qf[i + 1], qf[i + 2], qf[i + 3], &kt[0][0], D, nk, s[i], s[i + 1],
                     s[i + 2], s[i + 3]);
        continue;
      }
#endif
      float* __restrict__ s0 = s[i];
      float* __restrict__ s1 = s[i + 1];
      float* __restrict__ s2 = s[i + 2];
      float* __restrict__ s3 = s[i + 3];
      for (int64_t j = 0; j < nk; ++j) s0[j] = s1[j] = s2[j] = s3[j] = 0.0f;
      for (int c = 0; c < D; ++c) {
        const float a0 = qf[i][c], a1 = qf[i + 1][c], a2 = qf[i + 2][c], a3 = qf[i + 3][c];
        const float* __restrict__ kc = kt[c];
        for (int64_t j = 0; j < nk; ++j) {
          const float kv = kc[j];
          s0[j] = madd<kFma>(a0, kv, s0[j]);
          s1[j] = madd<kFma>(a1, kv, s1[j]);
          s2[j] = madd<kFma>(a2, kv, s2[j]);
          s3[j] = madd<kFma>(a3, kv, s3[j]);
        }
      }
    }
    for (int64_t i = 0; i < nq_pad; ++i) {
      float* si = s[i];
      const int64_t valid = std::min<int64_t>(nk, std::max<int64_t>(qend[i] - j0, 0));
      float tile_max = neg_inf;
#if HF_X86_AVX2_KERNELS
      if constexpr (kFma) {
        tile_max = scale_max_avx2(si, valid, mult);
      } else
#endif
      {
        for (int64_t j = 0; j < valid; ++j) {
          si[j] *= mult;
          tile_max = std::max(tile_max, si[j]);
        }
      }
      for (int64_t j = valid; j < nk; ++j) si[j] = 0.0f;  // masked: p = 0
      if (valid == 0) continue;
      const float m_new = std::max(m[i], tile_max);
      const float ref = hf_safe_max(m_new);
      const float corr = std::exp2(m[i] - ref);  // 0 when m[i] == -inf
      float psum = 0.0f;
#if HF_X86_AVX2_KERNELS
      if constexpr (kFma) {
        psum = exp2_sum_avx2(si, valid, ref);
      } else
#endif
      {
        for (int64_t j = 0; j < valid; ++j) si[j] = exp2_poly(si[j] - ref);
        for (int64_t j = 0; j < valid; ++j) psum += si[j];
      }
      lsum[i] = lsum[i] * corr + psum;
      m[i] = m_new;
      for (int c = 0; c < D; ++c) acc[i][c] *= corr;
    }
    if (nq_pad == 1) {
      float* __restrict__ a0 = acc[0];
      for (int64_t j = 0; j < nk; ++j) {
        const float p0 = s[0][j];
        const float* __restrict__ vj = vt[j];
        for (int c = 0; c < D; ++c) a0[c] = madd<kFma>(p0, vj[c], a0[c]);
      }
    }
    for (int64_t i = 0; i + 4 <= nq_pad; i += 4) {
#if HF_X86_AVX2_KERNELS
      if constexpr (kFma) {
        pv4_avx2(s[i], s[i + 1], s[i + 2], s[i + 3], &vt[0][0], D, nk, acc[i], acc[i + 1],
                 acc[i + 2], acc[i + 3]);
        continue;
      }
#endif
      float* __restrict__ a0 = acc[i];
      float* __restrict__ a1 = acc[i + 1];
      float* __restrict__ a2 = acc[i + 2];
      float* __restrict__ a3 = acc[i + 3];
      for (int64_t j = 0; j < nk; ++j) {
        const float p0 = s[i][j], p1 = s[i + 1][j], p2 = s[i + 2][j], p3 = s[i + 3][j];
        const float* __restrict__ vj = vt[j];
        for (int c = 0; c < D; ++c) {
          const float vv = vj[c];
          a0[c] = madd<kFma>(p0, vv, a0[c]);
          a1[c] = madd<kFma>(p1, vv, a1[c]);
          a2[c] = madd<kFma>(p2, vv, a2[c]);
          a3[c] = madd<kFma>(p3, vv, a3[c]);
        }
      }
    }
  }
  S* out = static_cast<S*>(p.out);
  for (int64_t i = 0; i < nq; ++i) {
    S* orow = out + ((b * p.lq + q0 + i) * p.H + h) * D;
    const float inv = lsum[i] > 0.0f ? 1.0f / lsum[i] : 0.0f;
    for (int c = 0; c < D; ++c) orow[c] = Storage<S>::store(acc[i][c] * inv);
  }
}

// The extension is built for baseline x86-64 (SSE2); the hot loops get an
// AVX2 + FMA clone selected at run time.
#if defined(__x86_64__) && defined(__GNUC__)
#define HF_HAVE_AVX2_CLONE 1
template <typename S, int D>
__attribute__((target("avx2,fma"))) void attention_task_avx2(const AttnParams& p, int64_t b,
                                                             int64_t h, int64_t q0, int64_t q1) {
  attention_task_body<S, D, true>(p, b, h, q0, q1);
}
bool cpu_has_avx2_fma() {
  // HART_FAST_CPU_NO_AVX2=1 forces the portable loops (used to test them).
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         std::getenv("HART_FAST_CPU_NO_AVX2") == nullptr;
  return ok;
}
#else
#define HF_HAVE_AVX2_CLONE 0
#endif

template <typename S, int D>
void attention_task(const AttnParams& p, int64_t b, int64_t h, int64_t q0, int64_t q1) {
#if HF_HAVE_AVX2_CLONE
  if (cpu_has_avx2_fma()) {
    attention_task_avx2<S, D>(p, b, h, q0, q1);
    return;
  }
#endif
  attention_task_body<S, D, false>(p, b, h, q0, q1);
}

template <typename S, int D>
void attention_typed(const AttnParams& p) {
  const int64_t qblocks = (p.lq + kQBlock - 1) / kQBlock;
  const int64_t tasks = p.B * p.H * qblocks;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t qb = t % qblocks;
      const int64_t bh = t / qblocks;
      const int64_t q0 = qb * kQBlock;
      attention_task<S, D>(p, bh / p.H, bh % p.H, q0, std::min(p.lq, q0 + kQBlock));
    }
  });
}

template <typename S>
void attention_dispatch_d(const AttnParams& p) {
  switch (p.d) {
    case 16: attention_typed<S, 16>(p); break;
    case 32: attention_typed<S, 32>(p); break;
    case 64: attention_typed<S, 64>(p); break;
    case 128: attention_typed<S, 128>(p); break;
    default: break;  // rejected by the argument checks
  }
}

void attention(const AttnParams& p) {
  if (p.B * p.H * p.lq == 0) return;
  switch (p.dtype) {
    case DType::kFloat32: attention_dispatch_d<float>(p); break;
    case DType::kFloat16: attention_dispatch_d<half_t>(p); break;
    case DType::kBFloat16: attention_dispatch_d<bf16_t>(p); break;
  }
}

void qkv_rope(const QkvRopeParams& p) {
  const int64_t rows = p.B * p.l * p.H;
  if (rows == 0) return;
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(p.d, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    switch (p.dtype) {
      case DType::kFloat32: qkv_rope_rows<float>(p, begin, end); break;
      case DType::kFloat16: qkv_rope_rows<half_t>(p, begin, end); break;
      case DType::kBFloat16: qkv_rope_rows<bf16_t>(p, begin, end); break;
    }
  });
}

// ----------------------------------------------------------------------------
// cfg_top_k_filter
// ----------------------------------------------------------------------------
void cfg_top_k(const ops::CfgTopKArgs& a) {
  const float* logits = a.logits.data_ptr<float>();
  float* out = a.out.data_ptr<float>();
  const int64_t V = a.V;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(V, 1));
  at::parallel_for(0, a.rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> copy(a.k > 0 ? static_cast<size_t>(V) : 0);
    for (int64_t r = begin; r < end; ++r) {
      const float* cond = logits + r * V;
      const float* uncond = cond + a.half_offset;
      float* y = out + r * V;
      for (int64_t c = 0; c < V; ++c) y[c] = hf_cfg_combine(cond[c], uncond[c], a.one_plus_t, a.t);
      if (a.k == 0) continue;
      std::copy(y, y + V, copy.begin());
      std::nth_element(copy.begin(), copy.begin() + (a.k - 1), copy.end(), std::greater<float>());
      const float kth = copy[a.k - 1];
      const float neg_inf = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < V; ++c) y[c] = y[c] < kth ? neg_inf : y[c];
    }
  });
}

}  // namespace
}  // namespace hart_fast::cpu

namespace hart_fast::ops {
namespace {

at::Tensor qkv_rope_cache_cpu(const at::Tensor& qkv, const std::optional<at::Tensor>& qkv_bias,
                              const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache,
                              at::Tensor& v_cache, int64_t start,
                              const std::optional<at::Tensor>& scale_mul) {
  QkvRopeArgs a = prepare_qkv_rope_cache(qkv, qkv_bias, cos, sin, k_cache, v_cache, start, scale_mul);
  cpu::qkv_rope(a.params);
  return a.q_out;
}

at::Tensor ms_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, int64_t kv_len, double scale) {
  AttnArgs a = prepare_ms_attention(q, k_cache, v_cache, kv_len, scale);
  cpu::attention(a.params);
  return a.out;
}

at::Tensor ms_attention_block_causal_cpu(const at::Tensor& q, const at::Tensor& k,
                                         const at::Tensor& v, const at::Tensor& level,
                                         double scale) {
  AttnArgs a = prepare_block_causal(q, k, v, level, scale);
  cpu::attention(a.params);
  return a.out;
}

at::Tensor cfg_top_k_filter_cpu(const at::Tensor& logits, double t, int64_t top_k, double top_p) {
  CfgTopKArgs a = prepare_cfg_top_k(logits, t, top_k, top_p);
  cpu::cfg_top_k(a);
  return a.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hart_fast, CPU, m) {
  m.impl("qkv_rope_cache", &qkv_rope_cache_cpu);
  m.impl("ms_attention", &ms_attention_cpu);
  m.impl("ms_attention_block_causal", &ms_attention_block_causal_cpu);
  m.impl("cfg_top_k_filter", &cfg_top_k_filter_cpu);
}

}  // namespace hart_fast::ops
