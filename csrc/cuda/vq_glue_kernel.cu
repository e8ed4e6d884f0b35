// CUDA kernels of the VQ glue ops and of iddpm_step_fused (plain CUDA, no
// torch).  One thread per output element; all arithmetic goes through the
// shared helpers of hart_fast/vq_glue.h (explicitly rounded intrinsics), so
// results equal the CPU kernels' bit for bit (except expf, see vq_glue.h).
#include <cuda_runtime.h>

#include "hart_fast/vq_glue.h"
#include "vq_glue_launch.h"

namespace hart_fast::gpu {
namespace {

constexpr int kThreads = 256;

inline unsigned grid_for(int64_t total) {
  // Grid-stride loops below: cap the grid, every thread handles >= 1 element.
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65535 * 16 ? (blocks < 1 ? 1 : blocks) : 65535 * 16);
}

template <typename S>
__global__ void bicubic_kernel(const S* __restrict__ x, S* __restrict__ out, int64_t planes,
                               int64_t ih, int64_t iw, int64_t oh, int64_t ow) {
  const int64_t total = planes * oh * ow;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t ox = i % ow;
    const int64_t oy = (i / ow) % oh;
    const int64_t p = i / (ow * oh);
    const CubicTaps yt = hf_cubic_taps(oy, ih, oh);
    const CubicTaps xt = hf_cubic_taps(ox, iw, ow);
    const S* plane = x + p * ih * iw;
    float rows[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const S* src = plane + yt.idx[j] * iw;
      rows[j] = hf_cubic_combine(hf_load(src[xt.idx[0]]), hf_load(src[xt.idx[1]]),
                                 hf_load(src[xt.idx[2]]), hf_load(src[xt.idx[3]]), xt.w);
    }
    out[i] = Storage<S>::store(hf_cubic_combine(rows[0], rows[1], rows[2], rows[3], yt.w));
  }
}

template <typename S>
__global__ void area_kernel(const S* __restrict__ x, S* __restrict__ out, int64_t planes,
                            int64_t ih, int64_t iw, int64_t oh, int64_t ow) {
  const int64_t total = planes * oh * ow;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t ox = i % ow;
    const int64_t oy = (i / ow) % oh;
    const int64_t p = i / (ow * oh);
    const int64_t y0 = hf_area_start(oy, oh, ih), y1 = hf_area_end(oy, oh, ih);
    const int64_t x0 = hf_area_start(ox, ow, iw), x1 = hf_area_end(ox, ow, iw);
    const S* plane = x + p * ih * iw;
    float sum = 0.0f;
    for (int64_t y = y0; y < y1; ++y) {
      for (int64_t xi = x0; xi < x1; ++xi) sum = hf_add(sum, hf_load(plane[y * iw + xi]));
    }
    out[i] = Storage<S>::store(hf_area_average(sum, y1 - y0, x1 - x0));
  }
}

template <typename S>
__global__ void phi_kernel(float* __restrict__ f, const S* __restrict__ up,
                           const S* __restrict__ conv, int64_t n, float omr, float r) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    f[i] = hf_phi_blend_accumulate<S>(f[i], hf_load(up[i]), hf_load(conv[i]), omr, r);
  }
}

__global__ void iddpm_kernel(const float* __restrict__ x, const float* __restrict__ mo,
                             const float* __restrict__ noise, float* __restrict__ out, int64_t n,
                             int64_t c, IddpmScalars s) {
  const int64_t total = n * c;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / c, k = i % c;
    const float* cond = mo + row * 2 * c;
    const float eps_u = s.guided ? mo[(n + row) * 2 * c + k] : 0.0f;
    out[i] = hf_iddpm_update(x[i], cond[k], eps_u, cond[c + k], noise[i], s);
  }
}

template <template <typename> class K, typename... Args>
cudaError_t launch_typed(DType d, int64_t total, cudaStream_t stream, Args... args) {
  if (total <= 0) return cudaSuccess;
  const unsigned grid = grid_for(total);
  switch (d) {
    case DType::kFloat32: K<float>::launch(grid, stream, args...); break;
    case DType::kFloat16: K<half_t>::launch(grid, stream, args...); break;
    case DType::kBFloat16: K<bf16_t>::launch(grid, stream, args...); break;
    default: return cudaErrorInvalidValue;  // nothing launched
  }
  return cudaGetLastError();
}

template <typename S>
struct BicubicL {
  static void launch(unsigned g, cudaStream_t st, const void* x, void* out, int64_t planes,
                     int64_t ih, int64_t iw, int64_t oh, int64_t ow) {
    bicubic_kernel<S><<<g, kThreads, 0, st>>>(static_cast<const S*>(x), static_cast<S*>(out),
                                              planes, ih, iw, oh, ow);
  }
};
template <typename S>
struct AreaL {
  static void launch(unsigned g, cudaStream_t st, const void* x, void* out, int64_t planes,
                     int64_t ih, int64_t iw, int64_t oh, int64_t ow) {
    area_kernel<S><<<g, kThreads, 0, st>>>(static_cast<const S*>(x), static_cast<S*>(out),
                                           planes, ih, iw, oh, ow);
  }
};
template <typename S>
struct PhiL {
  static void launch(unsigned g, cudaStream_t st, float* f, const void* up, const void* conv,
                     int64_t n, float omr, float r) {
    phi_kernel<S><<<g, kThreads, 0, st>>>(f, static_cast<const S*>(up),
                                          static_cast<const S*>(conv), n, omr, r);
  }
};

}  // namespace

cudaError_t launch_bicubic_upsample(const void* x, void* out, DType dtype, int64_t planes,
                                    int64_t ih, int64_t iw, int64_t oh, int64_t ow,
                                    cudaStream_t stream) {
  return launch_typed<BicubicL>(dtype, planes * oh * ow, stream, x, out, planes, ih, iw, oh, ow);
}

cudaError_t launch_area_downsample(const void* x, void* out, DType dtype, int64_t planes,
                                   int64_t ih, int64_t iw, int64_t oh, int64_t ow,
                                   cudaStream_t stream) {
  return launch_typed<AreaL>(dtype, planes * oh * ow, stream, x, out, planes, ih, iw, oh, ow);
}

cudaError_t launch_phi_blend_accumulate(float* f, const void* up, const void* conv, DType dtype,
                                        int64_t n, float one_minus_r, float r,
                                        cudaStream_t stream) {
  return launch_typed<PhiL>(dtype, n, stream, f, up, conv, n, one_minus_r, r);
}

cudaError_t launch_iddpm_step(const float* x, const float* model_out, const float* noise,
                              float* out, int64_t n, int64_t c, const IddpmScalars& s,
                              cudaStream_t stream) {
  const int64_t total = n * c;
  if (total <= 0) return cudaSuccess;
  iddpm_kernel<<<grid_for(total), kThreads, 0, stream>>>(x, model_out, noise, out, n, c, s);
  return cudaGetLastError();
}

}  // namespace hart_fast::gpu
