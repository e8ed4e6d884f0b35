"""pytest-benchmark: HART attention pieces against their PyTorch references.

    pytest bench/test_bench_attention.py --benchmark-only
    pytest bench/test_bench_attention.py --benchmark-disable

Attention at HART stage shapes (H = 24, d = 64, CFG-doubled batch 2): queries
per stage lq in {1, 64, 256} (+ 1024 / 4096 on CUDA) over the keys cached so
far.  CPU keeps kv <= ~2,000 so the file stays well under a minute; CUDA
uses the real cache lengths of HART 1024px (up to 9,750 keys).  The CUDA
numbers are what CUDA_CROSSOVER in hart_fast/ops/attention.py must be filled
in from ("ours" vs "sdpa" vs "triton" per lq).
"""

from __future__ import annotations

import pytest
import torch

import hart_fast.ops as ops

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from bench_common import CUDA, DEVICES, IMPLS, NO_CUDA, check_impl, check_kernel, timed  # noqa: E402,F401


# (lq, kv_len) per device.
ATTN_SHAPES = {
    "cpu": [(1, 2000), (64, 1500), (256, 1000)],
    "cuda": [(1, 301), (1, 9750), (4, 1000), (9, 1500), (16, 1500), (64, 2000), (256, 1500), (1024, 5654), (4096, 9750)],
}
ROUNDS = {"cpu": 5, "cuda": 30}






# Backends timed per device: the Triton kernel needs CUDA (its CPU interpreter is a test tool).
ATTN_IMPLS = {"cpu": ("ours", "sdpa"), "cuda": ("ours", "sdpa", "triton")}


def _shape_params():
    out = []
    for dev in DEVICES:
        name = dev if isinstance(dev, str) else dev.values[0]
        marks = () if isinstance(dev, str) else dev.marks
        for lq, kv in ATTN_SHAPES[name]:
            for impl in ATTN_IMPLS[name]:
                out.append(pytest.param(name, lq, kv, impl, marks=marks, id=f"{name}-lq{lq}-kv{kv}-{impl}"))
    return out


@pytest.mark.parametrize("device,lq,kv_len,impl", _shape_params())
def test_attention(benchmark, device, lq, kv_len, impl):
    if impl == "ours":
        check_kernel(device)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    benchmark.group = f"attention-{device}-lq{lq}-kv{kv_len}"
    g = torch.Generator().manual_seed(0)
    B, H, d = 2, 24, 64
    q = torch.randn(B, H, lq, d, generator=g).to(device, dtype)
    k = torch.randn(B, H, kv_len, d, generator=g).to(device, dtype)
    v = torch.randn(B, H, kv_len, d, generator=g).to(device, dtype)
    out = timed(benchmark, device, ops.attention, q, k, v, kv_len, 0.125, impl, rounds=ROUNDS[device])
    assert out.shape == (B, lq, H * d)


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("device", DEVICES)
def test_qkv_rope_cache(benchmark, device, impl):
    if impl == "kernel":
        check_kernel(device)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    benchmark.group = f"qkv_rope_cache-{device}"
    g = torch.Generator().manual_seed(0)
    B, H, d = 2, 24, 64
    l = 256 if device == "cpu" else 4096
    S = l + 300
    qkv = torch.randn(B, l, 3 * H * d, generator=g).to(device, dtype)
    bias = torch.randn(3 * H * d, generator=g).to(device, dtype)
    ang = torch.rand(B, l, d, generator=g).to(device)
    cos, sin = ang.cos(), ang.sin()
    kc = torch.zeros(B, H, S, d, device=device, dtype=dtype)
    vc = torch.zeros_like(kc)
    sm = torch.full((H,), 4.0, device=device)
    fn = ops.qkv_rope_cache if impl == "kernel" else ops.qkv_rope_cache_reference
    q = timed(benchmark, device, fn, qkv, bias, cos, sin, kc, vc, 300, sm, rounds=ROUNDS[device])
    assert q.shape == (B, H, l, d)


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("device", DEVICES)
def test_cfg_top_k_filter(benchmark, device, impl):
    if impl == "kernel":
        check_kernel(device)
    benchmark.group = f"cfg_top_k_filter-{device}"
    g = torch.Generator().manual_seed(0)
    l = 256 if device == "cpu" else 4096
    logits = torch.randn(2 * 2, l, 4096, generator=g).to(device)
    if impl == "kernel":
        fn = ops.cfg_top_k_filter
    else:
        def fn(x, t, k, p):
            return ops.cfg_top_k_filter_reference(x.clone(), t, k, p)
    out = timed(benchmark, device, fn, logits, 4.5, 300, 0.0, rounds=ROUNDS[device])
    assert out.shape == (2, l, 4096)
