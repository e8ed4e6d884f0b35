"""VQ glue between HART's AR stages: bicubic upsample, phi blend, area downsample.

The reference (hart_fast/model/tokenizer.py) does, after every stage si but
the last:

    h  = F.interpolate(h_BChw, size=(P, P), mode="bicubic")      # (B, C, P, P)
    h  = h.mul(1 - r) + conv3x3(h).mul_(r)                        # Phi
    f_hat.add_(h)
    nxt = F.interpolate(f_hat, size=(pn, pn), mode="area")        # next AR input

``next_scale_input_fast`` runs the same chain with the fused ops below; the
3x3 conv stays a library call (cuDNN / oneDNN).

Numerics:
  * area_downsample reproduces adaptive_avg_pool2d bit for bit (same window
    bounds, sequential fp32 window sum, ``sum / kh / kw``).  For a 1x1 output
    PyTorch takes another path (``x.mean``, a cascade sum), so the wrapper
    forwards that case to ``x.mean`` to stay faithful.
  * bicubic_upsample uses PyTorch's taps and cubic weights exactly (checked
    with impulse inputs) and combines them as ((v0 w0 + v1 w1) + v2 w2) + v3 w3
    along x, then the same along y.  PyTorch's vectorised CPU kernel associates
    the sums differently, so ~40% of fp32 outputs differ from it by 1-2 ulp
    (max 7.2e-7 on N(0, 1) data); the tests use atol 1e-6.
  * phi_blend_accumulate_ rounds exactly like the reference expression.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

from hart_fast.ops._checks import check_float_dtype, check_same_device, check_tensor, use_compiled


# ---------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------
def bicubic_upsample_reference(x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, out_h, out_w), F.interpolate bicubic, align_corners=False."""
    return F.interpolate(x, size=(out_h, out_w), mode="bicubic", align_corners=False)


def area_downsample_reference(x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, out_h, out_w), F.interpolate mode="area"."""
    return F.interpolate(x, size=(out_h, out_w), mode="area")


def phi_blend_accumulate_reference_(
    f_hat: torch.Tensor,  # (B, C, H, W) float32, updated in place
    up: torch.Tensor,  # (B, C, H, W) any float dtype: the bicubic-upsampled h
    conv_out: torch.Tensor,  # (B, C, H, W) up.dtype: conv3x3(up)
    ratio: float,
) -> None:
    f_hat.add_(up.mul(1 - ratio) + conv_out.mul(ratio))


# ---------------------------------------------------------------------------
# Validation + wrappers
# ---------------------------------------------------------------------------
def _check_resize(op: str, x, out_h, out_w) -> None:
    check_tensor(op, "x", x)
    check_float_dtype(op, "x", x)
    if x.dim() != 4 or x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(
            f"{op}: expected x to be a 4-D tensor (B, C, h, w) with non-empty spatial dims, "
            f"but got x with shape {tuple(x.shape)}."
        )
    for name, v in (("out_h", out_h), ("out_w", out_w)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise TypeError(f"{op}: expected {name} to be an int, but got {type(v).__name__}.")
        if v < 1:
            raise ValueError(f"{op}: expected {name} to be positive, but got {v}.")


def bicubic_upsample(x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """Bicubic resize of (B, C, h, w) to (B, C, out_h, out_w); fp32 math, output in x.dtype."""
    op = "bicubic_upsample"
    _check_resize(op, x, out_h, out_w)
    if not use_compiled(x):
        return bicubic_upsample_reference(x, out_h, out_w)
    return torch.ops.hart_fast.bicubic_upsample(x, out_h, out_w)


def area_downsample(x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """Area (adaptive average) resize of (B, C, h, w) to (B, C, out_h, out_w)."""
    op = "area_downsample"
    _check_resize(op, x, out_h, out_w)
    if (out_h, out_w) == (1, 1):
        # PyTorch computes a 1x1 adaptive average with x.mean (cascade sum): use it.
        return x.mean((-1, -2), keepdim=True)
    if not use_compiled(x):
        return area_downsample_reference(x, out_h, out_w)
    return torch.ops.hart_fast.area_downsample(x, out_h, out_w)


def phi_blend_accumulate_(f_hat: torch.Tensor, up: torch.Tensor, conv_out: torch.Tensor,
                          ratio: float) -> None:
    """f_hat += up * (1 - ratio) + conv_out * ratio, rounded like the reference Phi."""
    op = "phi_blend_accumulate_"
    for name, t in (("f_hat", f_hat), ("up", up), ("conv_out", conv_out)):
        check_tensor(op, name, t)
    check_float_dtype(op, "f_hat", f_hat, (torch.float32,))
    check_float_dtype(op, "up", up)
    if conv_out.dtype != up.dtype:
        raise TypeError(
            f"{op}: expected conv_out to have the same dtype as up "
            f"({str(up.dtype).replace('torch.', '')}), but got "
            f"{str(conv_out.dtype).replace('torch.', '')}."
        )
    if up.shape != f_hat.shape or conv_out.shape != f_hat.shape:
        raise ValueError(
            f"{op}: expected up and conv_out to have f_hat's shape {tuple(f_hat.shape)}, but "
            f"got up {tuple(up.shape)} and conv_out {tuple(conv_out.shape)}."
        )
    check_same_device(op, "up", up, f_hat, "f_hat")
    check_same_device(op, "conv_out", conv_out, f_hat, "f_hat")
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool):
        raise TypeError(f"{op}: expected ratio to be a float, but got {type(ratio).__name__}.")
    if not f_hat.is_contiguous():
        raise ValueError(f"{op}: expected f_hat to be contiguous (it is updated in place), "
                         f"but got strides {f_hat.stride()}.")
    if not use_compiled(f_hat):
        phi_blend_accumulate_reference_(f_hat, up, conv_out, ratio)
        return
    torch.ops.hart_fast.phi_blend_accumulate_(f_hat, up, conv_out, float(ratio))


# ---------------------------------------------------------------------------
# Tokenizer-level glue
# ---------------------------------------------------------------------------
def _phi_module(tokenizer, si: int, num_stages: int):
    """The Phi conv of stage si, or None when the tokenizer has none (identity)."""
    from hart_fast.config import phi_index

    q = tokenizer.quantize
    if not q.phis:
        return None
    return q.phis[phi_index(q.cfg, si, num_stages)]


def _phi_accumulate_(f_hat: torch.Tensor, up: torch.Tensor, phi) -> None:
    """f_hat += phi(up) (or += up without a phi)."""
    if phi is None:
        f_hat.add_(up)
        return
    conv = F.conv2d(up, phi.weight, phi.bias, 1, 1)  # the 3x3 conv stays a library call
    phi_blend_accumulate_(f_hat, up, conv, phi.resi_ratio)


def next_scale_input_fast(tokenizer, si: int, patch_nums: Sequence[int], f_hat: torch.Tensor,
                          h_BChw: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Same contract as HartTokenizer.next_scale_input: updates f_hat in place and
    returns (f_hat, area_down(f_hat) at the next scale)."""
    P = patch_nums[-1]
    up = bicubic_upsample(h_BChw, P, P)  # (B, C, P, P), h's dtype
    _phi_accumulate_(f_hat, up, _phi_module(tokenizer, si, len(patch_nums)))
    pn = patch_nums[si + 1]
    return f_hat, area_downsample(f_hat, pn, pn)


