"""Fused RMSNorm / LayerNorm + AdaLN modulation, and their residual-add variants.

Shapes: x (..., C) is normalised over its last dim C.  weight / bias are (C,).
scale / shift broadcast against x with last dim C; in HART they are (B, 1, C)
against x (B, L, C).  Passing None skips the corresponding step.

Numerics (both the kernels and the references) follow where the official HART
code rounds in half precision (fp32: no rounding anywhere, the two agree):
  * RMSNorm (HART's fused `rms_norm` kernel behind its blocks' norms): the
    normalisation runs in fp32 and rounds to x.dtype; the weight, cast to
    x.dtype as the official module does, multiplies in x.dtype (one more
    rounding).  The modulation ``y.mul(1 + scale).add(shift)`` then runs in
    x.dtype, each of the three ops rounding, as PyTorch evaluates it on the
    blocks' half-precision stream.
  * LayerNorm (the residual-diffusion MLP, which the official sampler runs
    under autocast, where layer_norm is an fp32 op): normalisation and affine
    in fp32, the modulation ``y * (1 + scale) + shift`` in fp32 as well (type
    promotion; only ``1 + scale`` rounds, to scale's dtype), and one rounding
    to x.dtype at the end (the next Linear's autocast cast).

The residual-add variants ``add_*_norm_modulate(x, branch, gate, ...)`` first
form ``s = x + branch * gate`` (``x + branch`` without gate; the product and
the sum each round to x.dtype, as PyTorch evaluates the expression) and return
``(s, norm_modulate(s))``.  In a HART block that is the gated residual add of
one sub-layer followed by the next sub-layer's norm, fused into one pass.

The kernels compute row sums in a different order than torch's reductions,
so fp32 results agree to ~1e-6 relative, and low-precision results agree
with the reference up to rare one-ulp differences.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hart_fast.ops._checks import (
    FLOAT_DTYPES,
    check_float_dtype,
    check_same_device,
    check_tensor,
    use_compiled,
)

_DTYPE_NAME = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


# ---------------------------------------------------------------------------
# References (ground truth + fallback)
# ---------------------------------------------------------------------------
def _modulate_reference(y: torch.Tensor, scale, shift) -> torch.Tensor:
    # y: x.dtype (RMS) or fp32 (LayerNorm); scale / shift: x.dtype, broadcast as (B, 1, C)
    # against y (B, L, C).  `1 + scale` rounds to scale's dtype; the products promote.
    if scale is not None:
        y = y.mul(1 + scale)
    if shift is not None:
        y = y.add(shift)
    return y


def rms_norm_modulate_reference(
    x: torch.Tensor,  # (..., C)
    weight: torch.Tensor | None = None,  # (C,), any float dtype; rounded to x.dtype
    scale: torch.Tensor | None = None,  # broadcastable to x, e.g. (B, 1, C); x.dtype
    shift: torch.Tensor | None = None,  # broadcastable to x, e.g. (B, 1, C); x.dtype
    eps: float = 1e-6,
) -> torch.Tensor:  # (..., C), x.dtype
    """HART's fused RMSNorm followed by AdaLN modulation, in plain PyTorch."""
    xf = x.float()  # (..., C) fp32
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)  # (..., C)
    if weight is not None:
        y = y * weight.to(x.dtype)  # (C,) broadcast, in x.dtype as the official kernel
    return _modulate_reference(y, scale, shift)


def layer_norm_modulate_reference(
    x: torch.Tensor,  # (..., C)
    weight: torch.Tensor | None = None,  # (C,), x.dtype or float32
    bias: torch.Tensor | None = None,  # (C,), same dtype as weight
    scale: torch.Tensor | None = None,  # broadcastable to x, e.g. (B, 1, C); x.dtype
    shift: torch.Tensor | None = None,  # broadcastable to x, e.g. (B, 1, C); x.dtype
    eps: float = 1e-6,
) -> torch.Tensor:  # (..., C), x.dtype
    """F.layer_norm over the last dim followed by AdaLN modulation, as under autocast:
    all in fp32 (``1 + scale`` rounds to scale's dtype), one rounding to x.dtype."""
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    y = F.layer_norm(x.float(), (x.shape[-1],), w, b, eps)  # (..., C) fp32
    return _modulate_reference(y, scale, shift).to(x.dtype)


