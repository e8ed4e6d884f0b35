"""hart_fast.ops VQ glue (bicubic_upsample, area_downsample, phi_blend_accumulate_,
next_scale_input_fast, latent_to_tokens_fast) vs the PyTorch reference.

Tolerances: area_downsample and phi_blend_accumulate_ are bit-exact in fp32.
bicubic_upsample uses PyTorch's exact taps and weights but a fixed sequential
association of the 4+4 products, while torch's CPU kernel associates them
differently: fp32 results differ by 1-2 ulp, so fp32 is checked with atol 1e-6
on O(1) data.  Low-precision outputs are checked against the fp32-upcast
reference: the error must be at most 2x that of torch's own low-precision
result (plus one ulp of the dtype for ties in the final rounding).
"""

from __future__ import annotations

import pytest
import torch

import hart_fast.ops as ops
from hart_fast.ops import (
    area_downsample,
    area_downsample_reference,
    bicubic_upsample,
    bicubic_upsample_reference,
    latent_to_tokens_fast,
    next_scale_input_fast,
    phi_blend_accumulate_,
    phi_blend_accumulate_reference_,
)

from tiny_models import REFERENCE_DIR

HART_PN = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
REF_DIR = REFERENCE_DIR


def _lowp_bound(out, x, fn, *args):
    """max |out - ref32| allowed: 2x torch's own low-precision error + 1 ulp of the output."""
    ref32 = fn(x.float(), *args)
    ref_lp = fn(x, *args).float()
    eps = torch.finfo(x.dtype).eps
    err_ref = (ref_lp - ref32).abs().max().item()
    bound = 2 * err_ref + eps * ref32.abs().max().item()
    return (out.float() - ref32).abs().max().item(), bound


@pytest.mark.usefixtures("kernel_device")
class TestResize:
    @pytest.mark.parametrize("h", list(range(1, 65, 3)) + [48, 64])
    def test_bicubic_all_hart_grids_fp32(self, kernel_device, h):
        g = torch.Generator().manual_seed(h)
        x = torch.randn(2, 5, h, h, generator=g).to(kernel_device)
        out = bicubic_upsample(x, 64, 64)
        ref = bicubic_upsample_reference(x.cpu(), 64, 64)
        assert out.shape == (2, 5, 64, 64) and out.dtype == x.dtype
        torch.testing.assert_close(out.cpu(), ref, atol=1e-6, rtol=0)

    @pytest.mark.parametrize("shape,size", [((1, 3, 5, 7), (11, 6)), ((2, 1, 1, 1), (4, 9)),
                                            ((1, 2, 8, 3), (8, 3)), ((3, 4, 6, 6), (2, 13))])
    def test_bicubic_awkward(self, kernel_device, shape, size):
        x = torch.randn(*shape).to(kernel_device)
        out = bicubic_upsample(x, *size)
        # Includes downsampling axes and values up to ~4: a few ulps of the
        # larger intermediate sums (association differs from torch's kernel).
        torch.testing.assert_close(out.cpu(), bicubic_upsample_reference(x.cpu(), *size),
                                   atol=5e-6, rtol=0)

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
    def test_bicubic_lowp(self, kernel_device, dtype):
        x = torch.randn(1, 32, 9, 9).to(kernel_device, dtype)
        out = bicubic_upsample(x, 64, 64)
        assert out.dtype == dtype
        err, bound = _lowp_bound(out.cpu(), x.cpu(), bicubic_upsample_reference, 64, 64)
        assert err <= bound

    @pytest.mark.parametrize("pn", HART_PN)
    def test_area_hart_grids_exact(self, kernel_device, pn):
        x = torch.randn(1, 32, 64, 64).to(kernel_device)
        out = area_downsample(x, pn, pn)
        assert torch.equal(out.cpu(), area_downsample_reference(x.cpu(), pn, pn))

    @pytest.mark.parametrize("shape,size", [((2, 3, 7, 5), (3, 2)), ((1, 1, 10, 10), (7, 4)),
                                            ((1, 2, 3, 3), (5, 5))])
    def test_area_awkward_exact(self, kernel_device, shape, size):
        x = torch.randn(*shape).to(kernel_device)
        assert torch.equal(area_downsample(x, *size).cpu(),
                           area_downsample_reference(x.cpu(), *size))

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
    def test_area_lowp(self, kernel_device, dtype):
        x = torch.randn(1, 8, 64, 64).to(kernel_device, dtype)
        out = area_downsample(x, 9, 9)
        err, bound = _lowp_bound(out.cpu(), x.cpu(), area_downsample_reference, 9, 9)
        assert err <= bound

    def test_non_contiguous(self, kernel_device):
        x = torch.randn(1, 6, 12, 12).to(kernel_device).permute(0, 1, 3, 2)
        assert not x.is_contiguous()
        torch.testing.assert_close(bicubic_upsample(x, 20, 20).cpu(),
                                   bicubic_upsample_reference(x.cpu(), 20, 20), atol=2e-6, rtol=0)
        assert torch.equal(area_downsample(x, 5, 5).cpu(), area_downsample_reference(x.cpu(), 5, 5))

    def test_opcheck(self, kernel_device):
        x = torch.randn(1, 2, 3, 4, device=kernel_device)
        torch.library.opcheck(torch.ops.hart_fast.bicubic_upsample.default, (x, 5, 6))
        torch.library.opcheck(torch.ops.hart_fast.area_downsample.default, (x, 2, 3))
        f = torch.randn(1, 2, 3, 4, device=kernel_device)
        torch.library.opcheck(torch.ops.hart_fast.phi_blend_accumulate_.default,
                              (f, x, torch.randn_like(x), 0.5))


