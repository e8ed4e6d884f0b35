// CUDA kernels of qkv_rope_cache, ms_attention(_block_causal) and
// cfg_top_k_filter (plain CUDA, no torch; see launchers.h).
//
// Attention layout: one CTA of 128 threads per (query tile of 32, b*h, KV
// split).  Four consecutive threads (a quad) own one query; thread `part` of
// the quad holds head dims part, part + 4, ... (interleaved so the quad reads
// consecutive shared-memory words, conflict free) of q and of the fp32
// accumulator.  K and V tiles are staged in shared memory as fp32 (kKTile
// keys, 16 KB each), scores are reduced across the quad with two xor
// shuffles, and the online softmax is updated once per chunk of kChunk keys.
// This is a SIMT (no tensor core) kernel: it is meant for the stages with few
// queries, where SDPA is latency bound; large stages go to SDPA (see
// hart_fast/ops/attention.py CUDA_CROSSOVER).
#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>

#include <cuda_runtime.h>

#include "attention_launch.h"
#include "hart_fast/attention.h"

namespace hart_fast::gpu {
namespace {

constexpr int kThreads = 128;
constexpr int kParts = 4;
constexpr int kQTile = kThreads / kParts;  // 32 queries per CTA
constexpr int kChunk = 16;

template <int D>
struct Tile {
  static constexpr int kKTile = 4096 / D;  // 16 KB of fp32 per K (and V) tile
  static constexpr int kPer = D / kParts;
};

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

template <typename S, int D>
__global__ void __launch_bounds__(kThreads)
    attention_kernel(AttnParams p, int64_t keys_per_split, float* part_acc, float* part_ml) {
  constexpr int kKTile = Tile<D>::kKTile;
  constexpr int kPer = Tile<D>::kPer;
  __shared__ float ks[kKTile * D];
  __shared__ float vs[kKTile * D];
  __shared__ int cta_end;

  const int t = threadIdx.x;
  const int part = t % kParts;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kQTile + t / kParts;
  const int64_t bh = blockIdx.y;
  const int64_t b = bh / p.H, h = bh % p.H;
  const int split = blockIdx.z;
  const bool active = i < p.lq;

  const S* qb = static_cast<const S*>(p.q) + b * p.q_strides[0] + h * p.q_strides[1];
  const S* kb = static_cast<const S*>(p.k) + b * p.k_strides[0] + h * p.k_strides[1];
  const S* vb = static_cast<const S*>(p.v) + b * p.v_strides[0] + h * p.v_strides[1];

  float q[kPer], acc[kPer];
  int64_t qend = 0;
  if (active) {
    const S* qr = qb + i * p.q_strides[2];
#pragma unroll
    for (int e = 0; e < kPer; ++e) q[e] = hf_load(qr[e * kParts + part]);
    qend = p.kv_end != nullptr ? min(p.kv_end[i], p.kv_len) : p.kv_len;
  } else {
#pragma unroll
    for (int e = 0; e < kPer; ++e) q[e] = 0.0f;
  }
#pragma unroll
  for (int e = 0; e < kPer; ++e) acc[e] = 0.0f;

  if (t == 0) cta_end = 0;
  __syncthreads();
  if (part == 0 && active) atomicMax(&cta_end, static_cast<int>(qend));
  __syncthreads();

  const int64_t k_begin = static_cast<int64_t>(split) * keys_per_split;
  const int64_t k_end = min(static_cast<int64_t>(cta_end), k_begin + keys_per_split);
  const float mult = hf_mul(p.scale, kLog2e);
  float m = neg_inf();
  float lsum = 0.0f;

  for (int64_t j0 = k_begin; j0 < k_end; j0 += kKTile) {
    const int nk = static_cast<int>(min(static_cast<int64_t>(kKTile), k_end - j0));
    for (int idx = t; idx < kKTile * D; idx += kThreads) {
      const int row = idx / D, col = idx % D;
      float kv = 0.0f, vv = 0.0f;
      if (row < nk) {
        kv = hf_load(kb[(j0 + row) * p.k_strides[2] + col]);
        vv = hf_load(vb[(j0 + row) * p.v_strides[2] + col]);
      }
      ks[idx] = kv;
      vs[idx] = vv;
    }
    __syncthreads();
    for (int jc = 0; jc < nk; jc += kChunk) {
      float s[kChunk];
      float cmax = neg_inf();
#pragma unroll
      for (int jj = 0; jj < kChunk; ++jj) {
        const float* kr = ks + (jc + jj) * D;
        float dot = 0.0f;
#pragma unroll
        for (int e = 0; e < kPer; ++e) dot = hf_add(dot, hf_mul(q[e], kr[e * kParts + part]));
        dot = hf_add(dot, __shfl_xor_sync(0xffffffffu, dot, 1));
        dot = hf_add(dot, __shfl_xor_sync(0xffffffffu, dot, 2));
        const int64_t j = j0 + jc + jj;
        s[jj] = (jc + jj < nk && j < qend) ? hf_mul(dot, mult) : neg_inf();
        cmax = fmaxf(cmax, s[jj]);
      }
      const float m_new = fmaxf(m, cmax);
      const float ref = hf_safe_max(m_new);
      const float corr = exp2f(hf_sub(m, ref));  // 0 while m == -inf
      lsum = hf_mul(lsum, corr);
#pragma unroll
      for (int e = 0; e < kPer; ++e) acc[e] = hf_mul(acc[e], corr);
#pragma unroll
      for (int jj = 0; jj < kChunk; ++jj) {
        const float pj = exp2f(hf_sub(s[jj], ref));  // 0 for masked keys
        lsum = hf_add(lsum, pj);
        const float* vr = vs + (jc + jj) * D;
#pragma unroll
        for (int e = 0; e < kPer; ++e) acc[e] = hf_add(acc[e], hf_mul(pj, vr[e * kParts + part]));
      }
      m = m_new;
    }
    __syncthreads();  // the tile is overwritten next
  }

  if (!active) return;
  if (gridDim.z == 1) {
    S* out = static_cast<S*>(p.out) + ((b * p.lq + i) * p.H + h) * D;
    const float inv = lsum > 0.0f ? hf_div(1.0f, lsum) : 0.0f;
#pragma unroll
    for (int e = 0; e < kPer; ++e) out[e * kParts + part] = Storage<S>::store(hf_mul(acc[e], inv));
    return;
  }
  const int64_t row = (static_cast<int64_t>(split) * p.B * p.H + bh) * p.lq + i;
#pragma unroll
  for (int e = 0; e < kPer; ++e) part_acc[row * D + e * kParts + part] = acc[e];
  if (part == 0) {
    part_ml[row * 2] = m;
    part_ml[row * 2 + 1] = lsum;
  }
}

// Merges the split partials of one (b, h, i) row: block of D threads.
template <typename S, int D>
__global__ void attention_combine_kernel(AttnParams p, int splits, const float* part_acc,
                                         const float* part_ml) {
  const int64_t r = blockIdx.x;  // (b * H + h) * lq + i
  const int c = threadIdx.x;
  const int64_t rows = p.B * p.H * p.lq;
  float mx = neg_inf();
  for (int z = 0; z < splits; ++z) mx = fmaxf(mx, part_ml[(z * rows + r) * 2]);
  const float ref = hf_safe_max(mx);
  float lsum = 0.0f, acc = 0.0f;
  for (int z = 0; z < splits; ++z) {
    const int64_t zr = z * rows + r;
    const float w = exp2f(hf_sub(part_ml[zr * 2], ref));  // 0 for splits without visible keys
    lsum = hf_add(lsum, hf_mul(part_ml[zr * 2 + 1], w));
    acc = hf_add(acc, hf_mul(part_acc[zr * D + c], w));
  }
  const int64_t i = r % p.lq, bh = r / p.lq;
  const int64_t b = bh / p.H, h = bh % p.H;
  S* out = static_cast<S*>(p.out) + ((b * p.lq + i) * p.H + h) * D;
  const float inv = lsum > 0.0f ? hf_div(1.0f, lsum) : 0.0f;
  out[c] = Storage<S>::store(hf_mul(acc, inv));
}


// ---------------------------------------------------------------------------
// Decode path for stages with few queries (lq <= kDecodeMaxQ, no per-query
// key limit).  Each warp is an independent KV split: lane `lane` scores key
// j0 + lane against up to QN queries (q staged in shared memory, read as
// broadcasts), the warp then accumulates p * v with v rows read coalesced
// (lane owns head dims lane, lane + 32, ...).  Every warp writes its partial
// (max, sum, acc) and attention_combine_kernel merges them.  Compared with
// the tile kernel this keeps all 32 lanes busy when there is one query, and
// spreads one (b, h) over many SMs, which is what a 10k-key cache needs.
// ---------------------------------------------------------------------------

// Loads N consecutive elements into fp32 registers, with 16-byte vector loads
// when `vec` (the caller checked the alignment; N * sizeof(S) is a multiple of 16).
template <typename S, int N>
__device__ __forceinline__ void load_chunk(const S* src, float* dst, bool vec) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(S));
  static_assert(N % kVec == 0, "chunk must be a whole number of 16-byte vectors");
  if (vec) {
    const uint4* s4 = reinterpret_cast<const uint4*>(src);
#pragma unroll
    for (int v = 0; v < N / kVec; ++v) {
      const uint4 u = s4[v];
      S e[kVec];
      memcpy(e, &u, sizeof(u));
#pragma unroll
      for (int t = 0; t < kVec; ++t) dst[v * kVec + t] = hf_load(e[t]);
    }
  } else {
#pragma unroll
    for (int c = 0; c < N; ++c) dst[c] = hf_load(src[c]);
  }
}

