// CPU implementation of vq_nearest_code: fused distance + argmin that never
// materialises the (N, V) distance matrix.
//
// Layout choice: the codebook is packed once per call into fp32 panels of 16
// codes stored channel-major.  A 4-row x 16-code register block then
// vectorises over codes, while each (row, code) dot product is still the
// sequential channel sum prescribed by hart_fast/vq.h (the same order the
// CUDA kernel uses), so results do not depend on the SIMD width.
#include <algorithm>
#include <cstring>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "../tensor_args.h"
#include "cpu_kernels.h"
#include "hart_fast/vq.h"

namespace hart_fast::cpu {
namespace {

constexpr int64_t kRowTile = 4;    // rows sharing each loaded codebook vector
constexpr int64_t kCodeTile = 16;  // codes per packed panel

// dots[i][j] = sum_k z[i][k] * panel[k][j], each sum sequential in k exactly
// like hf_dot_step: one rounded multiply, then one rounded add (no FMA:
// -ffp-contract=off).  Vectorising over codes j never reassociates a sum, so
// the bits do not depend on the SIMD width.  The explicit vector type keeps the
// 4 x 16 accumulator block in registers (left to itself GCC vectorises over k
// with shuffles).  On x86-64 GCC also emits an AVX2 clone chosen at load time,
// since the baseline build may only assume SSE2.
#if defined(__GNUC__)
typedef float v8f __attribute__((vector_size(32)));
// Same vector with 4-byte alignment: dereferencing it is one unaligned
// vector load/store (memcpy into a v8f array made GCC bounce the data through
// the stack with mismatched widths, stalling store forwarding).
typedef float v8f_unaligned __attribute__((vector_size(32), aligned(4)));
constexpr int64_t kVecPerPanel = kCodeTile / 8;

#if !defined(__clang__) && defined(__x86_64__)
__attribute__((target_clones("avx2", "default")))
#endif
void dot_panel(const float* __restrict__ z, int64_t c, const float* __restrict__ panel,
               float* __restrict__ dots /* kRowTile x kCodeTile */) {
  v8f acc[kRowTile][kVecPerPanel] = {};
  for (int64_t k = 0; k < c; ++k) {
    const float* ek = panel + k * kCodeTile;
    v8f e[kVecPerPanel];
    for (int64_t q = 0; q < kVecPerPanel; ++q) e[q] = *reinterpret_cast<const v8f_unaligned*>(ek + 8 * q);
    for (int64_t i = 0; i < kRowTile; ++i) {
      const float zk = z[i * c + k];
      for (int64_t q = 0; q < kVecPerPanel; ++q) acc[i][q] = acc[i][q] + zk * e[q];
    }
  }
  for (int64_t i = 0; i < kRowTile; ++i) {
    for (int64_t q = 0; q < kVecPerPanel; ++q) {
      *reinterpret_cast<v8f_unaligned*>(dots + i * kCodeTile + 8 * q) = acc[i][q];
    }
  }
}
#else
void dot_panel(const float* z, int64_t c, const float* panel, float* dots) {
  float acc[kRowTile][kCodeTile] = {};
  for (int64_t k = 0; k < c; ++k) {
    for (int64_t i = 0; i < kRowTile; ++i) {
      for (int64_t j = 0; j < kCodeTile; ++j) {
        acc[i][j] = hf_dot_step(acc[i][j], z[i * c + k], panel[k * kCodeTile + j]);
      }
    }
  }
  std::memcpy(dots, acc, sizeof(acc));
}
#endif

template <typename S>
void vq_impl(const S* z, const S* codebook, int64_t n, int64_t v, int64_t c, int64_t* out) {
  // Codebook packed in fp32 as panels of kCodeTile codes, channel-major inside
  // a panel: panel p holds codes [p*16, p*16+16) as (C, 16).  Padding codes are
  // zero and never considered.
  const int64_t panels = (v + kCodeTile - 1) / kCodeTile;
  std::vector<float> packed(static_cast<size_t>(panels * c * kCodeTile), 0.0f);
  std::vector<float> ee(static_cast<size_t>(panels * kCodeTile), 0.0f);  // ||e_v||^2, padded
  at::parallel_for(0, v, 256, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      float* dst = packed.data() + (j / kCodeTile) * c * kCodeTile + (j % kCodeTile);
      float acc = 0.0f;
      for (int64_t k = 0; k < c; ++k) {
        const float e = hf_load(codebook[j * c + k]);
        dst[k * kCodeTile] = e;
        acc = hf_dot_step(acc, e, e);
      }
      ee[j] = acc;
    }
  });

