// CUDA kernel of vq_nearest_code (plain CUDA, no torch; see launchers.h).
//
// Tiling: a block of 256 threads owns kRows rows of z and sweeps the codebook
// in tiles of kCodes codes.  Both operands are staged through shared memory in
// channel chunks of kChunk, stored channel-major (padded by one float to avoid
// bank conflicts on the transposing store).  Thread (rg, cg) of the 16 x 16
// grid keeps kRows/16 x kCodes/16 dot-product accumulators in registers; rows
// and codes are interleaved with stride 16 so the 16 threads of a row group
// read 16 consecutive floats.  Accumulators carry across channel chunks, so
// every dot product is the sequential channel sum of hart_fast/vq.h, the same
// order as the CPU kernel.  Each thread tracks its best (distance, index) per
// row; the 16 threads of a row group then merge with hf_argmin_better, a total
// order, so the winner is torch.argmin's (first index on ties, NaN first)
// regardless of merge order.
#include <cuda_runtime.h>

#include "hart_fast/vq.h"
#include "launchers.h"

namespace hart_fast::gpu {
namespace {

constexpr int kThreads = 256;
constexpr int kGroups = 16;                    // row groups == code groups
constexpr int kRows = 64;                      // rows of z per block
constexpr int kCodes = 128;                    // codes per codebook tile
constexpr int kChunk = 32;                     // channels staged per step
constexpr int kRowsPerThread = kRows / kGroups;    // 4
constexpr int kCodesPerThread = kCodes / kGroups;  // 8
static_assert(kGroups * kGroups == kThreads, "thread grid must cover the block");

// ||e_v||^2 for every code, sequential over channels (same order as the CPU).
template <typename S>
__global__ void code_sq_norms_kernel(const S* __restrict__ codebook, int64_t v, int64_t c,
                                     float* __restrict__ out) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= v) return;
  float acc = 0.0f;
  for (int64_t k = 0; k < c; ++k) {
    const float e = hf_load(codebook[j * c + k]);
    acc = hf_dot_step(acc, e, e);
  }
  out[j] = acc;
}

template <typename S>
__global__ void __launch_bounds__(kThreads)
    vq_nearest_kernel(const S* __restrict__ z, const S* __restrict__ codebook,
                      const float* __restrict__ code_sq, int64_t n, int64_t v, int64_t c,
                      int64_t* __restrict__ out) {
  __shared__ float zs[kChunk][kRows + 1];
  __shared__ float es[kChunk][kCodes + 1];
  __shared__ float zz[kRows];

  const int tid = threadIdx.x;
  const int rg = tid / kGroups;  // row group
  const int cg = tid % kGroups;  // code group (consecutive lanes)
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;

  // ||z_r||^2, sequential over channels, one thread per row.
  if (tid < kRows) {
    float acc = 0.0f;
    const int64_t r = row0 + tid;
    if (r < n) {
      for (int64_t k = 0; k < c; ++k) {
        const float x = hf_load(z[r * c + k]);
        acc = hf_dot_step(acc, x, x);
      }
    }
    zz[tid] = acc;
  }

  float best_d[kRowsPerThread];
  int64_t best_i[kRowsPerThread];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    best_d[i] = 0.0f;
    best_i[i] = -1;
  }

  for (int64_t v0 = 0; v0 < v; v0 += kCodes) {
    float acc[kRowsPerThread][kCodesPerThread];
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
#pragma unroll
      for (int k = 0; k < kCodesPerThread; ++k) acc[i][k] = 0.0f;
    }

    for (int64_t c0 = 0; c0 < c; c0 += kChunk) {
      __syncthreads();  // previous chunk fully consumed (and zz written)
      // Global reads are coalesced along channels; the stores transpose.
      for (int e = tid; e < kRows * kChunk; e += kThreads) {
        const int r = e / kChunk;
        const int k = e % kChunk;
        const int64_t gr = row0 + r;
        const int64_t gk = c0 + k;
        zs[k][r] = (gr < n && gk < c) ? hf_load(z[gr * c + gk]) : 0.0f;
      }
      for (int e = tid; e < kCodes * kChunk; e += kThreads) {
        const int j = e / kChunk;
        const int k = e % kChunk;
        const int64_t gj = v0 + j;
        const int64_t gk = c0 + k;
        es[k][j] = (gj < v && gk < c) ? hf_load(codebook[gj * c + gk]) : 0.0f;
      }
      __syncthreads();

      // Only real channels are accumulated: padding must not enter the sums.
      const int chunk = static_cast<int>(c - c0 < kChunk ? c - c0 : kChunk);
      for (int k = 0; k < chunk; ++k) {
        float zr[kRowsPerThread];
        float ev[kCodesPerThread];
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) zr[i] = zs[k][rg + kGroups * i];
#pragma unroll
        for (int q = 0; q < kCodesPerThread; ++q) ev[q] = es[k][cg + kGroups * q];
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) {
#pragma unroll
          for (int q = 0; q < kCodesPerThread; ++q) {
            acc[i][q] = hf_dot_step(acc[i][q], zr[i], ev[q]);
          }
        }
      }
    }

