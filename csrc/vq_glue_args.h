// Torch-facing argument checks of the VQ-glue and IDDPM ops, shared by the
// CPU and CUDA registrations so both devices reject the same inputs with the
// same messages (ValueError / TypeError on the Python side).
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include "hart_fast/numerics.h"
#include "hart_fast/vq_glue.h"
#include "tensor_args.h"

namespace hart_fast::ops {

inline bool glue_float_dtype(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16;
}

// Validated (B, C, h, w) input and its freshly allocated (B, C, out_h, out_w)
// output of x.dtype.
struct ResizeArgs {
  at::Tensor x;    // contiguous
  at::Tensor out;  // contiguous
  int64_t planes = 0, in_h = 0, in_w = 0, out_h = 0, out_w = 0;
  DType dtype = DType::kFloat32;
};

inline ResizeArgs prepare_resize(const char* op, const at::Tensor& x, int64_t out_h,
                                 int64_t out_w) {
  TORCH_CHECK_TYPE(glue_float_dtype(x), op,
                   ": expected x to have dtype float32, float16 or bfloat16, but got ",
                   x.scalar_type(), ".");
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": expected x to be a 4-D tensor (B, C, h, w), but got x "
                    "with shape ", x.sizes(), ".");
  TORCH_CHECK_VALUE(x.size(2) > 0 && x.size(3) > 0, op,
                    ": expected x to have non-empty spatial dims, but got shape ", x.sizes(), ".");
  TORCH_CHECK_VALUE(out_h > 0 && out_w > 0, op, ": expected out_h and out_w to be positive, "
                    "but got (", out_h, ", ", out_w, ").");
  ResizeArgs a;
  a.x = x.contiguous();
  a.out = at::empty({x.size(0), x.size(1), out_h, out_w}, a.x.options());
  a.planes = x.size(0) * x.size(1);
  a.in_h = x.size(2);
  a.in_w = x.size(3);
  a.out_h = out_h;
  a.out_w = out_w;
  a.dtype = kernel_dtype(x.scalar_type());
  return a;
}

struct PhiArgs {
  at::Tensor up, conv;  // contiguous, dtype S
  int64_t numel = 0;
  DType dtype = DType::kFloat32;
};

inline PhiArgs prepare_phi(const at::Tensor& f_hat, const at::Tensor& up,
                           const at::Tensor& conv_out) {
  const char* op = "phi_blend_accumulate_";
  TORCH_CHECK_TYPE(f_hat.scalar_type() == at::kFloat, op,
                   ": expected f_hat to have dtype float32, but got ", f_hat.scalar_type(), ".");
  TORCH_CHECK_VALUE(f_hat.is_contiguous(), op, ": expected f_hat to be contiguous (it is "
                    "updated in place), but got strides ", f_hat.strides(), ".");
  TORCH_CHECK_TYPE(glue_float_dtype(up), op,
                   ": expected up to have dtype float32, float16 or bfloat16, but got ",
                   up.scalar_type(), ".");
  TORCH_CHECK_TYPE(conv_out.scalar_type() == up.scalar_type(), op,
                   ": expected conv_out to have the same dtype as up (", up.scalar_type(),
                   "), but got ", conv_out.scalar_type(), ".");
  TORCH_CHECK_VALUE(up.sizes() == f_hat.sizes() && conv_out.sizes() == f_hat.sizes(), op,
                    ": expected up and conv_out to have f_hat's shape ", f_hat.sizes(),
                    ", but got up ", up.sizes(), " and conv_out ", conv_out.sizes(), ".");
  TORCH_CHECK_VALUE(up.device() == f_hat.device() && conv_out.device() == f_hat.device(), op,
                    ": expected up and conv_out on f_hat's device (", f_hat.device(), ").");
  PhiArgs a;
  a.up = up.contiguous();
  a.conv = conv_out.contiguous();
  a.numel = f_hat.numel();
  a.dtype = kernel_dtype(up.scalar_type());
  return a;
}

struct IddpmArgs {
  at::Tensor x, model_out, noise, out;  // contiguous fp32
  int64_t n = 0, c = 0;
};

inline IddpmArgs prepare_iddpm(const at::Tensor& x, const at::Tensor& model_out,
                               const at::Tensor& noise, bool guided) {
  const char* op = "iddpm_step_fused";
  for (const at::Tensor* t : {&x, &model_out, &noise}) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, op,
                     ": expected x, model_out and noise to have dtype float32, but got ",
                     t->scalar_type(), ".");
    TORCH_CHECK_VALUE(t->device() == x.device(), op,
                      ": expected x, model_out and noise on the same device.");
  }
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": expected x to be 2-D (N, C), but got shape ",
                    x.sizes(), ".");
  const int64_t n = x.size(0), c = x.size(1);
  const int64_t rows = guided ? 2 * n : n;
  TORCH_CHECK_VALUE(model_out.dim() == 2 && model_out.size(0) == rows &&
                        model_out.size(1) == 2 * c,
                    op, ": expected model_out with shape (", rows, ", ", 2 * c, ") for x ",
                    x.sizes(), (guided ? " (guided)" : " (unguided)"), ", but got ",
                    model_out.sizes(), ".");
  TORCH_CHECK_VALUE(noise.sizes() == x.sizes(), op, ": expected noise with x's shape ",
                    x.sizes(), ", but got ", noise.sizes(), ".");
  IddpmArgs a;
  a.x = x.contiguous();
  a.model_out = model_out.contiguous();
  a.noise = noise.contiguous();
  a.out = at::empty({n, c}, a.x.options());
  a.n = n;
  a.c = c;
  return a;
}

// The op's Python-double scalars as the kernels' floats; one definition so the CPU
// and CUDA kernels round them identically (1 + cfg is formed in double, as Python does).
inline IddpmScalars iddpm_scalars(double cfg, bool guided, double c_recip, double c_recipm1,
                           double c_coef1, double c_coef2, double min_log, double max_log,
                           double nonzero, double temperature) {
  IddpmScalars s;
  s.one_plus_cfg = static_cast<float>(1.0 + cfg);
  s.cfg = static_cast<float>(cfg);
  s.recip = static_cast<float>(c_recip);
  s.recipm1 = static_cast<float>(c_recipm1);
  s.coef1 = static_cast<float>(c_coef1);
  s.coef2 = static_cast<float>(c_coef2);
  s.min_log = static_cast<float>(min_log);
  s.max_log = static_cast<float>(max_log);
  s.nonzero = static_cast<float>(nonzero);
  s.temperature = static_cast<float>(temperature);
  s.guided = guided;
  return s;
}

}  // namespace hart_fast::ops
