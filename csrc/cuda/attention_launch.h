// Plain C++ entry points of the attention / sampling CUDA kernels
// (attention_kernel.cu); see launchers.h for why the kernels stay torch-free.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "hart_fast/attention.h"

namespace hart_fast::gpu {

cudaError_t launch_qkv_rope_cache(const QkvRopeParams& p, cudaStream_t stream);

// Number of KV splits the attention launch will use for p on a GPU with
// num_sms multiprocessors (1 = no split).  The caller allocates the split
// workspace from it: part_acc (splits * B * H * lq * d) and part_ml
// (splits * B * H * lq * 2) floats.
int attention_num_splits(const AttnParams& p, int num_sms);

// Flash-style attention.  With splits > 1 every CTA writes fp32 partials
// (running max, sum, unnormalised accumulator) of its KV range to the
// workspace and a combine kernel merges them; otherwise part_* may be null.
cudaError_t launch_attention(const AttnParams& p, int splits, float* part_acc, float* part_ml,
                             cudaStream_t stream);

// CFG combine + top-k for rows contiguous rows of length V; k == 0 keeps all.
cudaError_t launch_cfg_top_k(const float* logits, float* out, int64_t rows, int64_t V,
                             int64_t half_offset, int64_t k, float one_plus_t, float t,
                             cudaStream_t stream);

}  // namespace hart_fast::gpu
