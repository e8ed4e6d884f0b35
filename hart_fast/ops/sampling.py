"""CFG combine + top-k / top-p logit filtering of one stage.

cfg_top_k_filter(logits (2B, l, V) fp32, t, top_k, top_p) -> (B, l, V) fp32:
``(1 + t) * cond - t * uncond`` (conditional rows first) followed by
hart_fast.sampling.filter_top_k_top_p_.  The compiled kernels do the combine
and the top-k masking bit-exactly (the k-th largest value is found by
selection, and only values strictly below it are masked, like the reference);
top-p (top_p > 0) is applied in PyTorch on the kernel's output, exactly as
the reference does it (the official default is top_p = 0).
"""

from __future__ import annotations

import torch

from hart_fast.ops._checks import check_float_dtype, check_tensor, use_compiled
from hart_fast.sampling import cfg_combine, filter_top_k_top_p_


def cfg_top_k_filter_reference(
    logits: torch.Tensor,  # (2B, l, V) float32, conditional rows first
    t: float,
    top_k: int,
    top_p: float = 0.0,
) -> torch.Tensor:  # (B, l, V) float32
    return filter_top_k_top_p_(cfg_combine(logits, t), top_k, top_p)


def cfg_top_k_filter(logits: torch.Tensor, t: float, top_k: int, top_p: float = 0.0) -> torch.Tensor:
    """Same semantics as :func:`cfg_top_k_filter_reference`; returns a new tensor."""
    op = "cfg_top_k_filter"
    check_tensor(op, "logits", logits)
    check_float_dtype(op, "logits", logits, (torch.float32,))
    if logits.dim() != 3 or logits.shape[0] % 2 or logits.shape[2] < 1:
        raise ValueError(
            f"{op}: expected logits of shape (2B, l, V) with the conditional rows first, but got "
            f"{tuple(logits.shape)}."
        )
    for name, v in (("t", t), ("top_p", top_p)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{op}: expected {name} to be a float, but got {type(v).__name__}.")
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"{op}: expected top_k to be an int, but got {type(top_k).__name__}.")
    if not abs(float(t)) < float("inf"):
        raise ValueError(f"{op}: expected a finite t, but got {t}.")
    if not 0.0 <= float(top_p) <= 1.0:
        raise ValueError(f"{op}: expected 0 <= top_p <= 1, but got {top_p}.")
    if not use_compiled(logits):
        return cfg_top_k_filter_reference(logits, t, top_k, top_p)
    out = torch.ops.hart_fast.cfg_top_k_filter(logits, float(t), int(top_k), 0.0)
    if top_p > 0:
        filter_top_k_top_p_(out, 0, float(top_p))
    return out
