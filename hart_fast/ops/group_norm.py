"""Fused GroupNorm + SiLU, the ``F.silu(norm(x))`` pair of HART's VAE decoder.

Shapes: x (B, C, *spatial), normalised over C // groups channels x all spatial
positions per (batch, group).  weight / bias are (C,), in x.dtype or float32.

Numerics (kernel and reference):
  * statistics are exact to fp32 rounding (the kernels sum x and x^2 in fp64;
    torch uses fp32 Welford / cascade sums), biased variance, eps inside the
    square root;
  * ``(x - mean) * rstd * weight + bias`` in fp32, rounded to x.dtype (this is
    what F.group_norm returns), then SiLU ``y / (1 + exp(-y))`` in fp32 and
    rounded to x.dtype again (F.silu on an fp16 / bf16 tensor).  For fp32 the
    intermediate rounding is the identity.  The kernels evaluate the affine
    part as ``(x - mean) * a + bias`` with ``a = rstd * weight``.  (torch's
    own fp32 kernels fold the mean into the shift, ``x * a + (bias - mean *
    a)``, which cancels for groups of tiny spread, e.g. 1-element groups,
    where it is off by ~1e-4; the tests therefore check fp32 against an fp64
    evaluation.)  The CPU SiLU uses a vectorisable 1-ulp exp, the GPU expf.

Layouts: NCHW-contiguous x gives an NCHW output; a 4-D x that is
channels_last-contiguous (and not NCHW-contiguous) is processed and returned
in channels_last; any other strides are copied to NCHW first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hart_fast.ops._checks import check_float_dtype, check_same_device, check_tensor, use_compiled

_OP = "group_norm_silu"


def _output_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def group_norm_silu_reference(
    x: torch.Tensor,  # (B, C, *spatial)
    weight: torch.Tensor | None = None,  # (C,)
    bias: torch.Tensor | None = None,  # (C,)
    groups: int = 32,
    eps: float = 1e-6,
    silu: bool = True,
) -> torch.Tensor:  # (B, C, *spatial), x.dtype, layout as described in the module docstring
    """F.group_norm followed by F.silu (the official decoder's two ops)."""
    y = F.group_norm(x, groups, weight, bias, eps)  # x.dtype
    if silu:
        y = F.silu(y)  # x.dtype
    return y.contiguous(memory_format=_output_format(x))


def _check(x, weight, bias, groups, eps, silu) -> None:
    check_tensor(_OP, "x", x)
    check_float_dtype(_OP, "x", x)
    if x.dim() < 2:
        raise ValueError(
            f"{_OP}: expected x to have shape (B, C, *spatial) with at least 2 dimensions, but "
            f"got x with shape {tuple(x.shape)}."
        )
    if not isinstance(groups, int) or isinstance(groups, bool):
        raise TypeError(f"{_OP}: expected groups to be an int, but got {type(groups).__name__}.")
    C = x.shape[1]
    if groups < 1 or C % groups != 0:
        raise ValueError(
            f"{_OP}: expected groups ({groups}) to be positive and to divide the number of "
            f"channels of x ({C}), but got x with shape {tuple(x.shape)}."
        )
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):
        raise TypeError(f"{_OP}: expected eps to be a float, but got {type(eps).__name__}.")
    if not (0.0 <= float(eps) < float("inf")):
        raise ValueError(f"{_OP}: expected eps to be a finite non-negative number, but got {eps}.")
    if not isinstance(silu, bool):
        raise TypeError(f"{_OP}: expected silu to be a bool, but got {type(silu).__name__}.")
    for name, t in (("weight", weight), ("bias", bias)):
        check_tensor(_OP, name, t, allow_none=True)
        if t is None:
            continue
        check_same_device(_OP, name, t, x, "x")
        if t.dim() != 1 or t.shape[0] != C:
            raise ValueError(
                f"{_OP}: expected {name} to be a 1-D tensor of shape ({C},) matching the channels "
                f"of x, but got {name} with shape {tuple(t.shape)}."
            )
        check_float_dtype(_OP, name, t, (x.dtype, torch.float32))


def group_norm_silu(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    groups: int = 32,
    eps: float = 1e-6,
    silu: bool = True,
) -> torch.Tensor:
    """``F.silu(F.group_norm(x, groups, weight, bias, eps))`` (SiLU only when ``silu``).

    Same semantics as :func:`group_norm_silu_reference`; returns a new tensor
    of x's shape and dtype (layout: see the module docstring).
    """
    _check(x, weight, bias, groups, eps, silu)
    if not use_compiled(x):
        return group_norm_silu_reference(x, weight, bias, groups, eps, silu)
    return torch.ops.hart_fast.group_norm_silu(x, weight, bias, groups, float(eps), silu)