constexpr int kDecodeMaxQ = 16;
constexpr int kDecodeWarps = 4;

template <typename S, int D, int QN>
__global__ void __launch_bounds__(kDecodeWarps * 32)
    attention_decode_kernel(AttnParams p, int64_t keys_per_warp, int warps_per_bh,
                            float* part_acc, float* part_ml) {
  constexpr int kDims = (D + 31) / 32;  // head dims per lane in the p.v update
  __shared__ float qs[QN][D];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int64_t bh = blockIdx.y;
  const int64_t b = bh / p.H, h = bh % p.H;
  const int64_t q0 = static_cast<int64_t>(blockIdx.z) * QN;
  const int nq = static_cast<int>(min(static_cast<int64_t>(QN), p.lq - q0));

  const S* qb = static_cast<const S*>(p.q) + b * p.q_strides[0] + h * p.q_strides[1];
  for (int idx = threadIdx.x; idx < QN * D; idx += blockDim.x) {
    const int qi = idx / D, c = idx % D;
    qs[qi][c] = qi < nq ? hf_load(qb[(q0 + qi) * p.q_strides[2] + c]) : 0.0f;
  }
  __syncthreads();

  const int wsplit = blockIdx.x * kDecodeWarps + warp;  // this warp's split
  if (wsplit >= warps_per_bh) return;                   // whole warp, after the only barrier
  const int64_t k_begin = static_cast<int64_t>(wsplit) * keys_per_warp;
  const int64_t k_end = min(p.kv_len, k_begin + keys_per_warp);
  const S* kb = static_cast<const S*>(p.k) + b * p.k_strides[0] + h * p.k_strides[1];
  const S* vb = static_cast<const S*>(p.v) + b * p.v_strides[0] + h * p.v_strides[1];
  const float mult = hf_mul(p.scale, kLog2e);

  float m[QN], lsum[QN], acc[QN][kDims];
#pragma unroll
  for (int qi = 0; qi < QN; ++qi) {
    m[qi] = neg_inf();
    lsum[qi] = 0.0f;
#pragma unroll
    for (int e = 0; e < kDims; ++e) acc[qi][e] = 0.0f;
  }

  for (int64_t j0 = k_begin; j0 < k_end; j0 += 32) {
    const int64_t j = j0 + lane;
    const bool valid = j < k_end;
    float s[QN];
#pragma unroll
    for (int qi = 0; qi < QN; ++qi) s[qi] = 0.0f;
    if (valid) {
      const S* kr = kb + j * p.k_strides[2];
      // 16-byte loads when the row allows it (the usual contiguous cache).
      const bool vec = (reinterpret_cast<uintptr_t>(kr) & 15u) == 0;
      constexpr int CW = D < 32 ? D : 32;
#pragma unroll
      for (int c0 = 0; c0 < D; c0 += CW) {
        float kc[CW];
        load_chunk<S, CW>(kr + c0, kc, vec);
#pragma unroll
        for (int c = 0; c < CW; ++c) {
#pragma unroll
          for (int qi = 0; qi < QN; ++qi) s[qi] = hf_add(s[qi], hf_mul(qs[qi][c0 + c], kc[c]));
        }
      }
    }
    float pr[QN];
#pragma unroll
    for (int qi = 0; qi < QN; ++qi) {
      const float sc = valid ? hf_mul(s[qi], mult) : neg_inf();
      float cmax = sc;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) cmax = fmaxf(cmax, __shfl_xor_sync(0xffffffffu, cmax, o));
      const float m_new = fmaxf(m[qi], cmax);
      const float ref = hf_safe_max(m_new);
      const float corr = exp2f(hf_sub(m[qi], ref));
      pr[qi] = exp2f(hf_sub(sc, ref));
      lsum[qi] = hf_add(hf_mul(lsum[qi], corr), pr[qi]);  // lane-local partial sum
#pragma unroll
      for (int e = 0; e < kDims; ++e) acc[qi][e] = hf_mul(acc[qi][e], corr);
      m[qi] = m_new;
    }
    const int nk = static_cast<int>(min(static_cast<int64_t>(32), k_end - j0));
    // Unrolled so the independent V row loads of several keys are in flight
    // together (the loop is latency bound otherwise).
#pragma unroll 4
    for (int kk = 0; kk < nk; ++kk) {
      const S* vr = vb + (j0 + kk) * p.v_strides[2];
      float vv[kDims];
#pragma unroll
      for (int e = 0; e < kDims; ++e) {
        const int c = lane + 32 * e;
        vv[e] = c < D ? hf_load(vr[c]) : 0.0f;
      }
#pragma unroll
      for (int qi = 0; qi < QN; ++qi) {
        const float pk = __shfl_sync(0xffffffffu, pr[qi], kk);
#pragma unroll
        for (int e = 0; e < kDims; ++e) acc[qi][e] = hf_add(acc[qi][e], hf_mul(pk, vv[e]));
      }
    }
  }

  const int64_t rows = p.B * p.H * p.lq;
