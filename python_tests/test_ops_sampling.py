"""hart_fast.ops.cfg_top_k_filter vs hart_fast.sampling (cfg_combine + filter_top_k_top_p_).

The combine evaluates exactly the reference's fp32 expression and top-k masks
exactly the values strictly below the k-th largest, so the result must be
bitwise equal to the reference (including ties at the threshold).
"""

from __future__ import annotations

import pytest
import torch

import hart_fast.ops as ops
from hart_fast.ops import cfg_top_k_filter, cfg_top_k_filter_reference


def make_logits(B, l, V, device="cpu", seed=0, quantize=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * B, l, V, generator=g) * 3
    if quantize:  # many exact ties
        x = (x * quantize).round() / quantize
    return x.to(device)


def reference(logits, t, top_k, top_p):
    return cfg_top_k_filter_reference(logits.clone(), t, top_k, top_p)


@pytest.mark.parametrize("V", [1, 7, 100, 4096])
@pytest.mark.parametrize("top_k", [0, 1, 5, 600, 10_000])
@pytest.mark.parametrize("t", [0.0, 1.3333333333, 4.5])
def test_bitwise(kernel_device, V, top_k, t):
    logits = make_logits(2, 3, V, kernel_device, seed=V + top_k)
    out = cfg_top_k_filter(logits, t, top_k)
    assert out.shape == (2, 3, V) and out.dtype == torch.float32
    assert torch.equal(out, reference(logits, t, top_k, 0.0))


@pytest.mark.parametrize("top_k", [1, 3, 50, 300])
def test_ties(kernel_device, top_k):
    logits = make_logits(1, 4, 513, kernel_device, quantize=2)
    out = cfg_top_k_filter(logits, 2.0, top_k)
    assert torch.equal(out, reference(logits, 2.0, top_k, 0.0))


def test_special_values(kernel_device):
    logits = make_logits(1, 2, 64, kernel_device)
    logits[0, 0, :10] = float("-inf")  # already-masked conditional logits
    logits[1, 1, 5] = -0.0
    logits[0, 1, 5] = 0.0
    out = cfg_top_k_filter(logits, 1.5, 20)
    assert torch.equal(out, reference(logits, 1.5, 20, 0.0))


@pytest.mark.parametrize("top_p", [0.5, 0.9, 1.0])
def test_top_p(kernel_device, top_p):
    logits = make_logits(2, 5, 4096, kernel_device, seed=4)
    out = cfg_top_k_filter(logits, 3.0, 600, top_p)
    assert torch.equal(out, reference(logits, 3.0, 600, top_p))


def test_hart_stage_shape(kernel_device):
    # Stage 9 of HART 1024px: 2 x (CFG) 4 images, 256 tokens, V = 4096, top_k 300.
    logits = make_logits(4, 256, 4096, kernel_device, seed=9)
    assert torch.equal(cfg_top_k_filter(logits, 4.5, 300), reference(logits, 4.5, 300, 0.0))


def test_non_contiguous_and_empty(kernel_device):
    base = make_logits(2, 6, 200, kernel_device)
    logits = base[:, ::2]
    assert not logits.is_contiguous()
    assert torch.equal(cfg_top_k_filter(logits, 1.0, 17), reference(logits, 1.0, 17, 0.0))
    empty = torch.zeros(4, 0, 10, device=kernel_device)
    assert cfg_top_k_filter(empty, 1.0, 3).shape == (2, 0, 10)


def test_cuda_matches_cpu(cuda_kernel_device):
    logits = make_logits(3, 17, 4096, "cpu", seed=1)
    assert torch.equal(cfg_top_k_filter(logits.cuda(), 2.0, 600).cpu(), cfg_top_k_filter(logits, 2.0, 600))


def test_fallback(monkeypatch):
    monkeypatch.setattr(ops, "HAS_EXTENSION", False)
    logits = make_logits(1, 2, 50)
    assert torch.equal(cfg_top_k_filter(logits, 2.0, 5, 0.7), reference(logits, 2.0, 5, 0.7))
    assert logits.shape == (2, 2, 50)  # input not modified in shape / place


def test_errors():
    logits = make_logits(1, 2, 50, "cpu")
    with pytest.raises(TypeError, match="logits"):
        cfg_top_k_filter(logits.half(), 1.0, 5)
    with pytest.raises(ValueError, match="2B"):
        cfg_top_k_filter(logits[:1], 1.0, 5)
    with pytest.raises(ValueError, match="top_p"):
        cfg_top_k_filter(logits, 1.0, 5, 1.5)
    with pytest.raises(TypeError, match="top_k"):
        cfg_top_k_filter(logits, 1.0, 5.0)
    with pytest.raises(ValueError, match="finite"):
        cfg_top_k_filter(logits, float("inf"), 5)


def test_kernel_rejects_top_p(requires_extension):
    with pytest.raises(ValueError, match="top_p"):
        torch.ops.hart_fast.cfg_top_k_filter(make_logits(1, 2, 50, "cpu"), 1.0, 5, 0.5)


def test_opcheck(kernel_device):
    torch.library.opcheck(torch.ops.hart_fast.cfg_top_k_filter, (make_logits(1, 3, 40, kernel_device), 2.0, 7, 0.0))
