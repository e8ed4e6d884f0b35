#include "attention_args.h"

#include <cmath>

#include <ATen/ops/empty.h>
#include <ATen/ops/searchsorted.h>
#include <c10/util/Exception.h>

#include "tensor_args.h"

namespace hart_fast::ops {
namespace {

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                  const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": expected ", name,
                    " to be on the same device as ", ref_name, " (", ref.device(), "), but got ",
                    name, " on ", t.device(), ".");
}

void check_dtype_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                      const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": expected ", name,
                   " to have the same dtype as ", ref_name, " (", ref.scalar_type(),
                   "), but got ", name, " with dtype ", t.scalar_type(), ".");
}

bool supported_head_dim(int64_t d) { return d == 16 || d == 32 || d == 64 || d == 128; }

// Read-only (B, H, n, d) operand: keeps any strides of the first three dims
// and only copies when the head dim itself is strided.
at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return t.stride(-1) == 1 || t.size(-1) == 1 ? t : t.contiguous();
}

void fill_strides(int64_t* dst, const at::Tensor& t) {
  for (int i = 0; i < 3; ++i) dst[i] = t.stride(i);
}

}  // namespace

QkvRopeArgs prepare_qkv_rope_cache(const at::Tensor& qkv_in, const std::optional<at::Tensor>& bias,
                                   const at::Tensor& cos, const at::Tensor& sin,
                                   const at::Tensor& k_cache, const at::Tensor& v_cache,
                                   int64_t start, const std::optional<at::Tensor>& scale_mul) {
  constexpr const char* op = "qkv_rope_cache";
  TORCH_CHECK_VALUE(k_cache.dim() == 4, op,
                    ": expected k_cache to be a 4-D tensor (B, H, S, d), but got shape ",
                    k_cache.sizes(), ".");
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), op,
                    ": expected v_cache to have the shape of k_cache ", k_cache.sizes(),
                    ", but got ", v_cache.sizes(), ".");
  const int64_t B = k_cache.size(0), H = k_cache.size(1), S = k_cache.size(2),
                d = k_cache.size(3);
  TORCH_CHECK_VALUE(d % 2 == 0 && d > 0, op, ": expected an even head dim, but got d = ", d, ".");
  TORCH_CHECK_TYPE(is_float_type(qkv_in.scalar_type()), op,
                   ": expected qkv to have dtype Float, Half or BFloat16, but got ",
                   qkv_in.scalar_type(), ".");
  TORCH_CHECK_VALUE(qkv_in.dim() == 3 && qkv_in.size(0) == B && qkv_in.size(2) == 3 * H * d, op,
                    ": expected qkv of shape (B, l, 3*H*d) = (", B, ", l, ", 3 * H * d,
                    ") to match k_cache ", k_cache.sizes(), ", but got qkv with shape ",
                    qkv_in.sizes(), ".");
  const int64_t l = qkv_in.size(1);
  TORCH_CHECK_VALUE(start >= 0 && start + l <= S, op, ": expected 0 <= start and start + l <= S (",
                    S, "), but got start = ", start, " with l = ", l, ".");
  for (const at::Tensor* c : {&k_cache, &v_cache}) {
    const char* name = c == &k_cache ? "k_cache" : "v_cache";
    check_device(op, name, *c, qkv_in, "qkv");
    check_dtype_like(op, name, *c, qkv_in, "qkv");
    TORCH_CHECK_VALUE(c->stride(3) == 1, op, ": expected ", name,
                      " to be contiguous in its last (head) dimension, since it is written in "
                      "place, but got strides ",
                      c->strides(), ".");
  }
  for (const at::Tensor* t : {&cos, &sin}) {
    const char* name = t == &cos ? "cos" : "sin";
    check_device(op, name, *t, qkv_in, "qkv");
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, op, ": expected ", name,
                     " to have dtype Float, but got ", t->scalar_type(), ".");
    TORCH_CHECK_VALUE(t->dim() == 3 && (t->size(0) == B || t->size(0) == 1) && t->size(1) == l &&
                          t->size(2) == d,
                      op, ": expected ", name, " of shape (B, l, d) = (", B, ", ", l, ", ", d,
                      ") (or batch 1), but got ", t->sizes(), ".");
  }
  TORCH_CHECK_VALUE(cos.size(0) == sin.size(0), op,
                    ": expected cos and sin to have the same batch size.");

  QkvRopeArgs a;
  a.qkv = qkv_in.contiguous();
  a.cos = cos.contiguous();
  a.sin = sin.contiguous();
  QkvRopeParams& p = a.params;
  if (bias.has_value()) {
    check_device(op, "qkv_bias", *bias, qkv_in, "qkv");
    check_dtype_like(op, "qkv_bias", *bias, qkv_in, "qkv");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == 3 * H * d, op,
                      ": expected qkv_bias of shape (", 3 * H * d, ",), but got ", bias->sizes(),
                      ".");
    a.bias = bias->contiguous();
    p.bias = a.bias.data_ptr();
  }
  if (scale_mul.has_value()) {
    check_device(op, "scale_mul", *scale_mul, qkv_in, "qkv");
    TORCH_CHECK_VALUE(scale_mul->numel() == H, op, ": expected scale_mul with ", H,
                      " elements (one per head), but got shape ", scale_mul->sizes(), ".");
    TORCH_CHECK_TYPE(is_float_type(scale_mul->scalar_type()), op,
                     ": expected scale_mul to be a floating tensor, but got ",
                     scale_mul->scalar_type(), ".");
    a.scale_mul = scale_mul->reshape({H}).to(at::kFloat).contiguous();
    p.scale_mul = a.scale_mul.data_ptr<float>();
  }
  a.q_out = at::empty({B, H, l, d}, a.qkv.options());
  p.qkv = a.qkv.data_ptr();
  p.cos = a.cos.data_ptr<float>();
  p.sin = a.sin.data_ptr<float>();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.q_out = a.q_out.data_ptr();
  fill_strides(p.kc_strides, k_cache);
  fill_strides(p.vc_strides, v_cache);
  p.rope_b_stride = a.cos.size(0) == 1 ? 0 : l * d;
  p.B = B;
  p.l = l;
  p.H = H;
  p.d = d;
  p.start = start;
  p.dtype = kernel_dtype(qkv_in.scalar_type());
  return a;
}