@pytest.mark.usefixtures("kernel_device")
class TestPhiBlend:
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("ratio", [0.5, 0.3, 1 / 3])
    def test_exact(self, kernel_device, dtype, ratio):
        g = torch.Generator().manual_seed(3)
        f = torch.randn(2, 32, 17, 17, generator=g).to(kernel_device)
        up = torch.randn(2, 32, 17, 17, generator=g).to(kernel_device, dtype)
        conv = torch.randn(2, 32, 17, 17, generator=g).to(kernel_device, dtype)
        ref = f.cpu().clone()
        phi_blend_accumulate_reference_(ref, up.cpu(), conv.cpu(), ratio)
        out = f.clone()
        assert phi_blend_accumulate_(out, up, conv, ratio) is None
        assert torch.equal(out.cpu(), ref)


class TestErrors:
    def test_bicubic_3d(self):
        with pytest.raises(ValueError, match=r"4-D tensor \(B, C, h, w\).*\(3, 4, 5\)"):
            bicubic_upsample(torch.ones(3, 4, 5), 8, 8)

    def test_bad_size(self):
        with pytest.raises(ValueError, match="out_w to be positive"):
            area_downsample(torch.ones(1, 1, 4, 4), 2, 0)
        with pytest.raises(TypeError, match="out_h to be an int"):
            area_downsample(torch.ones(1, 1, 4, 4), 2.0, 2)

    def test_int_dtype(self):
        with pytest.raises(TypeError, match="x to have dtype"):
            bicubic_upsample(torch.ones(1, 1, 4, 4, dtype=torch.int32), 8, 8)

    def test_phi_errors(self):
        f = torch.zeros(1, 2, 4, 4)
        with pytest.raises(TypeError, match="f_hat to have dtype float32"):
            phi_blend_accumulate_(f.half(), f.half(), f.half(), 0.5)
        with pytest.raises(TypeError, match="conv_out to have the same dtype as up"):
            phi_blend_accumulate_(f, f, f.half(), 0.5)
        with pytest.raises(ValueError, match="f_hat's shape"):
            phi_blend_accumulate_(f, f[:, :1], f[:, :1], 0.5)
        with pytest.raises(ValueError, match="contiguous"):
            phi_blend_accumulate_(f.transpose(2, 3), f, f, 0.5)

    def test_kernel_checks_without_wrapper(self, requires_extension):
        with pytest.raises(ValueError, match="4-D tensor"):
            torch.ops.hart_fast.bicubic_upsample(torch.ones(3, 4), 2, 2)
        with pytest.raises(TypeError, match="f_hat to have dtype float32"):
            torch.ops.hart_fast.phi_blend_accumulate_(torch.ones(2, dtype=torch.half),
                                                      torch.ones(2), torch.ones(2), 0.5)


