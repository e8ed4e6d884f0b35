// CUDA kernels of group_norm_silu (plain CUDA, no torch; see launchers.h).
//
// Three launches, all on the caller's stream, no host synchronisation:
//   1. stats:   fp64 partial sums (x, x^2) per (batch, channel, split).
//               NCHW: block = one contiguous chunk of one channel row of HW
//               elements (vector loads when aligned), block-reduced with a
//               fixed shuffle tree.  NHWC: block = a chunk of pixels of one
//               image, one thread per channel, so every pixel row of C
//               elements is read coalesced.  A channel row of a 1024 x 1024
//               image has 1M elements, hence the split into pieces.
//   2. combine: one thread per (batch, group) adds its channels' partials in
//               a fixed order (deterministic, no atomics), computes mean /
//               rstd and writes the per-(batch, channel) coefficients m, a, s
//               of y = (x - m) * a + s (hart_fast/group_norm_silu.h).
//   3. apply:   elementwise y = silu(round((x - m) * a + s)), grid-stride over packs
//               of 16 bytes when the layout and pointers allow.
// The per-element math and the moments are the shared header's, i.e. the
// arithmetic the CPU tests check.
#include <climits>

#include <cuda_runtime.h>

#include "group_norm_silu_launch.h"
#include "hart_fast/group_norm_silu.h"

