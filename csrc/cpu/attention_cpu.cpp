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
template <typename S, int D>
void attention_task(const AttnParams& p, int64_t b, int64_t h, int64_t q0, int64_t q1) {
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
    for (int64_t i = 0; i < nq; ++i) {
      float* si = s[i];
      for (int64_t j = 0; j < nk; ++j) si[j] = 0.0f;
      for (int c = 0; c < D; ++c) {
        const float qc = qf[i][c];
        const float* kc = kt[c];
        for (int64_t j = 0; j < nk; ++j) si[j] += qc * kc[j];
      }
      const int64_t valid = std::min<int64_t>(nk, std::max<int64_t>(qend[i] - j0, 0));
      float tile_max = neg_inf;
      for (int64_t j = 0; j < valid; ++j) {
        si[j] *= mult;
        tile_max = std::max(tile_max, si[j]);
      }
      if (valid == 0) continue;
      const float m_new = std::max(m[i], tile_max);
      const float ref = hf_safe_max(m_new);
      const float corr = std::exp2(m[i] - ref);  // 0 when m[i] == -inf
      float psum = 0.0f;
      for (int64_t j = 0; j < valid; ++j) {
        si[j] = std::exp2(si[j] - ref);
        psum += si[j];
      }
      lsum[i] = lsum[i] * corr + psum;
      m[i] = m_new;
      float* ai = acc[i];
      for (int c = 0; c < D; ++c) ai[c] *= corr;
      for (int64_t j = 0; j < valid; ++j) {
        const float pj = si[j];
        const float* vj = vt[j];
        for (int c = 0; c < D; ++c) ai[c] += pj * vj[c];
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