#pragma unroll
  for (int qi = 0; qi < QN; ++qi) {
    float l = lsum[qi];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) l = hf_add(l, __shfl_xor_sync(0xffffffffu, l, o));
    if (qi >= nq) continue;
    const int64_t row = static_cast<int64_t>(wsplit) * rows + bh * p.lq + q0 + qi;
#pragma unroll
    for (int e = 0; e < kDims; ++e) {
      const int c = lane + 32 * e;
      if (c < D) part_acc[row * D + c] = acc[qi][e];
    }
    if (lane == 0) {
      part_ml[row * 2] = m[qi];
      part_ml[row * 2 + 1] = l;
    }
  }
}

// Work split of the decode path: warps per (b, h, query group) so that the
// whole grid has ~32 warps per SM, each warp with >= 64 keys (a multiple of 32).
struct DecodeSplit {
  int warps_per_bh = 1;
  int64_t keys_per_warp = 32;
};

DecodeSplit decode_split(const AttnParams& p, int num_sms) {
  const int64_t qn = p.lq == 1 ? 1 : 4;
  const int64_t groups = p.B * p.H * ((p.lq + qn - 1) / qn);
  const int64_t target = 32 * static_cast<int64_t>(num_sms > 0 ? num_sms : 132);
  int64_t w = (target + groups - 1) / groups;
  w = std::min<int64_t>(w, (p.kv_len + 63) / 64);
  w = std::max<int64_t>(std::min<int64_t>(w, 256), 1);
  DecodeSplit d;
  const int64_t kpw = (p.kv_len + w - 1) / w;
  d.keys_per_warp = (kpw + 31) / 32 * 32;
  d.warps_per_bh = static_cast<int>((p.kv_len + d.keys_per_warp - 1) / d.keys_per_warp);
  return d;
}

