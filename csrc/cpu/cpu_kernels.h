// Raw-pointer CPU kernels (no at::Tensor in the interface) so the C++ tests in
// csrc/tests/ can drive them directly; the torch registration lives in
// *_cpu.cpp next to the implementations.
#pragma once

#include <cstdint>

#include "hart_fast/norm_modulate.h"
#include "hart_fast/numerics.h"

namespace hart_fast::cpu {

// Runs rms (layer_norm == false) or layer norm + modulation on p.rows rows.
void norm_modulate(const NormModulateParams& p, bool layer_norm);

// out[n] = argmin_v ||z[n] - codebook[v]||^2; z (n, c), codebook (v, c), both
// contiguous with elements of `dtype`.
void vq_nearest_code(const void* z, const void* codebook, DType dtype, int64_t n, int64_t v,
                     int64_t c, int64_t* out);

}  // namespace hart_fast::cpu
