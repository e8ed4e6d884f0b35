"""Shared pytest fixtures and markers.

`device` parametrises a test over "cpu" (always) and "cuda" (skipped on
machines without a GPU; the CUDA kernels are exercised on the GPU device
machine).  `requires_extension` marks tests of the compiled kernels: they are
skipped with a reason when hart_fast._C is not built, unless
HART_FAST_REQUIRE_EXTENSION=1 (CI) turns that into a failure.

Every test that uses a GPU where there is one gets the `cuda` marker, and the
conformance tests the `conformance` marker, at collection (markers.py): the GPU
check runs `pytest -m "cuda or conformance"`.  Numerical comparison rules live
in numerics.py.
"""

from __future__ import annotations

import glob
import os
import sys

import pytest
import torch

from markers import apply_markers, register_markers


def _use_installed_extension() -> None:
    """Borrow the installed hart_fast._C when the checkout has none.

    `python -m pytest` imports hart_fast from the checkout.  After a regular
    (non-editable) `pip install --no-build-isolation .`, as in CI, the compiled
    _C exists only in site-packages, so the checkout's hart_fast would fall
    back to the references and every kernel test would skip.  We therefore
    load the installed _C under its own name; the Python code under test stays
    the checkout's.  With an editable install (or build_ext --inplace) the
    checkout has _C and nothing happens here.
    """
    import importlib.util

    repo = os.path.realpath(os.path.join(os.path.dirname(__file__), os.pardir))
    if "hart_fast._C" in sys.modules or glob.glob(os.path.join(repo, "hart_fast", "_C*.so")):
        return
    for entry in sys.path:
        if not entry or os.path.realpath(entry) == repo:
            continue
        found = glob.glob(os.path.join(entry, "hart_fast", "_C*.so"))
        if found:
            spec = importlib.util.spec_from_file_location("hart_fast._C", found[0])
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)  # registers torch.ops.hart_fast.*
            sys.modules["hart_fast._C"] = module
            return


_use_installed_extension()

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
    # Not a hardware limitation, so never a skip: the README's install builds it.
    pytest.fail(message)


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


@pytest.fixture
def cuda_kernel_device(requires_extension) -> str:
    """"cuda", for tests that compare the CUDA kernels with the CPU kernels."""
    import hart_fast.ops as ops

    if not torch.cuda.is_available():
        pytest.skip(NO_CUDA_REASON)
    if not ops.HAS_CUDA_KERNELS:
        pytest.fail("hart_fast._C was built without CUDA kernels (HART_FAST_CUDA=0 or no nvcc)")
    return "cuda"


def pytest_configure(config):
    register_markers(config)


def pytest_collection_modifyitems(config, items):
    apply_markers(items)


@pytest.fixture(autouse=True, scope="session")
def _true_fp32_on_cuda():
    """fp32 tolerances here assume IEEE fp32; cuDNN convolutions default to TF32 on
    Ampere+ GPUs (10-bit mantissa), which needs its own, looser bounds."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
