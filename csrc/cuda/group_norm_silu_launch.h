// Torch-free launcher of the fused GroupNorm + SiLU CUDA kernels (see
// group_norm_silu_kernel.cu; launchers.h explains the torch-free split).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "hart_fast/group_norm_silu.h"

namespace hart_fast::gpu {

// Number of pieces the statistics pass cuts each reduction into (a pure
// function of the shape, so results are deterministic for a given shape).
int64_t group_norm_silu_splits(const GroupNormSiluParams& p);

// Enqueues statistics, combine and elementwise kernels on `stream`.
// partials: device scratch of 2 * B * C * splits doubles; coefs: device
// scratch of B * C GnCoef; splits = group_norm_silu_splits(p).
cudaError_t launch_group_norm_silu(const GroupNormSiluParams& p, double* partials, GnCoef* coefs,
                                   int64_t splits, cudaStream_t stream);

}  // namespace hart_fast::gpu
