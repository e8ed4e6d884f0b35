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
  // Residual-add variants: s = x + branch * gate (gate optional, broadcast like
  // scale / shift; the product and the sum each rounded to x.dtype as torch
  // does), then the norm + modulation of s.  Returns (s, normalised s); HART's
  // blocks keep s as the residual stream and feed the normalised s onward.
  m.def(
      "add_rms_norm_modulate(Tensor x, Tensor branch, Tensor? gate, Tensor? weight, "
      "Tensor? scale, Tensor? shift, float eps) -> (Tensor, Tensor)");
  m.def(
      "add_layer_norm_modulate(Tensor x, Tensor branch, Tensor? gate, Tensor? weight, "
      "Tensor? bias, Tensor? scale, Tensor? shift, float eps) -> (Tensor, Tensor)");
  // argmin_v ||z_n - e_v||^2 for z (N, C) and codebook (V, C); int64 (N,).
  m.def("vq_nearest_code(Tensor z, Tensor codebook) -> Tensor");
  // --- VQ glue between AR stages (hart_fast/ops/vq_glue.py) ---
  // == F.interpolate(x, size=(out_h, out_w), mode="bicubic", align_corners=False)
  // for (B, C, h, w) x, fp32 math, PyTorch's tap/weight arithmetic.
  m.def("bicubic_upsample(Tensor x, int out_h, int out_w) -> Tensor");
  // == F.interpolate(x, size=(out_h, out_w), mode="area") (adaptive_avg_pool2d:
  // fp32 window sum row by row, then / kh / kw).
  m.def("area_downsample(Tensor x, int out_h, int out_w) -> Tensor");
  // f_hat (fp32) += (up.mul(1 - ratio) + conv_out.mul(ratio)) evaluated in
  // up's dtype, i.e. Phi's blend followed by f_hat.add_.
  m.def(
      "phi_blend_accumulate_(Tensor(a!) f_hat, Tensor up, Tensor conv_out, float ratio) -> ()");
  // One fused IDDPM p_sample update (hart_fast/model/diffusion.py::iddpm_step),
  // CFG combine included when guided; model_out (2N, 2C) guided else (N, 2C).
  m.def(
      "iddpm_step_fused(Tensor x, Tensor model_out, Tensor noise, float cfg, bool guided, "
      "float c_recip, float c_recipm1, float c_coef1, float c_coef2, float min_log, "
      "float max_log, float nonzero, float temperature) -> Tensor");
  // F.group_norm(x, groups, weight, bias, eps) followed by F.silu when silu:
  // x (B, C, *) fp32/fp16/bf16, NCHW- or (4-D) channels_last-contiguous;
  // statistics in fp64 sums, normalisation in fp32, rounded to x.dtype after
  // the norm and again after the SiLU (as the two torch ops do).  Returns a
  // new tensor of x's dtype in x's layout (channels_last only when x is
  // channels_last- but not NCHW-contiguous).
  m.def(
      "group_norm_silu(Tensor x, Tensor? weight, Tensor? bias, int groups, float eps, "
      "bool silu) -> Tensor");
  // --- attention (hart_fast/ops/attention.py) -------------------------------
  // qkv (B, l, 3*H*d) [+ qkv_bias (3*H*d,)] viewed as (B, l, 3, H, d); with
  // scale_mul (H,): q = normalize(q) * scale_mul[h], k = normalize(k) (HART's
  // attn_l2_norm); then RoPE x*cos + rotate_half(x)*sin with the fp32 (B|1, l, d)
  // tables cast to qkv.dtype; k, v are written to the caches (B, H, S, d) at
  // [:, :, start:start+l]; returns q (B, H, l, d) contiguous.
  m.def(
      "qkv_rope_cache(Tensor qkv, Tensor? qkv_bias, Tensor cos, Tensor sin, Tensor(a!) k_cache, "
      "Tensor(b!) v_cache, int start, Tensor? scale_mul) -> Tensor");
  // softmax(scale * q k^T) v over keys [0, kv_len) of the caches, no mask, fp32
  // accumulation; q (B, H, lq, d) any strides with a contiguous head dim;
  // returns (B, lq, H*d) in q.dtype.
  m.def("ms_attention(Tensor q, Tensor k_cache, Tensor v_cache, int kv_len, float scale) -> Tensor");
  // Training-time block-causal attention: query i sees key j iff
  // level[j] <= level[i] (level (L,) int64, non-decreasing); returns (B, L, H*d).
  m.def(
      "ms_attention_block_causal(Tensor q, Tensor k, Tensor v, Tensor level, float scale) -> "
      "Tensor");
  // logits (2B, l, V) fp32, conditional rows first: (1+t)*cond - t*uncond, then
  // -inf below the top_k-th largest (top_k <= 0 or >= V keeps all).  The
  // kernels implement top_p == 0 only; the Python wrapper applies top-p.
  m.def("cfg_top_k_filter(Tensor logits, float t, int top_k, float top_p) -> Tensor");
}
