// Plain C++ entry points of the CUDA kernels.
//
// The kernels (*.cu) include only CUDA and our own headers and never torch:
// a .cu that includes torch takes ~40 s to compile on a small machine, one that
// does not takes ~2 s.  The torch-facing halves (*_cuda.cpp: argument checks,
// allocation, current stream, TORCH_LIBRARY_IMPL) are compiled by the host
// compiler and call these launchers with raw pointers.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "hart_fast/norm_modulate.h"
#include "hart_fast/numerics.h"

namespace hart_fast::gpu {

// Enqueues the norm + modulation kernel on `stream`.  Returns the launch
// status (cudaSuccess, or the error cudaGetLastError reports).
cudaError_t launch_norm_modulate(const NormModulateParams& p, bool layer_norm,
                                 cudaStream_t stream);

// Enqueues the nearest-code search.  code_sq_norms is device scratch for V
// floats; z (n, c) and codebook (v, c) are contiguous device arrays of dtype.
cudaError_t launch_vq_nearest_code(const void* z, const void* codebook, DType dtype, int64_t n,
                                   int64_t v, int64_t c, float* code_sq_norms, int64_t* out,
                                   cudaStream_t stream);

}  // namespace hart_fast::gpu
