// CPU implementation of the VQ glue ops (bicubic_upsample, area_downsample,
// phi_blend_accumulate_) and of iddpm_step_fused.  The per-element math is
// hart_fast/vq_glue.h, shared with the CUDA kernels; here we only arrange the
// loops (taps precomputed once per axis, rows parallelised with
// at::parallel_for).
#include <algorithm>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "../vq_glue_args.h"
#include "hart_fast/vq_glue.h"

namespace hart_fast::cpu {
namespace {

template <typename S>
void bicubic_impl(const S* x, S* out, int64_t planes, int64_t ih, int64_t iw, int64_t oh,
                  int64_t ow) {
  // Taps depend only on the output coordinate: compute them once per axis.
  std::vector<CubicTaps> ty(static_cast<size_t>(oh)), tx(static_cast<size_t>(ow));
  for (int64_t i = 0; i < oh; ++i) ty[i] = hf_cubic_taps(i, ih, oh);
  for (int64_t i = 0; i < ow; ++i) tx[i] = hf_cubic_taps(i, iw, ow);
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(ow, 1));
  at::parallel_for(0, planes * oh, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t p = r / oh, oy = r % oh;
      const S* plane = x + p * ih * iw;
      const CubicTaps& yt = ty[oy];
      S* orow = out + r * ow;
      for (int64_t ox = 0; ox < ow; ++ox) {
        const CubicTaps& xt = tx[ox];
        float rows[4];
        for (int j = 0; j < 4; ++j) {
          const S* src = plane + yt.idx[j] * iw;
          rows[j] = hf_cubic_combine(hf_load(src[xt.idx[0]]), hf_load(src[xt.idx[1]]),
                                     hf_load(src[xt.idx[2]]), hf_load(src[xt.idx[3]]), xt.w);
        }
        orow[ox] = Storage<S>::store(hf_cubic_combine(rows[0], rows[1], rows[2], rows[3], yt.w));
      }
    }
  });
}

template <typename S>
void area_impl(const S* x, S* out, int64_t planes, int64_t ih, int64_t iw, int64_t oh,
               int64_t ow) {
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(ow * (ih / oh + 1), 1));
  at::parallel_for(0, planes * oh, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t p = r / oh, oy = r % oh;
      const int64_t y0 = hf_area_start(oy, oh, ih), y1 = hf_area_end(oy, oh, ih);
      const S* plane = x + p * ih * iw;
      for (int64_t ox = 0; ox < ow; ++ox) {
        const int64_t x0 = hf_area_start(ox, ow, iw), x1 = hf_area_end(ox, ow, iw);
        float sum = 0.0f;
        for (int64_t y = y0; y < y1; ++y) {
          for (int64_t xi = x0; xi < x1; ++xi) sum = hf_add(sum, hf_load(plane[y * iw + xi]));
        }
        out[r * ow + ox] = Storage<S>::store(hf_area_average(sum, y1 - y0, x1 - x0));
      }
    }
  });
}

template <typename S>
void phi_impl(float* f, const S* up, const S* conv, int64_t n, float omr, float r) {
  at::parallel_for(0, n, 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      f[i] = hf_phi_blend_accumulate<S>(f[i], hf_load(up[i]), hf_load(conv[i]), omr, r);
    }
  });
}

void iddpm_impl(const float* x, const float* mo, const float* noise, float* out, int64_t n,
                int64_t c, const IddpmScalars& s) {
  at::parallel_for(0, n, std::max<int64_t>(1, 8192 / std::max<int64_t>(c, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* cond = mo + i * 2 * c;                      // row i: [eps | var]
      const float* uncond = s.guided ? mo + (n + i) * 2 * c : cond;  // row N + i
      for (int64_t k = 0; k < c; ++k) {
        out[i * c + k] = hf_iddpm_update(x[i * c + k], cond[k], uncond[k], cond[c + k],
                                         noise[i * c + k], s);
      }
    }
  });
}

