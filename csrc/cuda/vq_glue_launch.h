// Plain C++ entry points of the VQ-glue / IDDPM CUDA kernels (no torch; see
// launchers.h for why the .cu files stay torch-free).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "hart_fast/numerics.h"
#include "hart_fast/vq_glue.h"

namespace hart_fast::gpu {

// x (planes, ih, iw) -> out (planes, oh, ow), contiguous, elements of dtype.
cudaError_t launch_bicubic_upsample(const void* x, void* out, DType dtype, int64_t planes,
                                    int64_t ih, int64_t iw, int64_t oh, int64_t ow,
                                    cudaStream_t stream);
cudaError_t launch_area_downsample(const void* x, void* out, DType dtype, int64_t planes,
                                   int64_t ih, int64_t iw, int64_t oh, int64_t ow,
                                   cudaStream_t stream);
// f (n) fp32 updated in place; up / conv (n) of dtype.
cudaError_t launch_phi_blend_accumulate(float* f, const void* up, const void* conv, DType dtype,
                                        int64_t n, float one_minus_r, float r,
                                        cudaStream_t stream);
// x, noise, out (n, c) fp32; model_out (2n or n, 2c) fp32.
cudaError_t launch_iddpm_step(const float* x, const float* model_out, const float* noise,
                              float* out, int64_t n, int64_t c, const IddpmScalars& s,
                              cudaStream_t stream);

}  // namespace hart_fast::gpu
