// Operator schemas of the hart_fast library, defined once.
//
// Device implementations register against these names from
// csrc/cpu/*_cpu.cpp (CPU) and csrc/cuda/*_cuda.cpp (CUDA); the fake (meta)
// implementations used by torch.compile live in hart_fast/ops/_meta.py.  Keep
// the schemas here in sync with those Python signatures.
#include <torch/library.h>

TORCH_LIBRARY(hart_fast, m) {
  // RMSNorm over the last dim (fp32 math), optional fp32-upcast weight, output
  // rounded to x.dtype, then optional AdaLN `.mul(1 + scale).add(shift)` in
  // x.dtype.  scale / shift broadcast against x with last dim C.
  m.def(
      "rms_norm_modulate(Tensor x, Tensor? weight, Tensor? scale, Tensor? shift, "
      "float eps) -> Tensor");
  // F.layer_norm over the last dim, then the same optional modulation.
  m.def(
      "layer_norm_modulate(Tensor x, Tensor? weight, Tensor? bias, Tensor? scale, "
      "Tensor? shift, float eps) -> Tensor");
  // argmin_v ||z_n - e_v||^2 for z (N, C) and codebook (V, C); int64 (N,).
  m.def("vq_nearest_code(Tensor z, Tensor codebook) -> Tensor");
  // F.group_norm(x, groups, weight, bias, eps) followed by F.silu when silu:
  // x (B, C, *) fp32/fp16/bf16, NCHW- or (4-D) channels_last-contiguous;
  // statistics in fp64 sums, normalisation in fp32, rounded to x.dtype after
  // the norm and again after the SiLU (as the two torch ops do).  Returns a
  // new tensor of x's dtype in x's layout (channels_last only when x is
  // channels_last- but not NCHW-contiguous).
  m.def(
      "group_norm_silu(Tensor x, Tensor? weight, Tensor? bias, int groups, float eps, "
      "bool silu) -> Tensor");
}
