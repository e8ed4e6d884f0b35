"""Device facts for launch configuration, `hart-fast info` and clear driver errors.

Uses cuda-python (`cuda.bindings.runtime`) when installed: it answers without
creating a torch CUDA context and reports the driver's supported CUDA version,
which torch does not expose. Falls back to torch.cuda otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch


@dataclass
class GPUInfo:
    index: int
    name: str
    capability: tuple
    sm_count: int
    smem_per_block_optin: int  # bytes a kernel may opt into


def _rt():
    try:
        from cuda.bindings import runtime
    except ImportError:
        return None
    return runtime


def driver_cuda_version() -> Optional[int]:
    """The CUDA version the installed driver supports (e.g. 13000), or None without a driver."""
    rt = _rt()
    if rt is None:
        return None
    err, version = rt.cudaDriverGetVersion()
    return int(version) if int(err) == 0 and version else None


def _version_str(v: Optional[int]) -> str:
    return "none" if not v else f"{v // 1000}.{(v % 1000) // 10}"


def gpus() -> List[GPUInfo]:
    rt = _rt()
    out: List[GPUInfo] = []
    if rt is not None:
        err, count = rt.cudaGetDeviceCount()
        if int(err) != 0:
            return []
        for i in range(count):
            err, prop = rt.cudaGetDeviceProperties(i)
            if int(err) != 0:
                continue
            attr = rt.cudaDeviceAttr
            _, sms = rt.cudaDeviceGetAttribute(attr.cudaDevAttrMultiProcessorCount, i)
            _, smem = rt.cudaDeviceGetAttribute(attr.cudaDevAttrMaxSharedMemoryPerBlockOptin, i)
            name = prop.name.decode() if isinstance(prop.name, bytes) else str(prop.name)
            out.append(GPUInfo(i, name.rstrip("\x00"), (prop.major, prop.minor), int(sms), int(smem)))
        return out
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out.append(GPUInfo(i, p.name, (p.major, p.minor), p.multi_processor_count,
                               getattr(p, "shared_memory_per_block_optin", 0)))
    return out


def check_driver_for_kernels() -> None:
    """Raise a clear error when the driver is older than the CUDA the kernels were built with."""
    built = torch.version.cuda
    have = driver_cuda_version()
    if not built or have is None:
        return
    major, minor = (int(x) for x in built.split(".")[:2])
    need = major * 1000 + minor * 10
    if have < need:
        raise RuntimeError(
            f"the NVIDIA driver supports CUDA {_version_str(have)}, but torch and the hart_fast kernels "
            f"were built for CUDA {built}: update the driver (or install a torch built for an older CUDA "
            "and rebuild hart_fast)"
        )


def describe() -> List[str]:
    """Lines for `hart-fast info`: the extension, its CUDA kernels and the devices."""
    from hart_fast import ops

    lines = []
    if ops.HAS_EXTENSION:
        kind = "CPU + CUDA kernels" if ops.HAS_CUDA_KERNELS else "CPU kernels (built without CUDA)"
        lines.append(f"kernels:      hart_fast._C loaded, {kind}")
    else:
        lines.append(f"kernels:      hart_fast._C not available, PyTorch reference ops ({ops.EXTENSION_IMPORT_ERROR})")
    lines.append(f"torch:        {torch.__version__} (CUDA {torch.version.cuda or 'none'}), "
                 f"driver supports CUDA {_version_str(driver_cuda_version())}"
                 + ("" if _rt() is not None else " (install cuda-python for driver facts)"))
    found = gpus()
    if not found:
        lines.append("gpus:         none (CPU only)")
    for g in found:
        lines.append(f"gpu {g.index}:        {g.name}, sm_{g.capability[0]}{g.capability[1]}, {g.sm_count} SMs, "
                     f"{g.smem_per_block_optin // 1024} KiB shared memory per block")
    try:
        import flash_attn  # noqa: F401

        lines.append("flash-attn:   available (optional attention backend)")
    except ImportError:
        lines.append("flash-attn:   not installed (optional attention backend)")
    try:
        import triton

        lines.append(f"triton:       {triton.__version__} (epilogues; attention backend 'triton' on CUDA)")
    except ImportError:
        lines.append("triton:       not installed (the CUDA fast path falls back to torch for its epilogues)")
    return lines
