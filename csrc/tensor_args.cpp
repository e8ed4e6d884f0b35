#include "tensor_args.h"

#include <cmath>
#include <vector>

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

namespace hart_fast::ops {
namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// Brings a scale / shift / gate operand into the (outer, C) row layout that
// RowBroadcast indexes: a view when possible, a copy when its rows are not
// evenly spaced with unit column stride, an expansion to full size when the
// broadcast pattern is not a single block of x's leading dims.
RowBroadcast broadcast_rows(const char* op, const char* name, at::Tensor& t,
                            const at::Tensor& x) {
  const int64_t ndim = x.dim();
  const int64_t cols = x.size(-1);
  TORCH_CHECK_VALUE(t.dim() >= 1 && t.dim() <= ndim, op, ": expected ", name,
                    " to have between 1 and ", ndim,
                    " dimensions so that it broadcasts against x of shape ", x.sizes(),
                    ", but got ", name, " with shape ", t.sizes(), ".");
  TORCH_CHECK_VALUE(t.size(-1) == cols, op, ": expected the last dimension of ", name,
                    " to equal the last dimension of x (", cols, "), but got ", name,
                    " with shape ", t.sizes(), " for x of shape ", x.sizes(), ".");
  // Right-align t's shape against x's.
  std::vector<int64_t> tsz(ndim, 1);
  for (int64_t k = 0; k < t.dim(); ++k) tsz[ndim - t.dim() + k] = t.size(k);

  int64_t first = -1;
  int64_t last = -1;
  for (int64_t k = 0; k < ndim - 1; ++k) {
    if (tsz[k] == 1) continue;
    TORCH_CHECK_VALUE(tsz[k] == x.size(k), op, ": ", name, " with shape ", t.sizes(),
                      " does not broadcast against x of shape ", x.sizes(),
                      " (dimension ", k - ndim, " of ", name, " is ", tsz[k],
                      " but must be 1 or ", x.size(k), ").");
    if (first < 0) first = k;
    last = k;
  }
  if (first < 0) {  // one row shared by every row of x
    t = t.reshape({1, cols}).contiguous();
    return RowBroadcast{1, 1};
  }
  for (int64_t k = first; k <= last; ++k) {
    if (tsz[k] != x.size(k)) {
      // Non-contiguous broadcast block, e.g. (B, 1, W, C) against (B, H, W, C):
      // rare, so pay for one expansion rather than a general index decoder.
      t = t.expand(x.sizes()).contiguous();
      int64_t rows = 1;
      for (int64_t j = 0; j < ndim - 1; ++j) rows *= x.size(j);
      return RowBroadcast{1, rows > 0 ? rows : 1};
    }
  }
  int64_t outer = 1;
  int64_t inner = 1;
  for (int64_t k = first; k <= last; ++k) outer *= x.size(k);
  for (int64_t k = last + 1; k < ndim - 1; ++k) inner *= x.size(k);
  // (outer, C) rows: a view when the operand's rows are evenly spaced with
  // unit column stride (e.g. a column slice of a wider matrix), else a copy.
  t = t.reshape({outer, cols});
  if (t.stride(1) != 1 || (outer > 1 && t.stride(0) < cols)) t = t.contiguous();
  const int64_t row_stride = outer > 1 ? t.stride(0) : cols;
  // Guard the divisions in hf_broadcast_row for empty x (no kernel runs then).
  return RowBroadcast{inner > 0 ? inner : 1, outer > 0 ? outer : 1, row_stride};
}

void check_same_device(const char* op, const char* name, const at::Tensor& t,
                       const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": expected ", name,
                    " to be on the same device as ", ref_name, " (", ref.device(),
                    "), but got ", name, " on ", t.device(), ".");
}

