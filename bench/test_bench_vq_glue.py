"""pytest-benchmark: VQ glue between AR stages and the residual-diffusion sampler,
fast path vs reference.

    pytest bench/test_bench_vq_glue.py --benchmark-only
    pytest bench/test_bench_vq_glue.py --benchmark-disable

* VQ glue: all 13 next_scale_input calls of HART's real 64x64 grid (Cvae 32,
  batch 1, 4 partially shared phis, random weights), fast vs
  HartTokenizer.next_scale_input.
* sample_residual_fast vs sample_residual at HART's real MLP widths (1024,
  depth 6, Cvae 32, z 1536) with N = 1024 rows per half on the CPU (a couple of
  rounds only) and the real N = 4096 on CUDA (with and without the CUDA graph).
"""

from __future__ import annotations

import dataclasses
import os
import sys

import pytest
import torch

from hart_fast.config import TokenizerConfig
from hart_fast.model.diffusion import RespacedSchedule, SimpleMLPAdaLN, sample_residual
from hart_fast.model.diffusion_fast import sample_residual_fast
from hart_fast.model.tokenizer import HartTokenizer, Quantizer
from hart_fast.ops import next_scale_input_fast

sys.path.insert(0, os.path.dirname(__file__))
from bench_common import CUDA, DEVICES, check_impl, timed  # noqa: E402

HART_PN = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)


class _Tok(torch.nn.Module):
    pass


def _tokenizer(device):
    cfg = dataclasses.replace(TokenizerConfig(), vocab_size=4096, z_channels=32, quant_resi=0.5,
                              share_quant_resi=4, quantizer_type="var_hybrid")
    torch.manual_seed(0)
    tok = _Tok()
    tok.cfg = cfg
    tok.quantize = Quantizer(cfg)
    return tok.to(device)


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("device", DEVICES)
def test_bench_vq_glue_13_stages(benchmark, impl, device):
    check_impl("kernel" if impl == "fast" else impl, device)
    tok = _tokenizer(device)
    g = torch.Generator().manual_seed(0)
    hs = [torch.randn(1, 32, pn, pn, generator=g).to(device) for pn in HART_PN[:-1]]
    fn = next_scale_input_fast if impl == "fast" else HartTokenizer.next_scale_input

    def run():
        f_hat = torch.zeros(1, 32, 64, 64, device=device)
        with torch.no_grad():
            for si, h in enumerate(hs):
                f_hat, nxt = fn(tok, si, HART_PN, f_hat, h)
        return f_hat

    timed(benchmark, device, run, rounds=10 if device == "cpu" else 50)


# The CUDA-graph variant exists only on CUDA: not generated for the CPU.
SAMPLER_CASES = [pytest.param("cpu", impl, id=f"cpu-{impl}") for impl in ("fast", "reference")] + [
    pytest.param("cuda", impl, id=f"cuda-{impl}", marks=CUDA) for impl in ("fast", "fast_graph", "reference")]


@pytest.mark.parametrize("device,impl", SAMPLER_CASES)
def test_bench_sample_residual(benchmark, impl, device):
    torch.manual_seed(0)
    net = SimpleMLPAdaLN(32, 1024, 1536, 6).to(device).eval()
    N = 1024 if device == "cpu" else 4096
    z = torch.randn(2 * N, 1536, device=device)
    x0 = torch.randn(N, 32, device=device)
    sched = RespacedSchedule.build("8")

    def run():
        with torch.no_grad():
            if impl == "reference":
                out = sample_residual(net, z, 4.5, sched, temperature=1.0, x_init_NC=x0)
            else:
                out = sample_residual_fast(net, z, 4.5, sched, temperature=1.0, x_init_NC=x0,
                                           cuda_graph=impl == "fast_graph")
        return out

    # CPU: one round without warm-up (each reference run takes ~10 s at N = 1024).
    timed(benchmark, device, run, rounds=1 if device == "cpu" else 10, warmup_rounds=0 if device == "cpu" else 2)
