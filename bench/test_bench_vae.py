"""pytest-benchmark: the VAE decode path.

    pytest bench/test_bench_vae.py --benchmark-only      # timings
    pytest bench/test_bench_vae.py --benchmark-disable   # just check that everything runs

* group_norm_silu vs F.group_norm + F.silu: on the CPU at (1, 160, 256, 256),
  on CUDA at the decoder's widest activation (1, 160, 1024, 1024); NCHW and
  channels_last.
* FastDecoder vs the reference Decoder at HART's real configuration (ch 160,
  ch_mult (1, 1, 2, 2, 4), z 32) with random weights: on the CPU at 8 x 8 and
  16 x 16 latents (128 / 256 pixel images) to keep rounds short, on CUDA at the real 64 x 64
  latent (1024 x 1024 image), batch 1 and 8.
Each timed call synchronises the device, so CUDA numbers include launch overhead.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hart_fast.ops as ops
from hart_fast.model.tokenizer import Decoder
from hart_fast.model.vae_fast import FastDecoder

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from bench_common import CUDA, DEVICES, IMPLS, NO_CUDA, check_impl, check_kernel, timed  # noqa: E402,F401

GN_SHAPE = {"cpu": (1, 160, 256, 256), "cuda": (1, 160, 1024, 1024)}
ROUNDS = {"cpu": 5, "cuda": 20}






def _gn_reference(x, w, b):
    return F.silu(F.group_norm(x, 32, w, b, 1e-6))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("device", DEVICES)
def test_group_norm_silu(benchmark, device, dtype, layout, impl):
    check_impl(impl, device)
    benchmark.group = f"group_norm_silu-{device}-{str(dtype)[6:]}-{layout}"
    g = torch.Generator().manual_seed(0)
    shape = GN_SHAPE[device]
    x = torch.randn(*shape, generator=g).to(device, dtype)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(shape[1], generator=g).to(device, dtype)
    b = torch.randn(shape[1], generator=g).to(device, dtype)
    if impl == "kernel":
        out = timed(benchmark, device, ops.group_norm_silu, x, w, b, 32, 1e-6, True, rounds=ROUNDS[device])
    else:
        out = timed(benchmark, device, _gn_reference, x, w, b, rounds=ROUNDS[device])
    assert out.shape == x.shape


_DECODERS = {}


def _decoder(device, dtype):
    key = (device, dtype)
    if key not in _DECODERS:
        torch.manual_seed(0)
        d = Decoder(160, (1, 1, 2, 2, 4), 32).eval().to(device=device, dtype=dtype)
        _DECODERS.clear()  # keep one real-size decoder alive at a time
        _DECODERS[key] = d
    return _DECODERS[key]


# (device, batch, latent, dtype)
DECODE_CASES = [
    pytest.param("cpu", 1, 8, torch.float32, id="cpu-b1-8x8-fp32"),
    pytest.param("cpu", 1, 16, torch.float32, id="cpu-b1-16x16-fp32"),
    pytest.param("cuda", 1, 64, torch.float32, id="cuda-b1-64x64-fp32", marks=CUDA),
    pytest.param("cuda", 1, 64, torch.bfloat16, id="cuda-b1-64x64-bf16", marks=CUDA),
    pytest.param("cuda", 8, 64, torch.bfloat16, id="cuda-b8-64x64-bf16", marks=CUDA),
]


@pytest.mark.parametrize("impl", ["fast", "fast_channels_last", "reference"])
@pytest.mark.parametrize("device,batch,latent,dtype", DECODE_CASES)
def test_decoder(benchmark, device, batch, latent, dtype, impl):
    check_impl("kernel" if impl != "reference" else impl, device)
    benchmark.group = f"vae_decode-{device}-b{batch}-{latent}x{latent}-{str(dtype)[6:]}"
    d = _decoder(device, dtype)
    z = torch.randn(batch, 32, latent, latent, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    if impl == "reference":
        def fn(z):
            with torch.no_grad():
                return d(z)
    else:
        fn = FastDecoder(d, channels_last=impl == "fast_channels_last")
    rounds = 2 if device == "cpu" else (5 if batch > 1 else 10)
    out = timed(benchmark, device, fn, z, rounds=rounds)
    assert out.shape == (batch, 3, latent * 16, latent * 16)
