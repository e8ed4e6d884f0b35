"""Shared pytest fixtures.

`device` parametrises a test over "cpu" (always) and "cuda" (skipped on
machines without a GPU; the CUDA kernels are exercised on the GPU device
machine).  `requires_extension` marks tests of the compiled kernels: they are
skipped with a reason when hart_fast._C is not built, unless
HART_FAST_REQUIRE_EXTENSION=1 (CI) turns that into a failure.
"""

from __future__ import annotations

import os

import pytest
import torch

NO_CUDA_REASON = "no CUDA device on this machine (CUDA kernels are tested on the GPU device machine)"

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA_REASON)
    ),
]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture
def requires_extension():
    import hart_fast.ops as ops

    if ops.HAS_EXTENSION:
        return
    message = (
        "hart_fast._C is not built (pip install --no-build-isolation -e .): "
        f"{ops.EXTENSION_IMPORT_ERROR}"
    )
    if os.environ.get("HART_FAST_REQUIRE_EXTENSION") == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def kernel_device(device, requires_extension) -> str:
    """`device`, additionally requiring the compiled kernel for that device."""
    import hart_fast.ops as ops

    if device == "cuda" and not ops.HAS_CUDA_KERNELS:
        message = "hart_fast._C was built without CUDA kernels (HART_FAST_CUDA=0 or no nvcc)"
        if os.environ.get("HART_FAST_REQUIRE_EXTENSION") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return device


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "inductor: compiles with torch.compile's inductor backend (slow on CPU)"
    )