#pragma unroll
    for (int q = 0; q < kCodesPerThread; ++q) {
      const int64_t j = v0 + cg + kGroups * q;
      if (j >= v) continue;
      const float ee = code_sq[j];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
        const float d = hf_vq_distance(zz[rg + kGroups * i], ee, acc[i][q]);
        if (hf_argmin_better(d, j, best_d[i], best_i[i])) {
          best_d[i] = d;
          best_i[i] = j;
        }
      }
    }
  }

  // Merge the 16 code groups of each row group: they are 16 consecutive lanes
  // of one warp (lanes 0-15 or 16-31), so xor-shuffles by 8, 4, 2, 1 stay
  // inside the group.
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    float d = best_d[i];
    int64_t idx = best_i[i];
#pragma unroll
    for (int offset = kGroups / 2; offset > 0; offset >>= 1) {
      const float od = __shfl_xor_sync(0xffffffffu, d, offset);
      const long long oi = __shfl_xor_sync(0xffffffffu, static_cast<long long>(idx), offset);
      if (hf_argmin_better(od, oi, d, idx)) {
        d = od;
        idx = oi;
      }
    }
    const int64_t r = row0 + rg + kGroups * i;
    if (cg == 0 && r < n) out[r] = idx;
  }
}

template <typename S>
cudaError_t launch_typed(const S* z, const S* codebook, int64_t n, int64_t v, int64_t c,
                         float* code_sq, int64_t* out, cudaStream_t stream) {
  const int64_t norm_blocks = (v + kThreads - 1) / kThreads;
  const int64_t row_blocks = (n + kRows - 1) / kRows;
  if (norm_blocks > 0x7fffffff || row_blocks > 0x7fffffff) return cudaErrorInvalidValue;
  code_sq_norms_kernel<S><<<static_cast<unsigned int>(norm_blocks), kThreads, 0, stream>>>(
      codebook, v, c, code_sq);
  vq_nearest_kernel<S><<<static_cast<unsigned int>(row_blocks), kThreads, 0, stream>>>(
      z, codebook, code_sq, n, v, c, out);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_vq_nearest_code(const void* z, const void* codebook, DType dtype, int64_t n,
                                   int64_t v, int64_t c, float* code_sq_norms, int64_t* out,
                                   cudaStream_t stream) {
  if (n <= 0 || v <= 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      return launch_typed(static_cast<const float*>(z), static_cast<const float*>(codebook), n,
                          v, c, code_sq_norms, out, stream);
    case DType::kFloat16:
      return launch_typed(static_cast<const half_t*>(z), static_cast<const half_t*>(codebook),
                          n, v, c, code_sq_norms, out, stream);
    case DType::kBFloat16:
      return launch_typed(static_cast<const bf16_t*>(z), static_cast<const bf16_t*>(codebook),
                          n, v, c, code_sq_norms, out, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace hart_fast::gpu