static AttnArgs prepare_common(const char* op, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, int64_t kv_len, double scale) {
  TORCH_CHECK_TYPE(is_float_type(q.scalar_type()), op,
                   ": expected q to have dtype Float, Half or BFloat16, but got ", q.scalar_type(),
                   ".");
  TORCH_CHECK_VALUE(q.dim() == 4, op, ": expected q to be 4-D (B, H, lq, d), but got shape ",
                    q.sizes(), ".");
  const int64_t B = q.size(0), H = q.size(1), lq = q.size(2), d = q.size(3);
  TORCH_CHECK_VALUE(supported_head_dim(d), op,
                    ": expected head dim 16, 32, 64 or 128, but got q with shape ", q.sizes(), ".");
  for (const at::Tensor* t : {&k, &v}) {
    const char* name = t == &k ? "k" : "v";
    check_device(op, name, *t, q, "q");
    check_dtype_like(op, name, *t, q, "q");
    TORCH_CHECK_VALUE(t->dim() == 4 && t->size(0) == B && t->size(1) == H && t->size(3) == d, op,
                      ": expected ", name, " of shape (", B, ", ", H, ", S, ", d,
                      ") to match q ", q.sizes(), ", but got ", t->sizes(), ".");
    TORCH_CHECK_VALUE(t->size(2) >= kv_len, op, ": expected ", name, " to hold at least kv_len = ",
                      kv_len, " keys, but got shape ", t->sizes(), ".");
  }
  // An empty query set needs no keys (the empty block-causal sequence).
  TORCH_CHECK_VALUE(kv_len >= 1 || (kv_len == 0 && lq == 0), op,
                    ": expected kv_len >= 1, but got ", kv_len, ".");
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": expected a finite scale, but got ", scale, ".");
  AttnArgs a;
  a.q = last_dim_contiguous(q);
  a.k = last_dim_contiguous(k);
  a.v = last_dim_contiguous(v);
  a.out = at::empty({B, lq, H * d}, q.options().memory_format(at::MemoryFormat::Contiguous));
  AttnParams& p = a.params;
  p.q = a.q.data_ptr();
  p.k = a.k.data_ptr();
  p.v = a.v.data_ptr();
  p.out = a.out.data_ptr();
  fill_strides(p.q_strides, a.q);
  fill_strides(p.k_strides, a.k);
  fill_strides(p.v_strides, a.v);
  p.B = B;
  p.H = H;
  p.lq = lq;
  p.d = d;
  p.kv_len = kv_len;
  p.scale = static_cast<float>(scale);
  p.dtype = kernel_dtype(q.scalar_type());
  return a;
}

