"""Fake (meta) kernels of the hart_fast ops.

torch.compile traces ops with FakeTensors; these functions describe each op's
output (shape, dtype, device, layout) without computing it.  They must agree
with the C++ kernels: the output of the norms is a new contiguous tensor of
x's shape and dtype, the output of vq_nearest_code an int64 vector of length N.
Argument checking is left to the real kernels and the Python wrappers.
"""

from __future__ import annotations

import torch


@torch.library.register_fake("hart_fast::rms_norm_modulate")
def _rms_norm_modulate_fake(x, weight, scale, shift, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("hart_fast::layer_norm_modulate")
def _layer_norm_modulate_fake(x, weight, bias, scale, shift, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("hart_fast::add_rms_norm_modulate")
def _add_rms_norm_modulate_fake(x, branch, gate, weight, scale, shift, eps):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))


@torch.library.register_fake("hart_fast::add_layer_norm_modulate")
def _add_layer_norm_modulate_fake(x, branch, gate, weight, bias, scale, shift, eps):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))


@torch.library.register_fake("hart_fast::vq_nearest_code")
def _vq_nearest_code_fake(z, codebook):
    torch._check(z.dim() == 2, lambda: "vq_nearest_code: z must be 2-D (N, C).")
    return z.new_empty((z.shape[0],), dtype=torch.int64)


@torch.library.register_fake("hart_fast::bicubic_upsample")
def _bicubic_upsample_fake(x, out_h, out_w):
    return x.new_empty((x.shape[0], x.shape[1], out_h, out_w))


@torch.library.register_fake("hart_fast::area_downsample")
def _area_downsample_fake(x, out_h, out_w):
    return x.new_empty((x.shape[0], x.shape[1], out_h, out_w))


@torch.library.register_fake("hart_fast::phi_blend_accumulate_")
def _phi_blend_accumulate_fake(f_hat, up, conv_out, ratio):
    return None


@torch.library.register_fake("hart_fast::iddpm_step_fused")
def _iddpm_step_fused_fake(x, model_out, noise, cfg, guided, c_recip, c_recipm1, c_coef1,
                           c_coef2, min_log, max_log, nonzero, temperature):
    return torch.empty_like(x, memory_format=torch.contiguous_format)
@torch.library.register_fake("hart_fast::group_norm_silu")
def _group_norm_silu_fake(x, weight, bias, groups, eps, silu):
    # Same layout rule as csrc/group_norm_silu_args.h.
    cl = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.empty_like(x, memory_format=torch.channels_last if cl else torch.contiguous_format)
@torch.library.register_fake("hart_fast::qkv_rope_cache")
def _qkv_rope_cache_fake(qkv, qkv_bias, cos, sin, k_cache, v_cache, start, scale_mul):
    B, H, _, d = k_cache.shape
    return qkv.new_empty((B, H, qkv.shape[1], d))


@torch.library.register_fake("hart_fast::ms_attention")
def _ms_attention_fake(q, k_cache, v_cache, kv_len, scale):
    B, H, lq, d = q.shape
    return q.new_empty((B, lq, H * d))


@torch.library.register_fake("hart_fast::ms_attention_block_causal")
def _ms_attention_block_causal_fake(q, k, v, level, scale):
    B, H, L, d = q.shape
    return q.new_empty((B, L, H * d))


@torch.library.register_fake("hart_fast::cfg_top_k_filter")
def _cfg_top_k_filter_fake(logits, t, top_k, top_p):
    return logits.new_empty((logits.shape[0] // 2, logits.shape[1], logits.shape[2]))