bool use_decode(const AttnParams& p) { return p.lq <= kDecodeMaxQ && p.kv_end == nullptr; }

template <typename S, int D>
cudaError_t decode_typed(const AttnParams& p, int nparts, float* part_acc, float* part_ml,
                         cudaStream_t stream) {
  // nparts came from attention_num_splits with the same p; recompute the split.
  const int64_t keys_per_warp = (p.kv_len + nparts - 1) / nparts;
  const int64_t kpw = (keys_per_warp + 31) / 32 * 32;
  const int warps = static_cast<int>((p.kv_len + kpw - 1) / kpw);
  const unsigned blocks_x = static_cast<unsigned>((nparts + kDecodeWarps - 1) / kDecodeWarps);
  if (p.lq == 1) {
    const dim3 grid(blocks_x, static_cast<unsigned>(p.B * p.H), 1);
    attention_decode_kernel<S, D, 1>
        <<<grid, kDecodeWarps * 32, 0, stream>>>(p, kpw, warps, part_acc, part_ml);
  } else {
    const dim3 grid(blocks_x, static_cast<unsigned>(p.B * p.H),
                    static_cast<unsigned>((p.lq + 3) / 4));
    attention_decode_kernel<S, D, 4>
        <<<grid, kDecodeWarps * 32, 0, stream>>>(p, kpw, warps, part_acc, part_ml);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  // warps <= nparts (the rounding to whole chunks can leave trailing slots
  // unused); the combine reads exactly the `warps` partials written.
  attention_combine_kernel<S, D>
      <<<static_cast<unsigned>(p.B * p.H * p.lq), D, 0, stream>>>(p, warps, part_acc, part_ml);
  return cudaGetLastError();
}

template <typename S, int D>
cudaError_t attention_typed(const AttnParams& p, int splits, float* part_acc, float* part_ml,
                            cudaStream_t stream) {
  if (use_decode(p)) return decode_typed<S, D>(p, splits, part_acc, part_ml, stream);
  const int64_t qtiles = (p.lq + kQTile - 1) / kQTile;
  const int64_t kps = (p.kv_len + splits - 1) / splits;
  constexpr int kKTile = Tile<D>::kKTile;
  const int64_t keys_per_split = (kps + kKTile - 1) / kKTile * kKTile;
  const dim3 grid(static_cast<unsigned>(qtiles), static_cast<unsigned>(p.B * p.H),
                  static_cast<unsigned>(splits));
  attention_kernel<S, D><<<grid, kThreads, 0, stream>>>(p, keys_per_split, part_acc, part_ml);
  if (splits > 1) {
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    attention_combine_kernel<S, D>
        <<<static_cast<unsigned>(p.B * p.H * p.lq), D, 0, stream>>>(p, splits, part_acc, part_ml);
  }
  return cudaGetLastError();
}

template <typename S>
cudaError_t attention_dispatch_d(const AttnParams& p, int splits, float* pa, float* pm,
                                 cudaStream_t stream) {
  switch (p.d) {
    case 16: return attention_typed<S, 16>(p, splits, pa, pm, stream);
    case 32: return attention_typed<S, 32>(p, splits, pa, pm, stream);
    case 64: return attention_typed<S, 64>(p, splits, pa, pm, stream);
    case 128: return attention_typed<S, 128>(p, splits, pa, pm, stream);
    default: return cudaErrorInvalidValue;
  }
}

// ---------------------------------------------------------------------------
// qkv_rope_cache: one warp per (token, head, q|k|v) vector; lane owns pairs
// (c, c + d/2) for c = lane, lane + 32 (d <= 128).
// ---------------------------------------------------------------------------
template <typename S>
__global__ void qkv_rope_kernel(QkvRopeParams p) {
  // 32-bit index arithmetic: each thread does little work, so 64-bit
  // divisions would dominate (the launcher guarantees the warp count fits).
  const uint32_t w = (blockIdx.x * blockDim.x + threadIdx.x) / 32u;
  const int lane = threadIdx.x % 32;
  const uint32_t total = static_cast<uint32_t>(p.B * p.l * p.H * 3);
  if (w >= total) return;  // whole warps exit together (blockDim is a multiple of 32)
  const uint32_t H32 = static_cast<uint32_t>(p.H), l32 = static_cast<uint32_t>(p.l);
  const int which = static_cast<int>(w % 3u);
  const uint32_t rest = w / 3u;
  const int64_t h = rest % H32;
  const uint32_t bi32 = rest / H32;
  const int64_t bi = bi32;
  const int64_t i = bi32 % l32, b = bi32 / l32;
  const int64_t H = p.H, d = p.d, half = d / 2;
  const int64_t off = (which * H + h) * d;
  const S* src = static_cast<const S*>(p.qkv) + bi * 3 * H * d + off;
  const S* bias = p.bias != nullptr ? static_cast<const S*>(p.bias) + off : nullptr;

  float x1[2], x2[2];
  float sq = 0.0f;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t c = lane + 32 * r;
    x1[r] = 0.0f;
    x2[r] = 0.0f;
    if (c < half) {
      x1[r] = hf_load(src[c]);
      x2[r] = hf_load(src[c + half]);
      if (bias != nullptr) {
        x1[r] = hf_round_to<S>(hf_add(x1[r], hf_load(bias[c])));
        x2[r] = hf_round_to<S>(hf_add(x2[r], hf_load(bias[c + half])));
      }
      sq = hf_add(sq, hf_add(hf_mul(x1[r], x1[r]), hf_mul(x2[r], x2[r])));
    }
  }
  S* dst;
  if (which == 0) {
    dst = static_cast<S*>(p.q_out) + ((b * H + h) * p.l + i) * d;
  } else {
    const int64_t* st = which == 1 ? p.kc_strides : p.vc_strides;
    dst = static_cast<S*>(which == 1 ? p.k_cache : p.v_cache) + b * st[0] + h * st[1] +
          (p.start + i) * st[2];
  }
  float den = 1.0f;
  if (which != 2 && p.scale_mul != nullptr) {
    for (int o = 16; o > 0; o >>= 1) sq = hf_add(sq, __shfl_xor_sync(0xffffffffu, sq, o));
    den = hf_l2_denominator<S>(sq);
  }
  const float* cos = p.cos + b * p.rope_b_stride + i * d;
  const float* sin = p.sin + b * p.rope_b_stride + i * d;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t c = lane + 32 * r;
    if (c >= half) continue;
    float y1 = x1[r], y2 = x2[r];
    if (which != 2) {
      if (p.scale_mul != nullptr) {
        y1 = hf_l2_normalize<S>(y1, den);
        y2 = hf_l2_normalize<S>(y2, den);
        if (which == 0) {
          y1 = hf_scale_mul<S>(y1, p.scale_mul[h]);
          y2 = hf_scale_mul<S>(y2, p.scale_mul[h]);
        }
      }
      hf_rope_pair<S>(y1, y2, cos[c], sin[c], cos[c + half], sin[c + half], &y1, &y2);
    }
    dst[c] = Storage<S>::store(y1);
    dst[c + half] = Storage<S>::store(y2);
  }
}