// weight / bias: 1-D (C,), same device, dtype rules of the op.
at::Tensor prepare_affine(const char* op, const char* name, const at::Tensor& t,
                          const at::Tensor& x, bool layer_norm) {
  const int64_t cols = x.size(-1);
  check_same_device(op, name, t, x, "x");
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == cols, op, ": expected ", name,
                    " to be a 1-D tensor of shape (", cols,
                    ",) matching the last dimension of x, but got ", name, " with shape ",
                    t.sizes(), ".");
  if (layer_norm) {
    // F.layer_norm accepts parameters in x.dtype or (mixed precision) fp32.
    TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type() || t.scalar_type() == at::kFloat,
                     op, ": expected ", name, " to have dtype ", x.scalar_type(),
                     " (like x) or Float, but got ", name, " with dtype ", t.scalar_type(),
                     ".");
  } else {
    TORCH_CHECK_TYPE(is_supported_float(t.scalar_type()), op, ": expected ", name,
                     " to have dtype Float, Half or BFloat16, but got ", name,
                     " with dtype ", t.scalar_type(), ".");
  }
  // The reference multiplies in fp32; the upcast is exact.
  return t.to(at::kFloat).contiguous();
}

}  // namespace

DType kernel_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      break;
  }
  TORCH_CHECK_TYPE(false, "hart_fast: unsupported dtype ", type,
                   "; expected Float, Half or BFloat16.");
  return DType::kFloat32;  // unreachable: TORCH_CHECK_TYPE(false) throws
}

NormModulateArgs prepare_norm_modulate(const char* op, const at::Tensor& x_in,
                                       const std::optional<at::Tensor>& weight,
                                       const std::optional<at::Tensor>& bias,
                                       const std::optional<at::Tensor>& scale,
                                       const std::optional<at::Tensor>& shift, double eps,
                                       bool layer_norm) {
  TORCH_CHECK_VALUE(x_in.dim() >= 1 && x_in.size(-1) >= 1, op,
                    ": expected x to have at least one dimension with a non-empty last "
                    "dimension (the normalised channels), but got x with shape ",
                    x_in.sizes(), ".");
  TORCH_CHECK_TYPE(is_supported_float(x_in.scalar_type()), op,
                   ": expected x to have dtype Float, Half or BFloat16, but got x with dtype ",
                   x_in.scalar_type(), ".");
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0.0, op,
                    ": expected eps to be a finite non-negative number, but got ", eps, ".");

  NormModulateArgs a;
  a.x = x_in.contiguous();
  const at::Tensor& x = a.x;
  if (weight.has_value()) a.weight = prepare_affine(op, "weight", *weight, x, layer_norm);
  if (bias.has_value()) a.bias = prepare_affine(op, "bias", *bias, x, layer_norm);
  if (layer_norm && weight.has_value() && bias.has_value()) {
    TORCH_CHECK_TYPE(weight->scalar_type() == bias->scalar_type(), op,
                     ": expected weight and bias to have the same dtype, but got weight with "
                     "dtype ",
                     weight->scalar_type(), " and bias with dtype ", bias->scalar_type(), ".");
  }

  NormModulateParams& p = a.params;
  const char* names[2] = {"scale", "shift"};
  const std::optional<at::Tensor>* operands[2] = {&scale, &shift};
  at::Tensor* slots[2] = {&a.scale, &a.shift};
  RowBroadcast* maps[2] = {&p.scale_map, &p.shift_map};
  for (int i = 0; i < 2; ++i) {
    if (!operands[i]->has_value()) continue;
    at::Tensor t = **operands[i];
    check_same_device(op, names[i], t, x, "x");
    // `.mul(1 + scale)` in another dtype would promote the output dtype;
    // callers cast explicitly instead.
    TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), op, ": expected ", names[i],
                     " to have the same dtype as x (", x.scalar_type(), "), but got ",
                     names[i], " with dtype ", t.scalar_type(), ".");
    *maps[i] = broadcast_rows(op, names[i], t, x);
    *slots[i] = t;
  }

  a.out = at::empty(x.sizes(), x.options());
  p.x = x.data_ptr();
  p.out = a.out.data_ptr();
  p.weight = a.weight.defined() ? a.weight.data_ptr<float>() : nullptr;
  p.bias = a.bias.defined() ? a.bias.data_ptr<float>() : nullptr;
  p.scale = a.scale.defined() ? a.scale.data_ptr() : nullptr;
  p.shift = a.shift.defined() ? a.shift.data_ptr() : nullptr;
  p.cols = x.size(-1);
  p.rows = x.numel() / p.cols;
  p.eps = static_cast<float>(eps);  // the reference adds eps as an fp32 scalar
  p.dtype = kernel_dtype(x.scalar_type());
  return a;
}

