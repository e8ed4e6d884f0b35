"""The `cuda` / `conformance` markers (markers.py) select what the GPU check runs.

bench/device_check.sh runs `pytest -m "cuda or conformance"`; these tests collect
with that selection on the CPU, so a GPU test the marker would miss is found here
rather than by its absence from a scarce GPU run.  The marks are static: the same
tests are selected on a machine with or without a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.realpath(os.path.join(os.path.dirname(__file__), os.pardir))


def collect(*args: str) -> set:
    """Node ids `pytest --collect-only -q` selects with `args`."""
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode in (0, 5), proc.stdout[-3000:] + proc.stderr[-3000:]
    return {line.strip() for line in proc.stdout.splitlines() if "::" in line}


# GPU tests whose names do not say "cuda": the old `-k "cuda or conformance"`
# selection of the device check never ran them.
CUDA_VS_CPU = [
    "python_tests/test_ops_norm.py::TestNormModulate::test_matches_cpu_kernel_bitwise[rms]",
    "python_tests/test_ops_norm.py::TestNormModulate::test_matches_cpu_kernel_bitwise[layer]",
    "python_tests/test_ops_norm.py::TestAddNormModulate::test_matches_cpu_kernel_bitwise[rms]",
    "python_tests/test_ops_norm.py::TestAddNormModulate::test_matches_cpu_kernel_bitwise[layer]",
    "python_tests/test_ops_norm.py::TestNormErrors::test_kernel_mixed_devices_without_wrapper",
    "python_tests/test_ops_vq.py::test_matches_cpu_kernel_bitwise",
    "python_tests/test_ops_group_norm.py::TestGroupNormSilu::test_matches_cpu_kernel",
]


@pytest.fixture(scope="module")
def cuda_selected():
    return collect("-m", "cuda", "python_tests/test_ops_norm.py", "python_tests/test_ops_vq.py",
                   "python_tests/test_ops_group_norm.py", "python_tests/test_ops_triton_attention.py",
                   "python_tests/test_ops_diffusion.py", "python_tests/test_api_cli.py",
                   "bench/test_bench_ar.py", "bench/test_bench_ops.py")


def test_cuda_vs_cpu_bitwise_tests_are_marked(cuda_selected):
    missing = [n for n in CUDA_VS_CPU if n not in cuda_selected]
    assert not missing, f"not marked cuda: {missing}"


def test_device_parametrised_tests_are_marked_on_cuda_only(cuda_selected):
    # kernel_device (via the device fixture): the cuda variant is a GPU test, the cpu one is not.
    assert "python_tests/test_ops_norm.py::TestNormModulate::test_empty_rows[cuda-rms]" in cuda_selected
    assert "python_tests/test_ops_norm.py::TestNormModulate::test_empty_rows[cpu-rms]" not in cuda_selected
    assert not [n for n in cuda_selected if n.startswith("python_tests/") and ("[cpu-" in n or n.endswith("[cpu]"))]
    # Error and fallback tests that never touch a GPU stay out.
    assert not [n for n in cuda_selected if "Fallback" in n or "::TestNormErrors::test_bad" in n]


def test_skipif_no_cuda_tests_are_marked(cuda_selected):
    # skipif(not torch.cuda.is_available(), reason="no CUDA device ...") without a device parameter.
    assert "python_tests/test_ops_triton_attention.py::test_cuda_graph_capture" in cuda_selected
    assert "python_tests/test_ops_diffusion.py::test_sampler_cuda[True]" in cuda_selected
    # The Triton tests that run on the CPU (interpreter, ahead-of-time sm_90 compile) are not GPU tests.
    assert not [n for n in cuda_selected if "test_compiles_for_hopper" in n or "interpreter" in n]


def test_hand_marked_default_device_tests(cuda_selected):
    # The CLI picks the GPU by default where there is one.
    selected = cuda_selected
    assert "python_tests/test_api_cli.py::test_python_dash_m_and_console_entry" in selected
    assert "python_tests/test_api_cli.py::test_cli_generate_png_with_metadata" in selected
    assert "python_tests/test_api_cli.py::test_text_encoder_hidden_size_mismatch" not in selected


def test_conformance_module_is_marked():
    every = collect("python_tests/test_conformance.py")
    assert len(every) > 10
    assert collect("-m", "conformance", "python_tests/test_conformance.py", "python_tests/test_ops_sampling.py") == every


def test_bench_gpu_cases_are_marked(cuda_selected):
    selected = {n for n in cuda_selected if n.startswith("bench/")}
    assert "bench/test_bench_ar.py::test_ar_loop[cuda-0.7b-b1-fast]" in selected
    assert "bench/test_bench_ops.py::test_vq_nearest_code[cuda-kernel]" in selected
    assert not [n for n in selected if "cpu" in n.split("::")[-1]]


def test_device_check_selects_by_marker():
    with open(os.path.join(REPO, "bench", "device_check.sh")) as f:
        script = f.read()
    assert '-m "cuda or conformance"' in script and '-k "cuda' not in script
