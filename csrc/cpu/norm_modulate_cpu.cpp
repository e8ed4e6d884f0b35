// CPU implementation of rms_norm_modulate / layer_norm_modulate.
//
// Rows are independent, so we parallelise over rows with at::parallel_for
// (torch's intra-op pool, honouring torch.set_num_threads).  Within a row the
// arithmetic is exactly the shared per-element math of
// hart_fast/norm_modulate.h, including the kNormLanes lane layout of the row
// sums, so this kernel produces the same bits as the CUDA kernel.
#include <algorithm>
#include <tuple>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "../tensor_args.h"
#include "cpu_kernels.h"
#include "hart_fast/norm_modulate.h"

namespace hart_fast::cpu {
namespace {

// Accumulates term(x[c]) into kNormLanes lanes (lane j: c = j, j + lanes, ...)
// and folds them.  The inner loop runs over independent lanes, so the compiler
// vectorises it without reassociating any sum.
template <typename Term>
float lane_sum(const float* x, int64_t cols, float* lanes, Term term) {
  std::fill(lanes, lanes + kNormLanes, 0.0f);
  for (int64_t base = 0; base < cols; base += kNormLanes) {
    const int64_t n = std::min<int64_t>(kNormLanes, cols - base);
    const float* xb = x + base;
    for (int64_t j = 0; j < n; ++j) lanes[j] = hf_add(lanes[j], term(xb[j]));
  }
  hf_fold_lanes(lanes);
  return lanes[0];
}

template <typename S, bool kLayer>
void norm_rows(const NormModulateParams& p, int64_t begin, int64_t end) {
  const int64_t cols = p.cols;
  const S* x = static_cast<const S*>(p.x);
  S* out = static_cast<S*>(p.out);
  const S* scale = static_cast<const S*>(p.scale);
  const S* shift = static_cast<const S*>(p.shift);
  const float* weight = p.weight;
  const float* bias = p.bias;
  const S* branch = static_cast<const S*>(p.branch);
  const S* gate = static_cast<const S*>(p.gate);
  S* sum_out = static_cast<S*>(p.sum_out);
  std::vector<float> xbuf(static_cast<size_t>(cols));
  std::vector<float> ybuf(static_cast<size_t>(cols));
  float* __restrict__ xf = xbuf.data();
  float* __restrict__ y = ybuf.data();
  alignas(64) float lanes[kNormLanes];

  for (int64_t row = begin; row < end; ++row) {
    const S* __restrict__ xr = x + row * cols;
    S* __restrict__ yr = out + row * cols;
    for (int64_t c = 0; c < cols; ++c) xf[c] = hf_load(xr[c]);
    if (branch != nullptr) {
      // Residual-add variant: the row normalised below is the stored sum.
      const S* __restrict__ br = branch + row * cols;
      const S* __restrict__ gr = gate ? gate + hf_operand_offset(row, p.gate_map, cols) : nullptr;
      S* __restrict__ sr = sum_out + row * cols;
      if (gr != nullptr) {  // two loops so each one vectorises without a per-element branch
        for (int64_t c = 0; c < cols; ++c) xf[c] = hf_residual_add<S>(xf[c], hf_load(br[c]), gr, c);
      } else {
        for (int64_t c = 0; c < cols; ++c) {
          xf[c] = hf_residual_add<S>(xf[c], hf_load(br[c]), static_cast<const S*>(nullptr), c);
        }
      }
      for (int64_t c = 0; c < cols; ++c) sr[c] = Storage<S>::store(xf[c]);
    }

    // Each step below is one simple loop over the row so that the compiler
    // vectorises it (optional operands are branched on once per row, not per
    // element).  The per-element operations and their order are exactly those
    // of hf_layer_apply + hf_layer_modulate_store / hf_rms_apply + hf_modulate_store
    // used on the GPU.
    if (kLayer) {
      const float mean = hf_mean(lane_sum(xf, cols, lanes, [](float v) { return v; }), cols);
      const float sq =
          lane_sum(xf, cols, lanes, [mean](float v) { return hf_centered_sq(v, mean); });
      const float rstd = hf_layer_rstd(sq, cols, p.eps);
      for (int64_t c = 0; c < cols; ++c) y[c] = hf_layer_normalize(xf[c], mean, rstd);
    } else {
      const float inv = hf_rms_inv(lane_sum(xf, cols, lanes, hf_rms_term), cols, p.eps);
      for (int64_t c = 0; c < cols; ++c) y[c] = hf_rms_normalize(xf[c], inv);
    }
    const S* __restrict__ sc = scale ? scale + hf_operand_offset(row, p.scale_map, cols) : nullptr;
    const S* __restrict__ sh = shift ? shift + hf_operand_offset(row, p.shift_map, cols) : nullptr;
    if (kLayer) {  // hf_layer_apply + hf_layer_modulate_store: float32 up to the store
      if (weight != nullptr) {
        for (int64_t c = 0; c < cols; ++c) y[c] = hf_weight_step(y[c], weight[c]);
      }
      if (bias != nullptr) {
        for (int64_t c = 0; c < cols; ++c) y[c] = hf_bias_step(y[c], bias[c]);
      }
      if (sc != nullptr) {
        for (int64_t c = 0; c < cols; ++c) y[c] = hf_layer_scale_step<S>(y[c], hf_load(sc[c]));
      }
      if (sh != nullptr) {
        for (int64_t c = 0; c < cols; ++c) y[c] = hf_add(y[c], hf_load(sh[c]));
      }
    } else {  // hf_rms_apply + hf_modulate_store: rounded to S at every official step
      for (int64_t c = 0; c < cols; ++c) y[c] = hf_round_to<S>(y[c]);
      if (weight != nullptr) {
        for (int64_t c = 0; c < cols; ++c) y[c] = hf_rms_weight_step<S>(y[c], weight[c]);
      }
      if (sc != nullptr) {
        for (int64_t c = 0; c < cols; ++c) y[c] = hf_scale_step<S>(y[c], hf_load(sc[c]));
      }
      if (sh != nullptr) {
        for (int64_t c = 0; c < cols; ++c) y[c] = hf_shift_step<S>(y[c], hf_load(sh[c]));
      }
    }
    for (int64_t c = 0; c < cols; ++c) yr[c] = Storage<S>::store(y[c]);
  }
}

template <typename S>
void dispatch_norm(const NormModulateParams& p, bool layer_norm) {
  // Aim for ~64K elements per task so small inputs are not split needlessly.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(p.cols, 1));
  at::parallel_for(0, p.rows, grain, [&](int64_t begin, int64_t end) {
    if (layer_norm) {
      norm_rows<S, true>(p, begin, end);
    } else {
      norm_rows<S, false>(p, begin, end);
    }
  });
}

}  // namespace

void norm_modulate(const NormModulateParams& p, bool layer_norm) {
  if (p.rows <= 0) return;
  switch (p.dtype) {
    case DType::kFloat32:
      dispatch_norm<float>(p, layer_norm);
      break;
    case DType::kFloat16:
      dispatch_norm<half_t>(p, layer_norm);
      break;
    case DType::kBFloat16:
      dispatch_norm<bf16_t>(p, layer_norm);
      break;
  }
}

}  // namespace hart_fast::cpu