// ---------------------------------------------------------------------------
// cfg_top_k: one block per row; the k-th largest value is found by a 4-pass
// 8-bit radix select on order-preserving keys (exact, no sorting).
// ---------------------------------------------------------------------------
constexpr int kTopKThreads = 256;

__global__ void __launch_bounds__(kTopKThreads)
    cfg_top_k_kernel(const float* logits, float* out, int64_t V, int64_t half_offset, int64_t k,
                     float one_plus_t, float t) {
  __shared__ unsigned int hist[256];
  __shared__ uint32_t s_prefix;
  __shared__ int64_t s_krem;
  const int64_t r = blockIdx.x;
  const float* cond = logits + r * V;
  const float* uncond = cond + half_offset;
  float* y = out + r * V;
  for (int64_t c = threadIdx.x; c < V; c += kTopKThreads) {
    y[c] = hf_cfg_combine(cond[c], uncond[c], one_plus_t, t);
  }
  if (k == 0) return;
  if (threadIdx.x == 0) {
    s_prefix = 0;
    s_krem = k;
  }
  uint32_t mask = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int c = threadIdx.x; c < 256; c += kTopKThreads) hist[c] = 0;
    __syncthreads();  // also publishes y, s_prefix, s_krem
    const uint32_t prefix = s_prefix;
    for (int64_t c = threadIdx.x; c < V; c += kTopKThreads) {
      const uint32_t key = hf_float_order_key(y[c]);
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 0xffu], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int64_t krem = s_krem, above = 0;
      int digit = 255;
      for (; digit > 0; --digit) {
        if (above + hist[digit] >= krem) break;
        above += hist[digit];
      }
      s_krem = krem - above;
      s_prefix = prefix | (static_cast<uint32_t>(digit) << shift);
    }
    mask |= 0xffu << shift;
    __syncthreads();  // thread 0's scan of hist must finish before it is cleared
  }
  __syncthreads();
  const float kth = hf_order_key_float(s_prefix);
  for (int64_t c = threadIdx.x; c < V; c += kTopKThreads) {
    const float v = y[c];
    y[c] = v < kth ? neg_inf() : v;
  }
}

}  // namespace