def latent_to_tokens_fast(tokenizer, f_BChw: torch.Tensor, patch_nums: Sequence[int]):
    """Same contract as HartTokenizer.latent_to_tokens (idx_list, residual_BLC)."""
    from hart_fast.ops.vq import vq_nearest_code

    B, C, H, W = f_BChw.shape
    if patch_nums[-1] != H or H != W:
        raise ValueError(f"latent is {H}x{W}, but the last scale is {patch_nums[-1]}x{patch_nums[-1]}")
    if tokenizer.cfg.using_znorm:
        # The cosine-similarity search has no fused kernel: use the reference.
        return tokenizer.latent_to_tokens(f_BChw, patch_nums)
    hybrid = tokenizer.cfg.quantizer_type == "var_hybrid"
    E = tokenizer.quantize.embedding.weight  # (V, C)
    f_rest = f_BChw.detach().clone()
    SN = len(patch_nums)
    idx_list: List[torch.Tensor] = []
    residual = None
    for si, pn in enumerate(patch_nums):
        last = si == SN - 1
        rest = f_rest if last else area_downsample(f_rest, pn, pn)
        z = rest.permute(0, 2, 3, 1).reshape(-1, C)
        idx_N = vq_nearest_code(z, E.to(z.dtype))
        h = E[idx_N].view(B, pn, pn, C).permute(0, 3, 1, 2)
        h = bicubic_upsample(h.contiguous(), H, W)
        phi = None if (hybrid and last) else _phi_module(tokenizer, si, SN)
        if phi is not None:
            conv = F.conv2d(h, phi.weight, phi.bias, 1, 1)
            blended = torch.zeros_like(h, dtype=torch.float32)
            phi_blend_accumulate_(blended, h, conv, phi.resi_ratio)  # 0 + x is exact
            h = blended.to(h.dtype)
        if last:
            residual = (f_rest - h).permute(0, 2, 3, 1).reshape(B, -1, C)
        f_rest.sub_(h)
        idx_list.append(idx_N.reshape(B, pn * pn))
    return idx_list, residual


__all__ = [
    "area_downsample",
    "area_downsample_reference",
    "bicubic_upsample",
    "bicubic_upsample_reference",
    "latent_to_tokens_fast",
    "next_scale_input_fast",
    "phi_blend_accumulate_",
    "phi_blend_accumulate_reference_",
]