AttnArgs prepare_ms_attention(const at::Tensor& q, const at::Tensor& k_cache,
                              const at::Tensor& v_cache, int64_t kv_len, double scale) {
  return prepare_common("ms_attention", q, k_cache, v_cache, kv_len, scale);
}

AttnArgs prepare_block_causal(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& level, double scale) {
  constexpr const char* op = "ms_attention_block_causal";
  TORCH_CHECK_VALUE(q.dim() == 4, op, ": expected q to be 4-D (B, H, L, d), but got shape ",
                    q.sizes(), ".");
  const int64_t L = q.size(2);
  TORCH_CHECK_VALUE(k.dim() == 4 && k.size(2) == L, op, ": expected k with L = ", L,
                    " keys (the same sequence as q), but got k with shape ", k.sizes(), ".");
  TORCH_CHECK_VALUE(v.dim() == 4 && v.size(2) == L, op, ": expected v with L = ", L,
                    " keys (the same sequence as q), but got v with shape ", v.sizes(), ".");
  check_device(op, "level", level, q, "q");
  TORCH_CHECK_TYPE(level.scalar_type() == at::kLong, op,
                   ": expected level to have dtype Long, but got ", level.scalar_type(), ".");
  TORCH_CHECK_VALUE(level.dim() == 1 && level.size(0) == L, op, ": expected level of shape (", L,
                    ",), but got ", level.sizes(), ".");
  AttnArgs a = prepare_common(op, q, k, v, L, 1.0);
  a.params.scale = static_cast<float>(scale);
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": expected a finite scale, but got ", scale, ".");
  // Keys are sorted by level, so the keys query i sees are the prefix
  // [0, #{j : level[j] <= level[i]}).
  const at::Tensor lv = level.contiguous();
  a.kv_end = at::searchsorted(lv, lv, /*out_int32=*/false, /*right=*/true);
  a.params.kv_end = a.kv_end.data_ptr<int64_t>();
  return a;
}

CfgTopKArgs prepare_cfg_top_k(const at::Tensor& logits, double t, int64_t top_k, double top_p) {
  constexpr const char* op = "cfg_top_k_filter";
  TORCH_CHECK_TYPE(logits.scalar_type() == at::kFloat, op,
                   ": expected logits to have dtype Float, but got ", logits.scalar_type(), ".");
  TORCH_CHECK_VALUE(logits.dim() == 3 && logits.size(0) % 2 == 0 && logits.size(2) >= 1, op,
                    ": expected logits of shape (2B, l, V) with the conditional rows first, but "
                    "got ",
                    logits.sizes(), ".");
  TORCH_CHECK_VALUE(std::isfinite(t), op, ": expected a finite t, but got ", t, ".");
  TORCH_CHECK_VALUE(top_p == 0.0, op,
                    ": the compiled kernel implements top_p == 0 only (got top_p = ", top_p,
                    "); hart_fast.ops.cfg_top_k_filter applies top-p in PyTorch.");
  CfgTopKArgs a;
  a.logits = logits.contiguous();
  const int64_t B = logits.size(0) / 2, l = logits.size(1), V = logits.size(2);
  a.out = at::empty({B, l, V}, a.logits.options());
  a.rows = B * l;
  a.V = V;
  a.half_offset = B * l * V;
  a.k = (top_k > 0 && top_k < V) ? top_k : 0;
  // PyTorch multiplies an fp32 tensor by a Python float in fp32: the scalars
  // (1 + t, computed in double like Python, and t) are cast to float first.
  a.one_plus_t = static_cast<float>(1.0 + t);
  a.t = static_cast<float>(t);
  return a;
}

}  // namespace hart_fast::ops
