"""Nearest codebook entry (vector quantisation) without the N x V matrix.

The kernel fuses the distance computation with the argmin, so memory is
O(N + V) instead of the reference's O(N * V) (64K x 4096 fp32 = 1 GiB at
HART's largest scale).

Tie behaviour: both compute d = ||z||^2 + ||e||^2 - 2 z.e in fp32 and take
the first minimum, but the reference's matmul sums z.e in a different order.
When two codes are within fp32 rounding of each other (a genuine near tie)
the kernel may return the other one; the chosen code's distance is then equal
to the minimum up to rounding.  Exact duplicates resolve to the lower index
in both.
"""

from __future__ import annotations

import torch

from hart_fast.ops._checks import check_float_dtype, check_same_device, check_tensor, use_compiled


def vq_nearest_code_reference(
    z: torch.Tensor,  # (N, C)
    codebook: torch.Tensor,  # (V, C)
) -> torch.Tensor:  # (N,) int64
    """The official HART nearest-code search (VectorQuantizer2), in fp32."""
    z = z.float()  # (N, C)
    e = codebook.float()  # (V, C)
    d = torch.sum(z.square(), dim=1, keepdim=True) + torch.sum(e.square(), dim=1)  # (N, V)
    d.addmm_(z, e.T, alpha=-2, beta=1)  # (N, V)
    return torch.argmin(d, dim=1)  # (N,)


def vq_nearest_code(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook row (squared L2) for every row of z.

    z (N, C) and codebook (V, C) share a dtype (float32, float16 or bfloat16;
    distances are computed in fp32).  Returns int64 (N,).
    """
    op = "vq_nearest_code"
    check_tensor(op, "z", z)
    check_tensor(op, "codebook", codebook)
    check_float_dtype(op, "z", z)
    if z.dim() != 2:
        raise ValueError(f"{op}: expected z to be a 2-D tensor of shape (N, C), but got z with shape {tuple(z.shape)}.")
    if codebook.dim() != 2 or codebook.shape[0] < 1 or codebook.shape[1] < 1:
        raise ValueError(
            f"{op}: expected codebook to be a non-empty 2-D tensor of shape (V, C), but got "
            f"codebook with shape {tuple(codebook.shape)}."
        )
    if z.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"{op}: expected z and codebook to have the same number of channels, but got z with "
            f"shape {tuple(z.shape)} and codebook with shape {tuple(codebook.shape)}."
        )
    if codebook.dtype != z.dtype:
        raise TypeError(
            f"{op}: expected codebook to have the same dtype as z "
            f"({str(z.dtype).replace('torch.', '')}), but got codebook with dtype "
            f"{str(codebook.dtype).replace('torch.', '')}."
        )
    check_same_device(op, "codebook", codebook, z, "z")
    if not use_compiled(z):
        return vq_nearest_code_reference(z, codebook)
    return torch.ops.hart_fast.vq_nearest_code(z, codebook)