NormModulateArgs prepare_add_norm_modulate(const char* op, const at::Tensor& x,
                                           const at::Tensor& branch,
                                           const std::optional<at::Tensor>& gate,
                                           const std::optional<at::Tensor>& weight,
                                           const std::optional<at::Tensor>& bias,
                                           const std::optional<at::Tensor>& scale,
                                           const std::optional<at::Tensor>& shift, double eps,
                                           bool layer_norm) {
  NormModulateArgs a = prepare_norm_modulate(op, x, weight, bias, scale, shift, eps, layer_norm);
  check_same_device(op, "branch", branch, a.x, "x");
  TORCH_CHECK_VALUE(branch.sizes() == a.x.sizes(), op,
                    ": expected branch to have the same shape as x (", a.x.sizes(),
                    "), but got branch with shape ", branch.sizes(), ".");
  TORCH_CHECK_TYPE(branch.scalar_type() == a.x.scalar_type(), op,
                   ": expected branch to have the same dtype as x (", a.x.scalar_type(),
                   "), but got branch with dtype ", branch.scalar_type(), ".");
  a.branch = branch.contiguous();
  NormModulateParams& p = a.params;
  if (gate.has_value()) {
    at::Tensor g = *gate;
    check_same_device(op, "gate", g, a.x, "x");
    TORCH_CHECK_TYPE(g.scalar_type() == a.x.scalar_type(), op,
                     ": expected gate to have the same dtype as x (", a.x.scalar_type(),
                     "), but got gate with dtype ", g.scalar_type(), ".");
    p.gate_map = broadcast_rows(op, "gate", g, a.x);
    a.gate = g;
    p.gate = a.gate.data_ptr();
  }
  a.sum = at::empty(a.x.sizes(), a.x.options());
  p.branch = a.branch.data_ptr();
  p.sum_out = a.sum.data_ptr();
  return a;
}

VQArgs prepare_vq_nearest_code(const at::Tensor& z, const at::Tensor& codebook) {
  constexpr const char* op = "vq_nearest_code";
  TORCH_CHECK_VALUE(z.dim() == 2, op, ": expected z to be a 2-D tensor of shape (N, C), but got z with shape ",
                    z.sizes(), ".");
  TORCH_CHECK_VALUE(codebook.dim() == 2 && codebook.size(0) >= 1 && codebook.size(1) >= 1,
                    op, ": expected codebook to be a non-empty 2-D tensor of shape (V, C), but "
                    "got codebook with shape ",
                    codebook.sizes(), ".");
  TORCH_CHECK_VALUE(z.size(1) == codebook.size(1), op,
                    ": expected z and codebook to have the same number of channels, but got z "
                    "with shape ",
                    z.sizes(), " and codebook with shape ", codebook.sizes(), ".");
  TORCH_CHECK_TYPE(is_supported_float(z.scalar_type()), op,
                   ": expected z to have dtype Float, Half or BFloat16, but got z with dtype ",
                   z.scalar_type(), ".");
  TORCH_CHECK_TYPE(codebook.scalar_type() == z.scalar_type(), op,
                   ": expected codebook to have the same dtype as z (", z.scalar_type(),
                   "), but got codebook with dtype ", codebook.scalar_type(), ".");
  check_same_device(op, "codebook", codebook, z, "z");

  VQArgs a;
  a.z = z.contiguous();
  a.codebook = codebook.contiguous();
  a.n = z.size(0);
  a.v = codebook.size(0);
  a.c = codebook.size(1);
  a.dtype = kernel_dtype(z.scalar_type());
  a.out = at::empty({a.n}, z.options().dtype(at::kLong));
  return a;
}

}  // namespace hart_fast::ops
