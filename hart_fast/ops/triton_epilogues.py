"""Triton epilogue kernels for the residual-diffusion MLP (CUDA fast path).

``gated_residual(x, gate, h) = x + gate * h`` is the ResBlock's output
epilogue.  gate arrives as a column slice of the batched adaLN GEMM output
(a strided view), so the kernel takes row strides instead of forcing a copy.

Triton is imported lazily: on a CPU-only machine (or without triton) the
callers use the torch expression.  Tests run this kernel on the CPU under
``TRITON_INTERPRET=1``.

Rounding: the reference rounds ``gate * h`` and then the sum.  Triton
contracts a*b + c into an FMA by default on the GPU (one rounding fewer), so
the CUDA launch passes ``enable_fp_fusion=False`` (a Triton compile option)
to keep the two roundings; the interpreter never fuses.
"""

from __future__ import annotations

import os

import torch

_KERNEL = None


def _build_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _gated_residual_kernel(x_ptr, g_ptr, h_ptr, out_ptr, n_cols,
                               sx, sg, sh, so, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        col0 = tl.program_id(1) * BLOCK
        cols = col0 + tl.arange(0, BLOCK)
        mask = cols < n_cols
        row = row.to(tl.int64)
        x = tl.load(x_ptr + row * sx + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + row * sg + cols, mask=mask, other=0.0).to(tl.float32)
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
    return x + gate * h  # (M, W)


def gated_residual_triton(x: torch.Tensor, gate: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """x + gate * h for 2-D (M, W) fp32/fp16 tensors with unit column stride."""
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _build_kernel()
    M, W = x.shape
    for name, t in (("x", x), ("gate", gate), ("h", h)):
        if t.shape != (M, W) or t.dtype != x.dtype:
            raise ValueError(f"gated_residual: {name} must be {tuple(x.shape)} {x.dtype}, got "
                             f"{tuple(t.shape)} {t.dtype}")
    x, gate, h = (t if t.stride(1) == 1 else t.contiguous() for t in (x, gate, h))
    out = torch.empty((M, W), dtype=x.dtype, device=x.device)
    if M == 0 or W == 0:
        return out
    BLOCK = 1024
    grid = (M, (W + BLOCK - 1) // BLOCK)
    # No FMA contraction on the GPU (bitwise the torch expression); the
    # interpreter neither fuses nor knows the compile option.
    opts = {} if os.environ.get("TRITON_INTERPRET") == "1" else {"enable_fp_fusion": False}
    _KERNEL[grid](x, gate, h, out, W, x.stride(0), gate.stride(0), h.stride(0), out.stride(0),
                  BLOCK=BLOCK, **opts)
    return out


def gated_residual(x: torch.Tensor, gate: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Triton kernel on CUDA (fp32/fp16), the torch expression otherwise."""
    if x.dtype in (torch.float32, torch.float16) and triton_available(x.device):
        return gated_residual_triton(x, gate, h)
    return gated_residual_reference(x, gate, h)


__all__ = ["gated_residual", "gated_residual_reference", "gated_residual_triton", "triton_available"]