cudaError_t launch_qkv_rope_cache(const QkvRopeParams& p, cudaStream_t stream) {
  const int64_t warps = p.B * p.l * p.H * 3;
  if (warps == 0) return cudaSuccess;
  if (p.d > 128 || p.d % 2) return cudaErrorInvalidValue;
  constexpr int kBlock = 256;
  const int64_t blocks = (warps * 32 + kBlock - 1) / kBlock;
  if (warps * 32 + kBlock > static_cast<int64_t>(UINT32_MAX)) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kFloat32: qkv_rope_kernel<float><<<static_cast<unsigned>(blocks), kBlock, 0, stream>>>(p); break;
    case DType::kFloat16: qkv_rope_kernel<half_t><<<static_cast<unsigned>(blocks), kBlock, 0, stream>>>(p); break;
    case DType::kBFloat16: qkv_rope_kernel<bf16_t><<<static_cast<unsigned>(blocks), kBlock, 0, stream>>>(p); break;
    default: return cudaErrorInvalidValue;  // nothing launched
  }
  return cudaGetLastError();
}

int attention_num_splits(const AttnParams& p, int num_sms) {
  // Few queries: the decode path, one partial per warp (see decode_split).
  // Otherwise the tile kernel covers the GPU with (b, h, query tile) CTAs.
  if (!use_decode(p) || p.B * p.H * p.lq == 0) return 1;  // (empty: nothing is launched)
  const int w = decode_split(p, num_sms).warps_per_bh;
  return w < 2 ? 2 : w;  // the decode path always goes through the combine
}