namespace hart_fast::ops {
namespace {

at::Tensor rms_norm_modulate_cpu(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& scale,
                                 const std::optional<at::Tensor>& shift, double eps) {
  NormModulateArgs a = prepare_norm_modulate("rms_norm_modulate", x, weight, std::nullopt,
                                             scale, shift, eps, /*layer_norm=*/false);
  cpu::norm_modulate(a.params, /*layer_norm=*/false);
  return a.out;
}

at::Tensor layer_norm_modulate_cpu(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                   const std::optional<at::Tensor>& bias,
                                   const std::optional<at::Tensor>& scale,
                                   const std::optional<at::Tensor>& shift, double eps) {
  NormModulateArgs a = prepare_norm_modulate("layer_norm_modulate", x, weight, bias, scale,
                                             shift, eps, /*layer_norm=*/true);
  cpu::norm_modulate(a.params, /*layer_norm=*/true);
  return a.out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_modulate_cpu(
    const at::Tensor& x, const at::Tensor& branch, const std::optional<at::Tensor>& gate,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& shift, double eps) {
  NormModulateArgs a = prepare_add_norm_modulate("add_rms_norm_modulate", x, branch, gate, weight,
                                                 std::nullopt, scale, shift, eps,
                                                 /*layer_norm=*/false);
  cpu::norm_modulate(a.params, /*layer_norm=*/false);
  return {a.sum, a.out};
}

std::tuple<at::Tensor, at::Tensor> add_layer_norm_modulate_cpu(
    const at::Tensor& x, const at::Tensor& branch, const std::optional<at::Tensor>& gate,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, double eps) {
  NormModulateArgs a = prepare_add_norm_modulate("add_layer_norm_modulate", x, branch, gate,
                                                 weight, bias, scale, shift, eps,
                                                 /*layer_norm=*/true);
  cpu::norm_modulate(a.params, /*layer_norm=*/true);
  return {a.sum, a.out};
}

}  // namespace

TORCH_LIBRARY_IMPL(hart_fast, CPU, m) {
  m.impl("rms_norm_modulate", &rms_norm_modulate_cpu);
  m.impl("layer_norm_modulate", &layer_norm_modulate_cpu);
  m.impl("add_rms_norm_modulate", &add_rms_norm_modulate_cpu);
  m.impl("add_layer_norm_modulate", &add_layer_norm_modulate_cpu);
}

}  // namespace hart_fast::ops