  const int64_t row_tiles = (n + kRowTile - 1) / kRowTile;
  at::parallel_for(0, row_tiles, 1, [&](int64_t tile_begin, int64_t tile_end) {
    std::vector<float> zf(static_cast<size_t>(kRowTile * c));
    float dots[kRowTile * kCodeTile];
    for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
      const int64_t row0 = tile * kRowTile;
      const int64_t rows = std::min(kRowTile, n - row0);
      float zz[kRowTile];
      float best_d[kRowTile];
      int64_t best_i[kRowTile];
      for (int64_t i = 0; i < kRowTile; ++i) {
        float s = 0.0f;
        for (int64_t k = 0; k < c; ++k) {
          const float x = i < rows ? hf_load(z[(row0 + i) * c + k]) : 0.0f;
          zf[i * c + k] = x;
          s = hf_dot_step(s, x, x);
        }
        zz[i] = s;
        best_d[i] = 0.0f;
        best_i[i] = -1;
      }
      for (int64_t p = 0; p < panels; ++p) {
        dot_panel(zf.data(), c, packed.data() + p * c * kCodeTile, dots);
        const int64_t codes = std::min(kCodeTile, v - p * kCodeTile);
        const float* eep = ee.data() + p * kCodeTile;
        for (int64_t i = 0; i < rows; ++i) {
          float d[kCodeTile];
          for (int64_t j = 0; j < kCodeTile; ++j) {
            d[j] = hf_vq_distance(zz[i], eep[j], dots[i * kCodeTile + j]);
          }
          if (codes == kCodeTile && best_i[i] >= 0) {
            // Fast reject (vectorised): every index here is above best_i, so
            // only a strictly smaller distance or a NaN could win.
            float m = d[0];
            bool any_nan = false;
            for (int64_t j = 0; j < kCodeTile; ++j) {
              m = d[j] < m ? d[j] : m;
              any_nan |= hf_isnan(d[j]);
            }
            if (!any_nan && !(m < best_d[i])) continue;
          }
          for (int64_t j = 0; j < codes; ++j) {
            const int64_t idx = p * kCodeTile + j;
            if (hf_argmin_better(d[j], idx, best_d[i], best_i[i])) {
              best_d[i] = d[j];
              best_i[i] = idx;
            }
          }
        }
      }
      for (int64_t i = 0; i < rows; ++i) out[row0 + i] = best_i[i];
    }
  });
}

}  // namespace

void vq_nearest_code(const void* z, const void* codebook, DType dtype, int64_t n, int64_t v,
                     int64_t c, int64_t* out) {
  if (n <= 0) return;
  switch (dtype) {
    case DType::kFloat32:
      vq_impl(static_cast<const float*>(z), static_cast<const float*>(codebook), n, v, c, out);
      break;
    case DType::kFloat16:
      vq_impl(static_cast<const half_t*>(z), static_cast<const half_t*>(codebook), n, v, c, out);
      break;
    case DType::kBFloat16:
      vq_impl(static_cast<const bf16_t*>(z), static_cast<const bf16_t*>(codebook), n, v, c, out);
      break;
  }
}

}  // namespace hart_fast::cpu

namespace hart_fast::ops {
namespace {

at::Tensor vq_nearest_code_cpu(const at::Tensor& z, const at::Tensor& codebook) {
  VQArgs a = prepare_vq_nearest_code(z, codebook);
  cpu::vq_nearest_code(a.z.data_ptr(), a.codebook.data_ptr(), a.dtype, a.n, a.v, a.c,
                       a.out.data_ptr<int64_t>());
  return a.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hart_fast, CPU, m) { m.impl("vq_nearest_code", &vq_nearest_code_cpu); }

}  // namespace hart_fast::ops
