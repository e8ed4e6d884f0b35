"""Build script for the hart_fast._C extension.

Package metadata lives in pyproject.toml; this file only describes the
compiled extension, because which sources get compiled (CPU only, or CPU +
CUDA) is decided at build time.

Install (always without build isolation, so the extension is compiled against
the torch it will run with):

    pip install --no-build-isolation -e .     # development
    pip install --no-build-isolation .        # regular

Environment variables:

    HART_FAST_CUDA=0|1     force the CUDA kernels off / on.  Unset: build them
                           when torch is a CUDA build and nvcc is found.  1 with
                           no usable nvcc is an error rather than a silent CPU
                           build.
    CUDA_HOME              CUDA toolkit root.  If unset we derive it from the
                           nvcc on PATH (following wrapper scripts, see
                           _find_cuda_home) instead of letting torch guess.
    TORCH_CUDA_ARCH_LIST   GPU architectures to compile for.  Defaults to "9.0"
                           (H100/H200) because a build machine usually has no
                           GPU for torch to query.
    MAX_JOBS               parallel compile jobs (ninja), as usual for torch
                           extensions.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
DEFAULT_CUDA_ARCH_LIST = "9.0"


def _is_cuda_root(path: str) -> bool:
    """A usable toolkit root has a real nvcc and a linkable cudart."""
    if not path or not os.path.isfile(os.path.join(path, "bin", "nvcc")):
        return False
    libs = [
        os.path.join(path, "lib64", "libcudart.so"),
        os.path.join(path, "lib", "libcudart.so"),
        *glob.glob(os.path.join(path, "targets", "*", "lib", "libcudart.so")),
    ]
    return any(os.path.exists(p) for p in libs)


def _find_cuda_home() -> str | None:
    """Locate the CUDA toolkit root without trusting torch's guess.

    torch derives CUDA_HOME as dirname(dirname(which nvcc)).  On our machines
    the nvcc on PATH is /usr/local/bin/nvcc, a wrapper script, so torch would
    pick /usr/local and linking fails with "cannot find -lcudart".  We
    therefore follow the wrapper: resolve symlinks, look inside small wrapper
    scripts for the real .../bin/nvcc, and finally try the conventional
    install locations.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]

    candidates: list[str] = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:
            if os.path.getsize(real) < 64 * 1024:  # a script, not the binary
                with open(real, "r", encoding="utf-8", errors="ignore") as fh:
                    text = fh.read()
                for match in re.findall(r"(/[^\s'\"]*/bin/nvcc)\b", text):
                    candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(match))))
        except OSError:
            pass
    candidates.append("/usr/local/cuda")

    def _version_key(path: str):
        return [int(x) for x in re.findall(r"\d+", os.path.basename(path))]

    candidates.extend(sorted(glob.glob("/usr/local/cuda-*"), key=_version_key, reverse=True))
    for cand in candidates:
        if _is_cuda_root(cand):
            return os.path.realpath(cand)
    return None


def _wheel_cuda_include_dirs(cuda_version: str | None) -> list[str]:
    """Headers shipped with torch's nvidia-* wheels (cublas, cusparse, ...).

    Minimal toolkits (like ours) lack some headers that torch's CUDA headers
    include, e.g. cublas_v2.h; the pip wheels carry them in
    site-packages/nvidia/cu<major>/include.
    """
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations or not cuda_version:
        return []
    major = cuda_version.split(".")[0]
    dirs = []
    for loc in spec.submodule_search_locations:
        inc = os.path.join(loc, f"cu{major}", "include")
        if os.path.isdir(inc):
            dirs.append(inc)
    return dirs


def _cuda_mode() -> str:
    mode = os.environ.get("HART_FAST_CUDA", "").strip().lower()
    if mode in ("", "auto"):
        return "auto"
    if mode in ("1", "on", "true", "yes"):
        return "on"
    if mode in ("0", "off", "false", "no"):
        return "off"
    raise RuntimeError(f"HART_FAST_CUDA must be 0 or 1 (or unset for auto), got {mode!r}.")