cudaError_t launch_attention(const AttnParams& p, int splits, float* part_acc, float* part_ml,
                             cudaStream_t stream) {
  if (p.B * p.H * p.lq == 0) return cudaSuccess;
  const int64_t qtiles = (p.lq + kQTile - 1) / kQTile;
  if (qtiles > INT_MAX || p.B * p.H > 65535 || splits < 1 || splits > 65535 ||
      p.kv_len > INT_MAX || (splits > 1 && (part_acc == nullptr || part_ml == nullptr))) {
    return cudaErrorInvalidValue;
  }
  switch (p.dtype) {
    case DType::kFloat32: return attention_dispatch_d<float>(p, splits, part_acc, part_ml, stream);
    case DType::kFloat16: return attention_dispatch_d<half_t>(p, splits, part_acc, part_ml, stream);
    case DType::kBFloat16: return attention_dispatch_d<bf16_t>(p, splits, part_acc, part_ml, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_cfg_top_k(const float* logits, float* out, int64_t rows, int64_t V,
                             int64_t half_offset, int64_t k, float one_plus_t, float t,
                             cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (rows > INT_MAX) return cudaErrorInvalidValue;
  cfg_top_k_kernel<<<static_cast<unsigned>(rows), kTopKThreads, 0, stream>>>(
      logits, out, V, half_offset, k, one_plus_t, t);
  return cudaGetLastError();
}

}  // namespace hart_fast::gpu
