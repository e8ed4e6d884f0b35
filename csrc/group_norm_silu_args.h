// Torch-facing argument validation of group_norm_silu, shared by its CPU and
// CUDA registrations (kept out of tensor_args.h so ops stay independent).
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>

#include "hart_fast/group_norm_silu.h"
#include "tensor_args.h"

namespace hart_fast::ops {

struct GroupNormSiluArgs {
  at::Tensor out;     // x's shape and dtype, in x's layout (see below)
  at::Tensor x;       // NCHW- or NHWC-contiguous
  at::Tensor weight;  // fp32 (C,) or undefined
  at::Tensor bias;    // fp32 (C,) or undefined
  GroupNormSiluParams params;
};

// Layout rule (the fake kernel in hart_fast/ops/_meta.py repeats it): a 4-D x
// that is channels_last-contiguous but not NCHW-contiguous is processed, and
// returned, in channels_last; every other x is made NCHW-contiguous (a copy
// when it is not already) and the output is NCHW-contiguous.
GroupNormSiluArgs prepare_group_norm_silu(const at::Tensor& x,
                                          const std::optional<at::Tensor>& weight,
                                          const std::optional<at::Tensor>& bias, int64_t groups,
                                          double eps, bool silu);

}  // namespace hart_fast::ops
