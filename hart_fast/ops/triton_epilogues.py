"""Triton epilogue kernel: the gated residual add ``x + gate * h``.

Used where a gated residual add is *not* followed by a norm that could absorb
it (those adds go through ``add_rms_norm_modulate`` / ``add_layer_norm_modulate``):
the last block of the AR transformer, whose sum feeds the fp32 head norm.

Shapes: x, h (..., W) with the same shape; gate either x's shape or, for x
(B, L, W), one row per batch entry (B, 1, W) (HART's AdaLN gates).  The gate
may be a strided view (a column slice of a wider GEMM output): the kernel takes
row strides and a row divisor instead of forcing a copy.

Triton is imported lazily: on a CPU-only machine (or without triton) the
callers get the torch expression.  Tests run this kernel on the CPU under
``TRITON_INTERPRET=1`` (fp32/fp16 only there).

Rounding: the reference rounds ``gate * h`` and then the sum.  Triton
contracts a*b + c into an FMA by default on the GPU (one rounding fewer), so
the CUDA launch passes ``enable_fp_fusion=False`` (a Triton compile option)
to keep the two roundings; the interpreter never fuses.
"""

from __future__ import annotations

import contextlib
import os

import torch

_KERNEL = None


def _build_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _gated_residual_kernel(x_ptr, g_ptr, h_ptr, out_ptr, n_cols, g_div,
                               sx, sg, sh, so, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        col0 = tl.program_id(1) * BLOCK
        cols = col0 + tl.arange(0, BLOCK)
        mask = cols < n_cols
        row = row.to(tl.int64)
        g_row = row // g_div  # g_div rows of x share one gate row
        x = tl.load(x_ptr + row * sx + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + g_row * sg + cols, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + row * sh + cols, mask=mask, other=0.0).to(tl.float32)
        # Round the product in the storage dtype first, like torch's `gate * h`.
        gh = (g * h).to(out_ptr.dtype.element_ty).to(tl.float32)
        y = x + gh
        tl.store(out_ptr + row * so + cols, y.to(out_ptr.dtype.element_ty), mask=mask)

    return _gated_residual_kernel


def triton_available(device: torch.device) -> bool:
    """Whether the Triton kernel can run for tensors on `device`."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def gated_residual_reference(x: torch.Tensor, gate: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return x + gate * h  # (..., W)


def _gate_rows(x: torch.Tensor, gate: torch.Tensor):
    """gate as (G, W) rows with unit column stride, and how many x rows share one."""
    W = x.shape[-1]
    if gate.shape == x.shape:
        g2 = gate.reshape(-1, W)
        return g2, 1
    if x.dim() == 3 and gate.shape == (x.shape[0], 1, W):
        return gate.reshape(x.shape[0], W), x.shape[1]
    raise ValueError(f"gated_residual: gate must have x's shape {tuple(x.shape)} or (B, 1, W) = "
                     f"({x.shape[0]}, 1, {W}) for a 3-D x, but got gate with shape {tuple(gate.shape)}.")


def launch_device(t: torch.Tensor):
    """Context for a Triton launch on t's device: Triton launches on the current
    CUDA device (and its current stream), which need not be t's.  A no-op for CPU
    tensors (the interpreter)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def gated_residual_triton(x: torch.Tensor, gate: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """x + gate * h (see the module docstring for shapes), fp32/fp16/bf16 on CUDA."""
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _build_kernel()
    for name, t in (("gate", gate), ("h", h)):
        if t.dtype != x.dtype:
            raise ValueError(f"gated_residual: {name} must have x's dtype {x.dtype}, got {t.dtype}")
    if h.shape != x.shape:
        raise ValueError(f"gated_residual: h must have x's shape {tuple(x.shape)}, got {tuple(h.shape)}")
    W = x.shape[-1]
    g2, g_div = _gate_rows(x, gate)
    x2, h2 = x.reshape(-1, W), h.reshape(-1, W)
    x2, g2, h2 = (t if t.stride(-1) == 1 else t.contiguous() for t in (x2, g2, h2))
    M = x2.shape[0]
    out = torch.empty((M, W), dtype=x.dtype, device=x.device)
    if M == 0 or W == 0:
        return out.view(x.shape)
    BLOCK = 1024
    grid = (M, (W + BLOCK - 1) // BLOCK)
    # No FMA contraction on the GPU (bitwise the torch expression); the
    # interpreter neither fuses nor knows the compile option.
    opts = {} if os.environ.get("TRITON_INTERPRET") == "1" else {"enable_fp_fusion": False}
    with launch_device(x):
        _KERNEL[grid](x2, g2, h2, out, W, g_div, x2.stride(0), g2.stride(0), h2.stride(0), out.stride(0),
                      BLOCK=BLOCK, **opts)
    return out.view(x.shape)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Triton kernel on CUDA, the torch expression otherwise (same bits)."""
    if triton_available(x.device) and (x.device.type == "cuda" or x.dtype in (torch.float32, torch.float16)):
        return gated_residual_triton(x, gate, h)
    return gated_residual_reference(x, gate, h)


__all__ = ["gated_residual", "gated_residual_reference", "gated_residual_triton", "launch_device", "triton_available"]
