"""What every benchmark file shares: the device list, the kernel check, device-synchronised timing."""

from __future__ import annotations

import pytest
import torch

import hart_fast.ops as ops

NO_CUDA = "no CUDA device on this machine (CUDA benchmarks run on the GPU device machine)"
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
IMPLS = ["kernel", "reference"]


def check_kernel(device: str) -> None:
    """The compiled kernels must be there: a benchmark of the fallback would mislead."""
    if not ops.HAS_EXTENSION:
        pytest.fail(f"hart_fast._C is not built (pip install --no-build-isolation .): {ops.EXTENSION_IMPORT_ERROR}")
    if device == "cuda" and not ops.HAS_CUDA_KERNELS:
        pytest.fail("hart_fast._C was built without CUDA kernels (HART_FAST_CUDA=0 or no nvcc)")


def check_impl(impl: str, device: str) -> None:
    if impl != "reference":
        check_kernel(device)


def timed(benchmark, device, fn, *args, rounds, warmup_rounds=2):
    """benchmark.pedantic with a device synchronisation inside each timed call."""

    def call():
        out = fn(*args)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    return benchmark.pedantic(call, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
