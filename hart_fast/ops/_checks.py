"""Argument validation shared by the op wrappers.

Errors are raised before dispatch so they name the Python argument and are
the same whether the compiled kernel or the reference fallback runs.
"""

from __future__ import annotations

import torch

# Circular on purpose: hart_fast.ops sets HAS_EXTENSION before importing the
# op modules, and the attributes are only read at call time.
import hart_fast.ops as _ops

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(op: str, name: str, t, *, allow_none: bool = False) -> None:
    if t is None and allow_none:
        return
    if not isinstance(t, torch.Tensor):
        kind = "a tensor or None" if allow_none else "a tensor"
        raise TypeError(f"{op}: expected {name} to be {kind}, but got {type(t).__name__}.")


def check_float_dtype(op: str, name: str, t: torch.Tensor, allowed=FLOAT_DTYPES) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(
            f"{op}: expected {name} to have dtype {names}, but got {name} with dtype "
            f"{str(t.dtype).replace('torch.', '')} (shape {tuple(t.shape)})."
        )


def check_same_device(op: str, name: str, t: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(
            f"{op}: expected {name} to be on the same device as {ref_name} ({ref.device}), "
            f"but got {name} on {t.device}."
        )


def use_compiled(x: torch.Tensor) -> bool:
    """Whether the compiled kernel can serve a call on x's device.

    Read at call time (not import time) so tests can monkeypatch
    hart_fast.ops.HAS_EXTENSION to exercise the reference fallback.
    """
    if not _ops.HAS_EXTENSION:
        return False
    if x.device.type in ("cpu", "meta"):
        return True
    if x.device.type == "cuda":
        return _ops.HAS_CUDA_KERNELS
    return False