namespace hart_fast::gpu {
namespace {

constexpr int kStatsThreads = 256;
constexpr int kApplyThreads = 256;
constexpr int64_t kTargetStatsBlocks = 4096;  // a few waves on a 132-SM H100/H200

// 16-byte pack of V elements of S.
template <typename S, int V>
struct alignas(sizeof(S) * V) Pack {
  S v[V];
};

template <typename S>
struct PackWidth {
  static constexpr int value = 16 / sizeof(S);  // 4 floats or 8 halves
};

__device__ __forceinline__ double warp_sum(double v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Sum over the block, fixed order; the result is valid in thread 0.
__device__ __forceinline__ void block_sum2(double& s, double& q) {
  __shared__ double sh_s[32];
  __shared__ double sh_q[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  s = warp_sum(s);
  q = warp_sum(q);
  if (lane == 0) {
    sh_s[warp] = s;
    sh_q[warp] = q;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const int warps = (blockDim.x + 31) >> 5;
    double ts = 0.0, tq = 0.0;
    for (int w = 0; w < warps; ++w) {
      ts += sh_s[w];
      tq += sh_q[w];
    }
    s = ts;
    q = tq;
  }
}

// NCHW: block b = row * splits + k reduces elements [k * chunk, ...) of row
// (= batch * C + channel), chunk a multiple of the pack width.
template <typename S, bool kVec>
__global__ void __launch_bounds__(kStatsThreads)
    stats_nchw_kernel(const S* __restrict__ x, int64_t hw, int64_t splits, int64_t chunk,
                      double* __restrict__ partials) {
  constexpr int V = PackWidth<S>::value;
  const int64_t blk = blockIdx.x;
  const int64_t row = blk / splits, k = blk % splits;
  const int64_t begin = k * chunk;
  const int64_t end = begin + chunk < hw ? begin + chunk : hw;
  const S* __restrict__ xr = x + row * hw;
  double s = 0.0, q = 0.0;
  if (kVec) {
    // hw % V == 0 and x is 16-byte aligned, so every pack is aligned.
    for (int64_t i = begin + static_cast<int64_t>(threadIdx.x) * V; i < end;
         i += static_cast<int64_t>(blockDim.x) * V) {
      const Pack<S, V> pk = *reinterpret_cast<const Pack<S, V>*>(xr + i);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const double v = static_cast<double>(hf_load(pk.v[j]));
        s += v;
        q += v * v;
      }
    }
  } else {
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      const double v = static_cast<double>(hf_load(xr[i]));
      s += v;
      q += v * v;
    }
  }
  block_sum2(s, q);
  if (threadIdx.x == 0) {
    partials[2 * blk] = s;
    partials[2 * blk + 1] = q;
  }
}

// NHWC: block b = batch * splits + k covers pixels [k * chunk, ...) of image
// `batch`; thread t owns channels t, t + blockDim.x, ...
// Launched with up to 1024 threads (C rounded up to a warp multiple): the
// bound keeps the register count launchable at that size.
template <typename S>
__global__ void __launch_bounds__(1024) stats_nhwc_kernel(const S* __restrict__ x, int64_t c_total, int64_t hw,
                                  int64_t splits, int64_t chunk, double* __restrict__ partials) {
  const int64_t blk = blockIdx.x;
  const int64_t b = blk / splits, k = blk % splits;
  const int64_t p0 = k * chunk;
  const int64_t p1 = p0 + chunk < hw ? p0 + chunk : hw;
  const S* __restrict__ xb = x + b * hw * c_total;
  for (int64_t c = threadIdx.x; c < c_total; c += blockDim.x) {
    double s = 0.0, q = 0.0;
    int64_t px = p0;
    // Four independent loads in flight per thread.
    for (; px + 4 <= p1; px += 4) {
      const float v0 = hf_load(xb[(px + 0) * c_total + c]);
      const float v1 = hf_load(xb[(px + 1) * c_total + c]);
      const float v2 = hf_load(xb[(px + 2) * c_total + c]);
      const float v3 = hf_load(xb[(px + 3) * c_total + c]);
      const double d0 = v0, d1 = v1, d2 = v2, d3 = v3;
      s += d0;
      q += d0 * d0;
      s += d1;
      q += d1 * d1;
      s += d2;
      q += d2 * d2;
      s += d3;
      q += d3 * d3;
    }
    for (; px < p1; ++px) {
      const double v = static_cast<double>(hf_load(xb[px * c_total + c]));
      s += v;
      q += v * v;
    }
    const int64_t idx = (b * c_total + c) * splits + k;
    partials[2 * idx] = s;
    partials[2 * idx + 1] = q;
  }
}

// One thread per (batch, group): partials of channel c, split k live at
// index (batch * C + c) * splits + k for both layouts.
__global__ void combine_kernel(GroupNormSiluParams p, const double* __restrict__ partials,
                               int64_t splits, GnCoef* __restrict__ coefs) {
  const int64_t bg = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (bg >= p.batch * p.groups) return;
  const int64_t b = bg / p.groups, g = bg % p.groups;
  const int64_t d = p.channels / p.groups;
  double s = 0.0, q = 0.0;
  for (int64_t c = g * d; c < (g + 1) * d; ++c) {
    const double* pc = partials + 2 * (b * p.channels + c) * splits;
    for (int64_t k = 0; k < splits; ++k) {
      s += pc[2 * k];
      q += pc[2 * k + 1];
    }
  }
  float mean, rstd;
  hf_gn_moments(s, q, d * p.hw, p.eps, &mean, &rstd);
  for (int64_t c = g * d; c < (g + 1) * d; ++c) {
    coefs[b * p.channels + c] = hf_gn_coeffs(mean, rstd, p.weight, p.bias, c);
  }
}

// Elementwise pass over n elements in packs of V (V == 1: scalar path).
// NCHW: the V elements of a pack share one channel (hw % V == 0).
// NHWC: they are V consecutive channels of one pixel (C % V == 0).
template <typename S, int V, bool kChannelsLast, typename I>
__global__ void __launch_bounds__(kApplyThreads)
    apply_kernel(const S* __restrict__ x, S* __restrict__ out, const GnCoef* __restrict__ coefs,
                 I n_packs, I c_total, I hw, bool silu) {
  for (I pk = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x; pk < n_packs;
       pk += static_cast<I>(gridDim.x) * blockDim.x) {
    const I i0 = pk * V;
    Pack<S, V> in = *reinterpret_cast<const Pack<S, V>*>(x + i0);
    Pack<S, V> res;
    if (kChannelsLast) {
      const I c0 = i0 % c_total;
      const I base = (i0 / (hw * c_total)) * c_total + c0;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float y = hf_gn_silu_apply<S>(hf_load(in.v[j]), coefs[base + j], silu);
        res.v[j] = Storage<S>::store(y);
      }
    } else {
      const GnCoef k = coefs[i0 / hw];
#pragma unroll
      for (int j = 0; j < V; ++j) {
        res.v[j] = Storage<S>::store(hf_gn_silu_apply<S>(hf_load(in.v[j]), k, silu));
      }
    }
    *reinterpret_cast<Pack<S, V>*>(out + i0) = res;
  }
}

template <typename S, int V, typename I>
void launch_apply(const GroupNormSiluParams& p, const GnCoef* coefs, cudaStream_t stream) {
  const int64_t n = p.batch * p.channels * p.hw;
  const int64_t packs = n / V;
  int64_t blocks = (packs + kApplyThreads - 1) / kApplyThreads;
  if (blocks > (int64_t{1} << 20)) blocks = int64_t{1} << 20;  // grid-stride beyond
  const S* x = static_cast<const S*>(p.x);
  S* out = static_cast<S*>(p.out);
  if (p.channels_last) {
    apply_kernel<S, V, true, I><<<static_cast<unsigned>(blocks), kApplyThreads, 0, stream>>>(
        x, out, coefs, static_cast<I>(packs), static_cast<I>(p.channels), static_cast<I>(p.hw),
        p.silu);
  } else {
    apply_kernel<S, V, false, I><<<static_cast<unsigned>(blocks), kApplyThreads, 0, stream>>>(
        x, out, coefs, static_cast<I>(packs), static_cast<I>(p.channels), static_cast<I>(p.hw),
        p.silu);
  }
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

template <typename S>
cudaError_t launch_typed(const GroupNormSiluParams& p, double* partials, GnCoef* coefs,
                         int64_t splits, cudaStream_t stream) {
  constexpr int V = PackWidth<S>::value;
  const S* x = static_cast<const S*>(p.x);
  const int64_t B = p.batch, C = p.channels, HW = p.hw;

  // 1. statistics
  if (!p.channels_last) {
    int64_t chunk = (HW + splits - 1) / splits;
    chunk = (chunk + V - 1) / V * V;
    const int64_t blocks = B * C * splits;
    if (blocks > INT_MAX) return cudaErrorInvalidValue;
    if (HW % V == 0 && aligned16(x)) {
      stats_nchw_kernel<S, true><<<static_cast<unsigned>(blocks), kStatsThreads, 0, stream>>>(
          x, HW, splits, chunk, partials);
    } else {
      stats_nchw_kernel<S, false><<<static_cast<unsigned>(blocks), kStatsThreads, 0, stream>>>(
          x, HW, splits, chunk, partials);
    }
  } else {
    const int64_t chunk = (HW + splits - 1) / splits;
    const int64_t blocks = B * splits;
    if (blocks > INT_MAX) return cudaErrorInvalidValue;
    int threads = static_cast<int>(C < 1024 ? (C + 31) / 32 * 32 : 1024);
    stats_nhwc_kernel<S><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        x, C, HW, splits, chunk, partials);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  // 2. group moments -> per-channel coefficients
  const int64_t bg = B * p.groups;
  combine_kernel<<<static_cast<unsigned>((bg + 127) / 128), 128, 0, stream>>>(p, partials, splits,
                                                                             coefs);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  // 3. elementwise
  const bool vec = aligned16(p.x) && aligned16(p.out) &&
                   (p.channels_last ? C % V == 0 : HW % V == 0);
  // 32-bit indexing when every element index fits in int32 (the grid-stride
  // step is at most 2^28, so pk + step cannot wrap a uint32 either).
  const bool small = B * C * HW < (int64_t{1} << 31);
  if (vec) {
    if (small) {
      launch_apply<S, V, uint32_t>(p, coefs, stream);
    } else {
      launch_apply<S, V, uint64_t>(p, coefs, stream);
    }
  } else {
    if (small) {
      launch_apply<S, 1, uint32_t>(p, coefs, stream);
    } else {
      launch_apply<S, 1, uint64_t>(p, coefs, stream);
    }
  }
  return cudaGetLastError();
}

}  // namespace

int64_t group_norm_silu_splits(const GroupNormSiluParams& p) {
  const int64_t lanes = p.channels_last ? p.batch : p.batch * p.channels;
  if (lanes <= 0 || p.hw <= 0) return 1;
  int64_t splits = (kTargetStatsBlocks + lanes - 1) / lanes;
  // Keep pieces large enough to amortise a block: >= 4096 elements of a
  // channel row (NCHW) or >= 64 pixels (NHWC).
  const int64_t max_splits = p.channels_last ? (p.hw + 63) / 64 : (p.hw + 4095) / 4096;
  if (splits > max_splits) splits = max_splits;
  return splits < 1 ? 1 : splits;
}

cudaError_t launch_group_norm_silu(const GroupNormSiluParams& p, double* partials, GnCoef* coefs,
                                   int64_t splits, cudaStream_t stream) {
  if (p.batch * p.channels * p.hw <= 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::kFloat32:
      return launch_typed<float>(p, partials, coefs, splits, stream);
    case DType::kFloat16:
      return launch_typed<half_t>(p, partials, coefs, splits, stream);
    case DType::kBFloat16:
      return launch_typed<bf16_t>(p, partials, coefs, splits, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace hart_fast::gpu
