#include "group_norm_silu_args.h"

#include <cmath>

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

namespace hart_fast::ops {
namespace {

constexpr const char* kOp = "group_norm_silu";

at::Tensor prepare_param(const char* name, const at::Tensor& t, const at::Tensor& x) {
  const int64_t C = x.size(1);
  TORCH_CHECK_VALUE(t.device() == x.device(), kOp, ": expected ", name,
                    " to be on the same device as x (", x.device(), "), but got ", name, " on ",
                    t.device(), ".");
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == C, kOp, ": expected ", name,
                    " to be a 1-D tensor of shape (", C, ",) matching the channels of x, but got ",
                    name, " with shape ", t.sizes(), ".");
  // F.group_norm takes parameters in x.dtype or (mixed precision) fp32.
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type() || t.scalar_type() == at::kFloat, kOp,
                   ": expected ", name, " to have dtype ", x.scalar_type(),
                   " (like x) or Float, but got ", name, " with dtype ", t.scalar_type(), ".");
  return t.to(at::kFloat).contiguous();  // exact upcast; the math is fp32
}

}  // namespace

GroupNormSiluArgs prepare_group_norm_silu(const at::Tensor& x_in,
                                          const std::optional<at::Tensor>& weight,
                                          const std::optional<at::Tensor>& bias, int64_t groups,
                                          double eps, bool silu) {
  TORCH_CHECK_VALUE(x_in.dim() >= 2, kOp,
                    ": expected x to have shape (B, C, *spatial) with at least 2 dimensions, "
                    "but got x with shape ",
                    x_in.sizes(), ".");
  const at::ScalarType dt = x_in.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, kOp,
                   ": expected x to have dtype Float, Half or BFloat16, but got x with dtype ",
                   dt, ".");
  const int64_t C = x_in.size(1);
  TORCH_CHECK_VALUE(groups >= 1 && C % groups == 0, kOp, ": expected groups (", groups,
                    ") to be positive and to divide the number of channels of x (", C,
                    "), but got x with shape ", x_in.sizes(), ".");
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0.0, kOp,
                    ": expected eps to be a finite non-negative number, but got ", eps, ".");

  GroupNormSiluArgs a;
  const bool cl = x_in.dim() == 4 && !x_in.is_contiguous() &&
                  x_in.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::MemoryFormat fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  a.x = x_in.contiguous(fmt);
  if (weight.has_value()) a.weight = prepare_param("weight", *weight, a.x);
  if (bias.has_value()) a.bias = prepare_param("bias", *bias, a.x);
  a.out = at::empty(a.x.sizes(), a.x.options().memory_format(fmt));

  GroupNormSiluParams& p = a.params;
  p.x = a.x.data_ptr();
  p.out = a.out.data_ptr();
  p.weight = a.weight.defined() ? a.weight.data_ptr<float>() : nullptr;
  p.bias = a.bias.defined() ? a.bias.data_ptr<float>() : nullptr;
  p.batch = a.x.size(0);
  p.channels = C;
  p.hw = 1;
  for (int64_t d = 2; d < a.x.dim(); ++d) p.hw *= a.x.size(d);
  p.groups = groups;
  p.eps = static_cast<float>(eps);  // torch's kernels use eps as an fp32 scalar
  p.silu = silu;
  p.channels_last = cl;
  p.dtype = kernel_dtype(dt);
  return a;
}

}  // namespace hart_fast::ops