class TestFallback:
    def test_reference_used_without_extension(self, monkeypatch):
        monkeypatch.setattr(ops, "HAS_EXTENSION", False)
        x = torch.randn(1, 2, 5, 5)
        assert torch.equal(bicubic_upsample(x, 9, 9), bicubic_upsample_reference(x, 9, 9))
        assert torch.equal(area_downsample(x, 3, 3), area_downsample_reference(x, 3, 3))
        f, ref = torch.randn(1, 2, 5, 5), None
        ref = f.clone()
        phi_blend_accumulate_reference_(ref, x, x * 2, 0.5)
        phi_blend_accumulate_(f, x, x * 2, 0.5)
        assert torch.equal(f, ref)

    def test_area_1x1_is_mean(self):
        x = torch.randn(2, 3, 64, 64)
        assert torch.equal(area_downsample(x, 1, 1), area_downsample_reference(x, 1, 1))


# ---------------------------------------------------------------------------
# Tokenizer-level glue
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_pipe():
    import os

    if not os.path.isdir(REF_DIR):
        pytest.fail(f"conformance data not found at {REF_DIR}; set HART_FAST_REFERENCE_DIR")
    from hart_fast.pipeline import HartPipeline

    return HartPipeline.from_pretrained(REF_DIR)


def _real_tokenizer(num_phi_share=4):
    """A tokenizer with HART's real quantiser shape (Cvae 32, 4 phis) and random weights."""
    import dataclasses

    from hart_fast.model.tokenizer import HartTokenizer, Quantizer

    class _Tok(torch.nn.Module):
        pass

    from hart_fast.config import TokenizerConfig

    cfg = TokenizerConfig()
    cfg = dataclasses.replace(cfg, vocab_size=4096, z_channels=32, quant_resi=0.5,
                              share_quant_resi=num_phi_share, quantizer_type="var_hybrid")
    torch.manual_seed(0)
    tok = _Tok()
    tok.cfg = cfg
    tok.quantize = Quantizer(cfg)
    tok.nearest_code = lambda z: HartTokenizer.nearest_code(tok, z)
    return tok


