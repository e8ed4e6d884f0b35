"""Which implementation the fast path runs for each op of a model: decided once.

A fused kernel covers some shapes, dtypes and devices; for the rest the fast
path runs the op's PyTorch reference (or SDPA), never an error.  The choice is
made once per model when the engine is built (`KernelPlan.for_model`), from the
model's config, the device and dtype, the compiled extension and the optional
packages; the attention backend of each stage is then fixed per batch size from
its shapes (`attention_backend`).  `hart-fast info MODEL` prints the plan.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from hart_fast import ops

# The module, not the `attention` function hart_fast.ops exports under the same name.
attn_ops = importlib.import_module("hart_fast.ops.attention")

# Head dims our attention kernels (C++ and CUDA) are instantiated for.
KERNEL_HEAD_DIMS = (16, 32, 64, 128)
# The CUDA qkv_rope_cache kernel's largest head dim (a warp holds a row; the C++ one has no limit).
MAX_CUDA_ROPE_HEAD_DIM = 128


@dataclass(frozen=True)
class Choice:
    impl: str  # "kernel" | "reference" | an attention backend ("ours", "sdpa", "crossover", ...)
    reason: str
    fallback: bool = False  # True when the fused kernel cannot serve this model here


def _extension_reason(device: torch.device) -> Optional[str]:
    """Why the compiled kernels cannot serve `device` (None when they can)."""
    if not ops.HAS_EXTENSION:
        return f"hart_fast._C is not built ({ops.EXTENSION_IMPORT_ERROR})"
    if device.type == "cuda" and not ops.HAS_CUDA_KERNELS:
        return "hart_fast._C was built without CUDA kernels"
    if device.type not in ("cpu", "cuda"):
        return f"no kernels for device type {device.type}"
    return None


def _triton_reason(device: torch.device, head_dim: int, dtype: torch.dtype) -> Optional[str]:
    from hart_fast.ops.triton_epilogues import triton_available

    if not triton_available(device):
        return "needs a CUDA device and the triton package"
    if head_dim < 16 or head_dim & (head_dim - 1):
        return f"head dim {head_dim} is not a power of two >= 16 (Triton block shapes)"
    if device.type != "cuda" and dtype == torch.bfloat16:
        return "Triton's CPU interpreter has no bfloat16"
    return None


class KernelPlan:
    """The per-op choices of the fast path for one model on one device and dtype."""

    def __init__(self, head_dim: int, device, dtype: torch.dtype):
        self.device, self.dtype, self.head_dim = torch.device(device), dtype, head_dim
        no_ext = _extension_reason(self.device)
        kernel = Choice("kernel", "compiled kernel") if no_ext is None else Choice("reference", no_ext, True)
        qkv = kernel
        if no_ext is None and self.device.type == "cuda" and head_dim > MAX_CUDA_ROPE_HEAD_DIM:
            qkv = Choice("reference", f"head dim {head_dim} is above the CUDA kernel's {MAX_CUDA_ROPE_HEAD_DIM}", True)
        self.use_compiled_qkv = not qkv.fallback
        self.choices: Dict[str, Choice] = {
            "rms_norm_modulate (+ gated residual add)": kernel,
            "qkv_rope_cache (bias, l2 norm, RoPE, KV write)": qkv,
            "cfg_top_k_filter": kernel,
            "VQ glue (bicubic up, phi blend, area down)": kernel,
            "residual diffusion (LayerNorm, IDDPM step)": kernel,
            "VAE decode (GroupNorm + SiLU)": kernel,
        }
        self.ours_reason = no_ext
        if self.ours_reason is None and head_dim not in KERNEL_HEAD_DIMS:
            self.ours_reason = (f"head dim {head_dim} is not one our attention kernel is built for "
                                f"({', '.join(map(str, KERNEL_HEAD_DIMS))})")
        self.forced = os.environ.get(attn_ops.BACKEND_ENV, "").strip() or "auto"
        if self.forced not in attn_ops.BACKENDS:
            raise ValueError(f"{attn_ops.BACKEND_ENV}={self.forced!r} is not an attention backend; expected one of "
                             f"{', '.join(attn_ops.BACKENDS)}.")
        self.forced_reason = None if self.forced == "auto" else self._unavailable(self.forced)
        self.choices["attention"] = self._describe_attention()
        self.use_triton_epilogue = self.device.type == "cuda" and _triton_reason(self.device, 16, dtype) is None

    @classmethod
    def for_model(cls, cfg, device, dtype) -> "KernelPlan":
        return cls(cfg.head_dim, device, dtype)

    # -- attention -------------------------------------------------------------
    def _unavailable(self, backend: str) -> Optional[str]:
        if backend == "sdpa":
            return None
        if backend == "ours":
            return self.ours_reason
        if backend == "flash":
            if not attn_ops.HAS_FLASH_ATTN:
                return "flash_attn is not importable"
            if self.device.type != "cuda" or self.dtype == torch.float32:
                return "flash-attn runs float16 / bfloat16 on CUDA only"
            return None
        if backend == "triton":
            return _triton_reason(self.device, self.head_dim, self.dtype)
        return f"unknown backend {backend!r}"

    def _describe_attention(self) -> Choice:
        if self.forced != "auto":
            if self.forced_reason is None:
                return Choice(self.forced, f"{attn_ops.BACKEND_ENV}={self.forced}")
            return Choice("sdpa", f"{attn_ops.BACKEND_ENV}={self.forced} cannot run: {self.forced_reason}", True)
        if self.ours_reason is not None:
            return Choice("sdpa", self.ours_reason, True)
        if self.device.type == "cuda":
            return Choice("crossover", "our kernel for few-query stages of small batches, SDPA for the rest "
                                       "(CUDA_CROSSOVER in hart_fast/ops/attention.py)")
        return Choice("ours", "our CPU kernel")

    def attention_backend(self, lq: int, bh: int, kv_len: int) -> str:
        """The backend of one stage's attention (q (B, H, lq, d) over kv_len keys, bh = B*H)."""
        if self.forced != "auto":
            return self.forced if self.forced_reason is None else "sdpa"
        if self.ours_reason is not None:
            return "sdpa"
        if self.device.type != "cuda":
            return "ours"
        for max_lq, max_bh, max_kv, backend in attn_ops.CUDA_CROSSOVER:
            if lq <= max_lq and bh <= max_bh and kv_len <= max_kv and self._unavailable(backend) is None:
                return backend
        return "sdpa"

    # -- report ------------------------------------------------------------------
    def describe(self) -> List[str]:
        """One line per op: `op  kernel|fallback (impl): why`."""
        width = max(len(k) for k in self.choices)
        lines = []
        for op, c in self.choices.items():
            tag = f"fallback ({c.impl})" if c.fallback else c.impl
            lines.append(f"  {op:<{width}}  {tag}: {c.reason}")
        return lines


__all__ = ["Choice", "KernelPlan", "KERNEL_HEAD_DIMS", "MAX_CUDA_ROPE_HEAD_DIM"]