def _gated_add_reference(x, branch, gate):
    # As the model writes it: the product and the sum each rounded to x.dtype.
    return x + (branch if gate is None else branch * gate)


def add_rms_norm_modulate_reference(
    x: torch.Tensor,  # (..., C) the residual stream
    branch: torch.Tensor,  # (..., C) the sub-layer output, x's shape and dtype
    gate: torch.Tensor | None = None,  # broadcastable to x, e.g. (B, 1, C); x.dtype
    weight: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:  # (s, normalised s), both (..., C) x.dtype
    """``s = x + branch * gate`` then :func:`rms_norm_modulate_reference` of s."""
    s = _gated_add_reference(x, branch, gate)
    return s, rms_norm_modulate_reference(s, weight, scale, shift, eps)


def add_layer_norm_modulate_reference(
    x: torch.Tensor,
    branch: torch.Tensor,
    gate: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + branch * gate`` then :func:`layer_norm_modulate_reference` of s."""
    s = _gated_add_reference(x, branch, gate)
    return s, layer_norm_modulate_reference(s, weight, bias, scale, shift, eps)


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------
def _check_common(op: str, x, scale, shift, eps, gate=None) -> None:
    check_tensor(op, "x", x)
    check_float_dtype(op, "x", x)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(
            f"{op}: expected x to have at least one dimension with a non-empty last dimension "
            f"(the normalised channels), but got x with shape {tuple(x.shape)}."
        )
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):
        raise TypeError(f"{op}: expected eps to be a float, but got {type(eps).__name__}.")
    if not (0.0 <= float(eps) < float("inf")):
        raise ValueError(f"{op}: expected eps to be a finite non-negative number, but got {eps}.")
    C = x.shape[-1]
    for name, t in (("scale", scale), ("shift", shift), ("gate", gate)):
        check_tensor(op, name, t, allow_none=True)
        if t is None:
            continue
        check_same_device(op, name, t, x, "x")
        if t.dtype != x.dtype:
            raise TypeError(
                f"{op}: expected {name} to have the same dtype as x ({_DTYPE_NAME[x.dtype]}), but "
                f"got {name} with dtype {str(t.dtype).replace('torch.', '')}; cast it first "
                f"(mixing dtypes would promote the output dtype)."
            )
        if t.dim() < 1 or t.dim() > x.dim() or t.shape[-1] != C:
            raise ValueError(
                f"{op}: expected {name} to broadcast against x of shape {tuple(x.shape)} with last "
                f"dimension {C} (e.g. shape (B, 1, {C})), but got {name} with shape "
                f"{tuple(t.shape)}."
            )
        lead = x.shape[x.dim() - t.dim() : -1]
        for k, (ts, xs) in enumerate(zip(t.shape[:-1], lead)):
            if ts != 1 and ts != xs:
                raise ValueError(
                    f"{op}: {name} with shape {tuple(t.shape)} does not broadcast against x of "
                    f"shape {tuple(x.shape)} (dimension {k} of {name} is {ts} but must be 1 or "
                    f"{xs})."
                )


def _check_branch(op: str, x, branch) -> None:
    check_tensor(op, "branch", branch)
    check_same_device(op, "branch", branch, x, "x")
    if branch.shape != x.shape:
        raise ValueError(
            f"{op}: expected branch to have the same shape as x, {tuple(x.shape)}, but got "
            f"branch with shape {tuple(branch.shape)}."
        )
    if branch.dtype != x.dtype:
        raise TypeError(
            f"{op}: expected branch to have the same dtype as x ({_DTYPE_NAME[x.dtype]}), but got "
            f"branch with dtype {str(branch.dtype).replace('torch.', '')}; cast it first."
        )


def _check_layer_affine(op: str, x, weight, bias) -> None:
    allowed = (x.dtype,) if x.dtype == torch.float32 else (x.dtype, torch.float32)
    _check_affine(op, "weight", weight, x, allowed)
    _check_affine(op, "bias", bias, x, allowed)
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        raise TypeError(
            f"{op}: expected weight and bias to have the same dtype, but got weight with dtype "
            f"{str(weight.dtype).replace('torch.', '')} and bias with dtype "
            f"{str(bias.dtype).replace('torch.', '')}."
        )


def _check_affine(op: str, name: str, t, x, allowed) -> None:
    check_tensor(op, name, t, allow_none=True)
    if t is None:
        return
    check_same_device(op, name, t, x, "x")
    C = x.shape[-1]
    if t.dim() != 1 or t.shape[0] != C:
        raise ValueError(
            f"{op}: expected {name} to be a 1-D tensor of shape ({C},) matching the last "
            f"dimension of x, but got {name} with shape {tuple(t.shape)}."
        )
    check_float_dtype(op, name, t, allowed)


# ---------------------------------------------------------------------------
# Public ops
# ---------------------------------------------------------------------------
def rms_norm_modulate(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """RMSNorm over the last dim of x, then ``.mul(1 + scale).add(shift)``.

    Same semantics as :func:`rms_norm_modulate_reference`; returns a new
    contiguous tensor of x's shape and dtype.  x, scale, shift: float32,
    float16 or bfloat16 (all the same); weight: any of those (rounded to x's dtype,
    as the official module casts it).
    """
    op = "rms_norm_modulate"
    _check_common(op, x, scale, shift, eps)
    _check_affine(op, "weight", weight, x, FLOAT_DTYPES)
    if not use_compiled(x):
        return rms_norm_modulate_reference(x, weight, scale, shift, eps)
    return torch.ops.hart_fast.rms_norm_modulate(x, weight, scale, shift, float(eps))


def layer_norm_modulate(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """LayerNorm (F.layer_norm semantics) over the last dim, then modulation.

    Same semantics as :func:`layer_norm_modulate_reference`.  weight / bias
    must be in x.dtype or float32 (as F.layer_norm requires) and agree with
    each other.
    """
    op = "layer_norm_modulate"
    _check_common(op, x, scale, shift, eps)
    _check_layer_affine(op, x, weight, bias)
    if not use_compiled(x):
        return layer_norm_modulate_reference(x, weight, bias, scale, shift, eps)
    return torch.ops.hart_fast.layer_norm_modulate(x, weight, bias, scale, shift, float(eps))


def add_rms_norm_modulate(
    x: torch.Tensor,
    branch: torch.Tensor,
    gate: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + branch * gate``, then RMSNorm + modulation of s: returns (s, normalised s).

    Same semantics as :func:`add_rms_norm_modulate_reference`.  branch has x's
    shape and dtype; gate broadcasts like scale / shift.  Both outputs are new
    contiguous tensors of x's shape and dtype.
    """
    op = "add_rms_norm_modulate"
    _check_common(op, x, scale, shift, eps, gate)
    _check_branch(op, x, branch)
    _check_affine(op, "weight", weight, x, FLOAT_DTYPES)
    if not use_compiled(x):
        return add_rms_norm_modulate_reference(x, branch, gate, weight, scale, shift, eps)
    return torch.ops.hart_fast.add_rms_norm_modulate(x, branch, gate, weight, scale, shift, float(eps))


def add_layer_norm_modulate(
    x: torch.Tensor,
    branch: torch.Tensor,
    gate: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + branch * gate``, then LayerNorm + modulation of s: returns (s, normalised s).

    Same semantics as :func:`add_layer_norm_modulate_reference`; the affine
    parameters follow :func:`layer_norm_modulate`'s rules.
    """
    op = "add_layer_norm_modulate"
    _check_common(op, x, scale, shift, eps, gate)
    _check_branch(op, x, branch)
    _check_layer_affine(op, x, weight, bias)
    if not use_compiled(x):
        return add_layer_norm_modulate_reference(x, branch, gate, weight, bias, scale, shift, eps)
    return torch.ops.hart_fast.add_layer_norm_modulate(
        x, branch, gate, weight, bias, scale, shift, float(eps)
    )
