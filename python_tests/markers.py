"""The `cuda` and `conformance` pytest markers, applied at collection.

Used by python_tests/conftest.py and bench/conftest.py, so that the GPU
session's check (bench/device_check.sh) selects tests by marker,
`-m "cuda or conformance"`, rather than by a substring of their names (which
missed every CUDA test whose name does not say "cuda").

A test is marked `cuda` when it will use a GPU where there is one:

* it is parametrised with a "cuda" device: a `device` / `kernel_device`
  fixture parameter (conftest.DEVICES) or any parametrize value "cuda" /
  "cuda:N" (bench/bench_common.DEVICES, bench/test_bench_ar.py's cases);
* it requests a fixture of GPU_FIXTURES (`cuda_kernel_device`);
* it carries a skipif mark whose condition or reason is about CUDA (the
  suite's `skipif(not torch.cuda.is_available(), reason="no CUDA device ...")`);
* or it is marked `@pytest.mark.cuda` by hand (a test that picks the GPU by
  default when one is present, e.g. the CLI's default device).

Tests of CONFORMANCE_MODULES are marked `conformance`.
"""

from __future__ import annotations

import os

GPU_FIXTURES = frozenset({"cuda_kernel_device"})
CONFORMANCE_MODULES = frozenset({"test_conformance.py"})

MARKERS = {
    "cuda": "uses a CUDA GPU where one is present (skipped or CPU-only elsewhere); "
            "applied at collection, see python_tests/markers.py",
    "conformance": "holds hart_fast to the official implementation's recorded outputs",
    "inductor": "compiles with torch.compile's inductor backend (slow on CPU)",
}


def register_markers(config) -> None:
    for name, doc in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {doc}")


def _is_cuda_value(value) -> bool:
    if isinstance(value, str):
        return value == "cuda" or value.startswith("cuda:")
    return getattr(value, "type", None) == "cuda" and type(value).__name__ == "device"


def _is_cuda_skip(mark) -> bool:
    texts = [str(mark.kwargs.get("reason", ""))] + [a for a in mark.args if isinstance(a, str)]
    if "condition" in mark.kwargs and isinstance(mark.kwargs["condition"], str):
        texts.append(mark.kwargs["condition"])
    return any("cuda" in t.lower() or "gpu" in t.lower() for t in texts)


def uses_gpu(item) -> bool:
    """Whether a collected test item will use a GPU where there is one (see the module docstring)."""
    if item.get_closest_marker("cuda") is not None:
        return True
    callspec = getattr(item, "callspec", None)
    if callspec is not None and any(_is_cuda_value(v) for v in callspec.params.values()):
        return True
    if GPU_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    return any(_is_cuda_skip(m) for m in item.iter_markers("skipif"))


def apply_markers(items) -> None:
    """Add the `cuda` and `conformance` markers to the items that qualify (idempotent)."""
    import pytest

    for item in items:
        if item.get_closest_marker("cuda") is None and uses_gpu(item):
            item.add_marker(pytest.mark.cuda)
        module = os.path.basename(str(getattr(item, "fspath", "")))
        if module in CONFORMANCE_MODULES and item.get_closest_marker("conformance") is None:
            item.add_marker(pytest.mark.conformance)
