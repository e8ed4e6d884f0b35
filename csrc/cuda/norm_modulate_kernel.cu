// CUDA kernel of rms_norm_modulate / layer_norm_modulate (plain CUDA, no
// torch; see launchers.h for why).
//
// One block of kNormLanes threads per row.  Thread t accumulates elements
// t, t + kNormLanes, ... in order and the block folds the partials with the
// pairwise tree of hf_fold_lanes, i.e. exactly the CPU kernel's arithmetic, so
// both devices give bit-identical results.  The row is read from global memory
// once per pass (two passes for RMS, three for LayerNorm); rows are at most a
// few KB, so the re-reads hit L1/L2.  The residual-add variant forms
// x + branch * gate in the first pass and stores it before normalising it.
#include <climits>

#include <cuda_runtime.h>

#include "hart_fast/norm_modulate.h"
#include "launchers.h"

namespace hart_fast::gpu {
namespace {

// Block-wide sum with the hf_fold_lanes pairing; every thread gets the total.
__device__ __forceinline__ float block_fold(float partial, float* red) {
  red[threadIdx.x] = partial;
  __syncthreads();
  for (int stride = kNormLanes / 2; stride > 0; stride >>= 1) {
    if (static_cast<int>(threadIdx.x) < stride) {
      red[threadIdx.x] = hf_add(red[threadIdx.x], red[threadIdx.x + stride]);
    }
    __syncthreads();
  }
  const float total = red[0];
  __syncthreads();  // red is reused by the next fold
  return total;
}

template <typename S, bool kLayer, bool kAdd>
__global__ void __launch_bounds__(kNormLanes) norm_modulate_kernel(NormModulateParams p) {
  __shared__ float red[kNormLanes];
  const int64_t row = blockIdx.x;
  const int64_t cols = p.cols;
  const int t = threadIdx.x;
  // With kAdd the normalised row is the residual sum, which this pass writes
  // to sum_out; the later passes re-read it from there.  Each thread touches
  // the same columns in every pass, so it only reads its own writes.
  const S* __restrict__ x_in = static_cast<const S*>(p.x) + row * cols;
  const S* x = kAdd ? static_cast<const S*>(p.sum_out) + row * cols : x_in;
  S* __restrict__ y_out = static_cast<S*>(p.out) + row * cols;

  float acc = 0.0f;
  if (kAdd) {
    const S* __restrict__ branch = static_cast<const S*>(p.branch) + row * cols;
    const S* gate_row =
        p.gate ? static_cast<const S*>(p.gate) + hf_operand_offset(row, p.gate_map, cols) : nullptr;
    S* sum_out = static_cast<S*>(p.sum_out) + row * cols;
    for (int64_t c = t; c < cols; c += kNormLanes) {
      const float v = hf_residual_add<S>(hf_load(x_in[c]), hf_load(branch[c]), gate_row, c);
      sum_out[c] = Storage<S>::store(v);
      acc = hf_add(acc, kLayer ? v : hf_rms_term(v));
    }
  } else {
    for (int64_t c = t; c < cols; c += kNormLanes) {
      const float v = hf_load(x[c]);
      acc = hf_add(acc, kLayer ? v : hf_rms_term(v));
    }
  }
  const float first = block_fold(acc, red);

  float mean = 0.0f;
  float inv = 0.0f;
  if (kLayer) {
    mean = hf_mean(first, cols);
    acc = 0.0f;
    for (int64_t c = t; c < cols; c += kNormLanes) {
      acc = hf_add(acc, hf_centered_sq(hf_load(x[c]), mean));
    }
    inv = hf_layer_rstd(block_fold(acc, red), cols, p.eps);
  } else {
    inv = hf_rms_inv(first, cols, p.eps);
  }

  const S* scale_row =
      p.scale ? static_cast<const S*>(p.scale) + hf_operand_offset(row, p.scale_map, cols)
              : nullptr;
  const S* shift_row =
      p.shift ? static_cast<const S*>(p.shift) + hf_operand_offset(row, p.shift_map, cols)
              : nullptr;
  for (int64_t c = t; c < cols; c += kNormLanes) {
    const float v = hf_load(x[c]);
    const float y = kLayer ? hf_layer_apply(v, mean, inv, p.weight, p.bias, c)
                           : hf_rms_apply<S>(v, inv, p.weight, c);
    y_out[c] = hf_norm_store<S, kLayer>(y, scale_row, shift_row, c);
  }
}

template <typename S, bool kAdd>
void launch_typed(const NormModulateParams& p, bool layer_norm, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned int>(p.rows));
  if (layer_norm) {
    norm_modulate_kernel<S, true, kAdd><<<grid, kNormLanes, 0, stream>>>(p);
  } else {
    norm_modulate_kernel<S, false, kAdd><<<grid, kNormLanes, 0, stream>>>(p);
  }
}

template <typename S>
void launch_typed(const NormModulateParams& p, bool layer_norm, cudaStream_t stream) {
  if (p.branch != nullptr) {
    launch_typed<S, true>(p, layer_norm, stream);
  } else {
    launch_typed<S, false>(p, layer_norm, stream);
  }
}

}  // namespace

cudaError_t launch_norm_modulate(const NormModulateParams& p, bool layer_norm,
                                 cudaStream_t stream) {
  if (p.rows <= 0) return cudaSuccess;
  if (p.rows > INT_MAX) return cudaErrorInvalidValue;  // grid.x limit (2^31 - 1)
  switch (p.dtype) {
    case DType::kFloat32:
      launch_typed<float>(p, layer_norm, stream);
      break;
    case DType::kFloat16:
      launch_typed<half_t>(p, layer_norm, stream);
      break;
    case DType::kBFloat16:
      launch_typed<bf16_t>(p, layer_norm, stream);
      break;
    default:  // nothing launched: never report success with `out` unwritten
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace hart_fast::gpu