def _configure_cuda() -> tuple[bool, str | None]:
    """Decide whether to build CUDA sources; fix up the environment if so.

    Must run before torch.utils.cpp_extension is imported: that module reads
    CUDA_HOME once, at import time.
    """
    import torch  # torch itself does not read CUDA_HOME

    mode = _cuda_mode()
    if mode == "off":
        return False, None
    torch_cuda = torch.version.cuda
    cuda_home = _find_cuda_home()
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if torch_cuda and explicit and not os.path.isfile(os.path.join(explicit, "bin", "nvcc")):
        # A wrong explicit toolkit path is a configuration error, not a reason
        # to quietly build without the CUDA kernels.
        raise RuntimeError(
            f"CUDA_HOME/CUDA_PATH is set to {explicit!r}, which has no bin/nvcc; fix it, unset it "
            "to auto-detect the toolkit, or set HART_FAST_CUDA=0 for a CPU-only build."
        )
    if mode == "on":
        if not torch_cuda:
            raise RuntimeError(
                "HART_FAST_CUDA=1 but the installed torch is a CPU-only build "
                f"(torch {torch.__version__}); install a CUDA build of torch."
            )
        if cuda_home is None or not os.path.isfile(os.path.join(cuda_home, "bin", "nvcc")):
            raise RuntimeError(
                "HART_FAST_CUDA=1 but no CUDA toolkit with nvcc was found; set CUDA_HOME to the "
                "toolkit root (the directory containing bin/nvcc and lib64/libcudart.so)."
            )
    elif not torch_cuda or cuda_home is None:
        return False, None

    os.environ["CUDA_HOME"] = cuda_home
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
    return True, cuda_home


def _extensions():
    with_cuda, cuda_home = _configure_cuda()

    import torch
    import torch.utils.cpp_extension as cpp_ext
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    if with_cuda and cpp_ext.CUDA_HOME != cuda_home:
        # Imported earlier by someone else (e.g. a build frontend): the module
        # global still holds torch's own guess.
        cpp_ext.CUDA_HOME = cuda_home

    def _sources(pattern: str) -> list[str]:
        # setuptools wants paths relative to setup.py, wherever we run from.
        return sorted(glob.glob(pattern, root_dir=ROOT))

    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    # -ffp-contract=off: the numerics rely on no mul+add being fused into an
    # FMA (see csrc/include/hart_fast/numerics.h).  No -ffast-math anywhere.
    # No -std here: torch appends the C++ standard its headers need (C++20
    # for torch >= 2.10; they do not compile as C++17).
    # -fopenmp: at::parallel_for is a header template whose body is an
    # `omp parallel` region (torch is built with AT_PARALLEL_OPENMP); compiled
    # without OpenMP it silently runs on one thread.  The libgomp torch
    # already loaded satisfies the dependency at run time.
    cxx_flags = ["-O3", "-ffp-contract=off", "-fopenmp"]
    define_macros = [("HART_FAST_WITH_CUDA", "1" if with_cuda else "0")]
    include_dirs = [os.path.join(CSRC, "include")]
    kwargs = {}
    ext_cls = CppExtension
    if with_cuda:
        ext_cls = CUDAExtension
        sources += _sources("csrc/cuda/*.cpp") + _sources("csrc/cuda/*.cu")
        # -idirafter: the toolkit's own headers (added by CUDAExtension as -I)
        # must win; the wheel headers only fill gaps such as cublas_v2.h.
        for inc in _wheel_cuda_include_dirs(torch.version.cuda):
            cxx_flags += ["-idirafter", inc]
        # No --use_fast_math: it swaps IEEE division/sqrt for approximations
        # and flushes denormals, which would break bit-faithfulness.  nvcc's
        # FMA contraction stays on; the shared math uses explicitly rounded
        # intrinsics wherever contraction would change results.
        kwargs["extra_compile_args"] = {
            "cxx": cxx_flags,
            # C++17 is enough for the .cu files: they never include torch.
            "nvcc": ["-O3", "-std=c++17"],
        }
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx_flags}

    ext = ext_cls(
        name="hart_fast._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_link_args=["-fopenmp"],
        **kwargs,
    )
    # use_ninja: compile translation units in parallel (MAX_JOBS caps it).
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