def test_next_scale_input_real_grids():
    from hart_fast.model.tokenizer import HartTokenizer

    tok = _real_tokenizer()
    pns = HART_PN
    g = torch.Generator().manual_seed(1)
    f_ref = torch.randn(1, 32, 64, 64, generator=g)
    f_fast = f_ref.clone()
    for si in [0, 3, 6, 9, 12]:
        pn = pns[si]
        h = torch.randn(1, 32, pn, pn, generator=g)
        f_ref, nxt_ref = HartTokenizer.next_scale_input(tok, si, pns, f_ref, h)
        f_fast, nxt = next_scale_input_fast(tok, si, pns, f_fast, h)
        torch.testing.assert_close(f_fast, f_ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(nxt, nxt_ref, atol=1e-6, rtol=0)


def test_conformance_forced_codes(tiny_pipe):
    from safetensors.torch import load_file

    tok = tiny_pipe.tokenizer
    out = load_file(f"{REF_DIR}/outputs.safetensors")
    pns = tiny_pipe.config.patch_nums
    B = out["forced_nodiff/stage00/idx"].shape[0]
    C = tok.Cvae
    E = tok.quantize.embedding.weight.float()
    f_hat = E.new_zeros(B, C, pns[-1], pns[-1])
    for si, pn in enumerate(pns[:-1]):
        idx = out[f"forced_nodiff/stage{si:02d}/idx"]
        h = E[idx].transpose(1, 2).reshape(B, C, pn, pn)
        f_hat, nxt = next_scale_input_fast(tok, si, pns, f_hat, h)
        torch.testing.assert_close(f_hat, out[f"forced_nodiff/stage{si:02d}/f_hat"], atol=5e-6, rtol=0)
        torch.testing.assert_close(nxt, out[f"forced_nodiff/stage{si:02d}/next_input_latent"],
                                   atol=5e-6, rtol=0)


def test_latent_to_tokens_fast(tiny_pipe):
    tok = tiny_pipe.tokenizer
    pns = tiny_pipe.config.patch_nums
    # A latent made of codebook entries at each scale (well-separated codes), plus noise.
    g = torch.Generator().manual_seed(7)
    idx = [torch.randint(0, tok.V, (2, pn * pn), generator=g) for pn in pns]
    f = tok.tokens_to_latent(idx, pns) + 0.01 * torch.randn(2, tok.Cvae, pns[-1], pns[-1], generator=g)
    ref_idx, ref_res = tok.latent_to_tokens(f, pns)
    got_idx, got_res = latent_to_tokens_fast(tok, f, pns)
    for a, b in zip(got_idx, ref_idx):
        assert torch.equal(a, b)
    torch.testing.assert_close(got_res, ref_res, atol=5e-6, rtol=0)


def test_latent_to_tokens_fast_real_shape():
    from hart_fast.model.tokenizer import HartTokenizer

    tok = _real_tokenizer()
    with torch.no_grad():
        tok.quantize.embedding.weight.normal_()
    g = torch.Generator().manual_seed(2)
    f = torch.randn(1, 32, 64, 64, generator=g)
    with torch.no_grad():
        ref_idx, ref_res = HartTokenizer.latent_to_tokens(tok, f, HART_PN)
        got_idx, got_res = latent_to_tokens_fast(tok, f, HART_PN)
    # Random latents may hit genuine near ties in the nearest-code search
    # (see vq.py); the codes must agree almost everywhere and the residual
    # must agree wherever the codes of the last scale do.
    for a, b in zip(got_idx, ref_idx):
        assert (a == b).float().mean().item() >= 0.99
    if all(torch.equal(a, b) for a, b in zip(got_idx, ref_idx)):
        torch.testing.assert_close(got_res, ref_res, atol=2e-5, rtol=0)


def test_cuda_matches_cpu_kernel_bitwise(cuda_kernel_device):
    """The CUDA kernels run the same shared per-element math as the CPU ones."""
    g = torch.Generator().manual_seed(9)
    for dtype in DTYPES:
        for pn in (1, 5, 27, 48):
            x = torch.randn(2, 32, pn, pn, generator=g).to(dtype)
            assert torch.equal(bicubic_upsample(x.cuda(), 64, 64).cpu(), bicubic_upsample(x, 64, 64))
        f = torch.randn(2, 32, 64, 64, generator=g).to(dtype)
        for pn in (2, 7, 36):
            assert torch.equal(area_downsample(f.cuda(), pn, pn).cpu(), area_downsample(f, pn, pn))
        acc = torch.randn(2, 32, 64, 64, generator=g)
        acc_gpu = acc.cuda()
        conv = torch.randn(2, 32, 64, 64, generator=g).to(dtype)
        phi_blend_accumulate_(acc, f, conv, 0.5)
        phi_blend_accumulate_(acc_gpu, f.cuda(), conv.cuda(), 0.5)
        assert torch.equal(acc_gpu.cpu(), acc)
