// Torch-facing argument validation and preparation shared by the CPU and
// CUDA registrations of each op.  Everything device specific (kernels,
// streams) stays out of here so both devices check arguments identically.
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>

#include "hart_fast/norm_modulate.h"
#include "hart_fast/numerics.h"

namespace hart_fast::ops {

// Maps a supported floating dtype onto the torch-free kernel enum (callers
// have validated the dtype already).
DType kernel_dtype(at::ScalarType type);

// Validated, contiguous operands of a norm+modulate call.  The tensors keep
// the (possibly copied) buffers alive for as long as `params` points at them.
struct NormModulateArgs {
  at::Tensor out;
  at::Tensor x;
  at::Tensor weight;
  at::Tensor bias;
  at::Tensor scale;
  at::Tensor shift;
  at::Tensor branch;  // residual-add variants only
  at::Tensor gate;
  at::Tensor sum;     // x + branch * gate, the variants' first output
  NormModulateParams params;
};

// Checks the arguments (throwing ValueError / TypeError with full sentences),
// makes x contiguous, upcasts weight / bias to fp32, brings scale / shift into
// a row-broadcast form and allocates the (contiguous, x.dtype) output.
NormModulateArgs prepare_norm_modulate(const char* op_name, const at::Tensor& x,
                                       const std::optional<at::Tensor>& weight,
                                       const std::optional<at::Tensor>& bias,
                                       const std::optional<at::Tensor>& scale,
                                       const std::optional<at::Tensor>& shift, double eps,
                                       bool layer_norm);

// The residual-add variants: everything prepare_norm_modulate does, plus
// branch (x's shape, dtype and device) and the optional gate (broadcast like
// scale / shift), and the allocated sum output that the kernel normalises.
NormModulateArgs prepare_add_norm_modulate(const char* op_name, const at::Tensor& x,
                                           const at::Tensor& branch,
                                           const std::optional<at::Tensor>& gate,
                                           const std::optional<at::Tensor>& weight,
                                           const std::optional<at::Tensor>& bias,
                                           const std::optional<at::Tensor>& scale,
                                           const std::optional<at::Tensor>& shift, double eps,
                                           bool layer_norm);

struct VQArgs {
  at::Tensor out;  // int64 (N,)
  at::Tensor z;    // contiguous (N, C)
  at::Tensor codebook;  // contiguous (V, C)
  int64_t n = 0;
  int64_t v = 0;
  int64_t c = 0;
  DType dtype = DType::kFloat32;
};

VQArgs prepare_vq_nearest_code(const at::Tensor& z, const at::Tensor& codebook);

}  // namespace hart_fast::ops
