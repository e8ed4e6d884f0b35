"""pytest-benchmark: each hart_fast op against its pure-PyTorch reference.

    pytest bench/ --benchmark-only          # timings
    pytest bench/ --benchmark-disable       # just check that everything runs

Shapes are HART's: hidden size 1536 with AdaLN scale/shift of shape (B, 1, C);
VQ with the 4096 x 32 codebook.  On the CPU the token counts are kept small so
the whole file runs in well under a minute; on CUDA we use the largest stage
of a 1024px image (64 x 64 tokens, x2 for classifier-free guidance).  Each
timed call synchronises the device, so CUDA numbers include launch overhead.
"""

from __future__ import annotations

import pytest
import torch

import hart_fast.ops as ops

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from bench_common import CUDA, DEVICES, IMPLS, NO_CUDA, check_impl, check_kernel, timed  # noqa: E402,F401


# (tokens per image, rounds) per device: keeps CPU runs short.
NORM_TOKENS = {"cpu": 256, "cuda": 64 * 64}
VQ_ROWS = {"cpu": 4096, "cuda": 16 * 64 * 64}
ROUNDS = {"cpu": 10, "cuda": 50}






def _norm_inputs(device, dtype):
    g = torch.Generator().manual_seed(0)
    B, L, C = 2, NORM_TOKENS[device], 1536
    x = torch.randn(B, L, C, generator=g).to(device, dtype)
    weight = torch.randn(C, generator=g).to(device)  # fp32 parameter, as in HART
    scale = (0.1 * torch.randn(B, 1, C, generator=g)).to(device, dtype)
    shift = (0.1 * torch.randn(B, 1, C, generator=g)).to(device, dtype)
    return x, weight, scale, shift


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_modulate(benchmark, device, dtype, impl):
    check_impl(impl, device)
    benchmark.group = f"rms_norm_modulate-{device}-{str(dtype)[6:]}"
    x, weight, scale, shift = _norm_inputs(device, dtype)
    fn = ops.rms_norm_modulate if impl == "kernel" else ops.rms_norm_modulate_reference
    out = timed(benchmark, device, fn, x, weight, scale, shift, 1e-6, rounds=ROUNDS[device])
    assert out.shape == x.shape


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("device", DEVICES)
def test_layer_norm_modulate(benchmark, device, dtype, impl):
    # HART's AdaLN blocks use an affine-free LayerNorm followed by modulation.
    check_impl(impl, device)
    benchmark.group = f"layer_norm_modulate-{device}-{str(dtype)[6:]}"
    x, _, scale, shift = _norm_inputs(device, dtype)
    fn = ops.layer_norm_modulate if impl == "kernel" else ops.layer_norm_modulate_reference
    out = timed(benchmark, device, fn, x, None, None, scale, shift, 1e-6, rounds=ROUNDS[device])
    assert out.shape == x.shape


def _add_then_norm_kernel(x, branch, gate, weight, scale, shift, eps):
    s = x + branch * gate  # what the engine did before the fused op
    return s, ops.rms_norm_modulate(s, weight, scale, shift, eps)


@pytest.mark.parametrize("impl", IMPLS + ["unfused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("device", DEVICES)
def test_add_rms_norm_modulate(benchmark, device, dtype, impl):
    # A HART block's gated residual add followed by the next norm + modulate:
    # fused kernel vs torch add + norm kernel ("unfused") vs the reference.
    check_impl(impl, device)
    benchmark.group = f"add_rms_norm_modulate-{device}-{str(dtype)[6:]}"
    x, weight, scale, shift = _norm_inputs(device, dtype)
    branch = torch.randn_like(x)
    gate = scale.flip(-1)
    fn = {"kernel": ops.add_rms_norm_modulate, "reference": ops.add_rms_norm_modulate_reference,
          "unfused": _add_then_norm_kernel}[impl]
    s, y = timed(benchmark, device, fn, x, branch, gate, weight, scale, shift, 1e-6, rounds=ROUNDS[device])
    assert s.shape == y.shape == x.shape


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", DEVICES)
def test_vq_nearest_code(benchmark, device, impl):
    check_impl(impl, device)
    benchmark.group = f"vq_nearest_code-{device}"
    g = torch.Generator().manual_seed(0)
    z = torch.randn(VQ_ROWS[device], 32, generator=g).to(device)
    codebook = torch.randn(4096, 32, generator=g).to(device)
    fn = ops.vq_nearest_code if impl == "kernel" else ops.vq_nearest_code_reference
    out = timed(benchmark, device, fn, z, codebook, rounds=max(3, ROUNDS[device] // 2))
    assert out.shape == (z.shape[0],)
