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