template <template <typename> class F, typename... Args>
void dispatch(DType d, Args&&... args) {
  switch (d) {
    case DType::kFloat32: F<float>::run(args...); break;
    case DType::kFloat16: F<half_t>::run(args...); break;
    case DType::kBFloat16: F<bf16_t>::run(args...); break;
  }
}

}  // namespace
}  // namespace hart_fast::cpu

namespace hart_fast::ops {
namespace {

template <typename S>
struct BicubicRun {
  static void run(ResizeArgs& a) {
    cpu::bicubic_impl(static_cast<const S*>(a.x.data_ptr()), static_cast<S*>(a.out.data_ptr()),
                      a.planes, a.in_h, a.in_w, a.out_h, a.out_w);
  }
};
template <typename S>
struct AreaRun {
  static void run(ResizeArgs& a) {
    cpu::area_impl(static_cast<const S*>(a.x.data_ptr()), static_cast<S*>(a.out.data_ptr()),
                   a.planes, a.in_h, a.in_w, a.out_h, a.out_w);
  }
};
template <typename S>
struct PhiRun {
  static void run(const at::Tensor& f, PhiArgs& a, float omr, float r) {
    cpu::phi_impl(f.data_ptr<float>(), static_cast<const S*>(a.up.data_ptr()),
                  static_cast<const S*>(a.conv.data_ptr()), a.numel, omr, r);
  }
};

at::Tensor bicubic_upsample_cpu(const at::Tensor& x, int64_t out_h, int64_t out_w) {
  ResizeArgs a = prepare_resize("bicubic_upsample", x, out_h, out_w);
  if (a.planes > 0) cpu::dispatch<BicubicRun>(a.dtype, a);
  return a.out;
}

at::Tensor area_downsample_cpu(const at::Tensor& x, int64_t out_h, int64_t out_w) {
  ResizeArgs a = prepare_resize("area_downsample", x, out_h, out_w);
  if (a.planes > 0) cpu::dispatch<AreaRun>(a.dtype, a);
  return a.out;
}

void phi_blend_accumulate_cpu(const at::Tensor& f_hat, const at::Tensor& up,
                              const at::Tensor& conv_out, double ratio) {
  PhiArgs a = prepare_phi(f_hat, up, conv_out);
  // torch rounds the Python scalars (1 - r) and r to float when it applies
  // them to a float tensor; 1 - r itself is computed in double by Python.
  const float omr = static_cast<float>(1.0 - ratio), r = static_cast<float>(ratio);
  if (a.numel > 0) cpu::dispatch<PhiRun>(a.dtype, f_hat, a, omr, r);
}

at::Tensor iddpm_step_fused_cpu(const at::Tensor& x, const at::Tensor& model_out,
                                const at::Tensor& noise, double cfg, bool guided,
                                double c_recip, double c_recipm1, double c_coef1,
                                double c_coef2, double min_log, double max_log, double nonzero,
                                double temperature) {
  IddpmArgs a = prepare_iddpm(x, model_out, noise, guided);
  const IddpmScalars s = iddpm_scalars(cfg, guided, c_recip, c_recipm1, c_coef1, c_coef2,
                                       min_log, max_log, nonzero, temperature);
  if (a.n > 0 && a.c > 0) {
    cpu::iddpm_impl(a.x.data_ptr<float>(), a.model_out.data_ptr<float>(),
                    a.noise.data_ptr<float>(), a.out.data_ptr<float>(), a.n, a.c, s);
  }
  return a.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hart_fast, CPU, m) {
  m.impl("bicubic_upsample", &bicubic_upsample_cpu);
  m.impl("area_downsample", &area_downsample_cpu);
  m.impl("phi_blend_accumulate_", &phi_blend_accumulate_cpu);
  m.impl("iddpm_step_fused", &iddpm_step_fused_cpu);
}

}  // namespace hart_fast::ops
