"""The C++ tests of csrc/tests/, built with CMake and run by ctest, as one pytest test.

Builds the CPU kernels (`-DHART_FAST_CUDA=OFF`; the CUDA kernels are tested
from Python on a GPU) against the torch of the Python running pytest, into
build/cmake/ (kept, so later runs rebuild only what changed).  Needs cmake and
ninja (the README's install puts ninja in the venv).  Nothing is skipped: a
missing tool is a failure.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys

REPO = os.path.realpath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))
BUILD = os.path.join(REPO, "build", "cmake")


def _run(cmd: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(proc.stdout)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-8000:]}"


def test_cpp_kernels_ctest():
    # The venv's bin (ninja from pip) even when pytest runs without activating it.
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    for tool in ("cmake", "ninja"):
        assert shutil.which(tool, path=env["PATH"]), f"{tool} not found on PATH (pip install ninja; cmake from the OS)"
    os.makedirs(BUILD, exist_ok=True)
    # Two pytest runs in one checkout must not build into the same folder at once.
    with open(os.path.join(BUILD, ".pytest.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _run(["cmake", "-S", REPO, "-B", BUILD, "-G", "Ninja", "-DHART_FAST_CUDA=OFF",
              f"-DPython3_EXECUTABLE={sys.executable}"], env)
        _run(["cmake", "--build", BUILD, f"-j{os.cpu_count() or 2}"], env)
        _run(["ctest", "--test-dir", BUILD, "--output-on-failure"], env)
