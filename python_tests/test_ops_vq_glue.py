"""hart_fast.ops VQ glue (bicubic_upsample, area_downsample, phi_blend_accumulate_,
next_scale_input_fast, latent_to_tokens_fast) vs the PyTorch reference.

Tolerances (python_tests/numerics.py): area_downsample and phi_blend_accumulate_
are bit-exact in fp32.  bicubic_upsample uses PyTorch's exact taps and weights
but a fixed sequential association of the 4+4 products, while torch's CPU kernel
associates them differently (and, vectorised, with or without FMA depending on
the CPU), so fp32 results are compared in ulps of the input's largest magnitude:
an output is a sum of products whose terms can cancel, so its rounding error is
set by the size of the terms, not of the output (see BICUBIC_ULPS).
Low-precision outputs are checked against the fp32-upcast reference: the error
must be at most 2x that of torch's own low-precision result (plus one ulp of the
dtype for ties in the final rounding).
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

from numerics import assert_close_ulps, assert_within_2x_error
from tiny_models import REFERENCE_DIR

HART_PN = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
REF_DIR = REFERENCE_DIR


# Worst-case fp32 distance between two correct bicubic implementations, in ulps
# (eps) of max|x|.  Each of the two separable passes is a 4-term dot product with
# the cubic weights (A = -0.75: sum |w| <= 1.375, at t = 1/2); in any association,
# with or without FMA, such a product is within gamma_4 = 4 u = 2 eps of
# sum |w x| of the exact value.  The row pass is thus within 2 * 1.375 eps * max|x|,
# and the column pass adds its own 2 * 1.375^2 and passes the rows' errors on
# times 1.375: one implementation is within 4 * 1.375^2 ~ 7.6 ulps of max|x| of
# the exact result, two are within ~15 of each other.  Measured: <= 10 on the
# awkward shapes below (downsampling axes, a 1x1 input, ragged ratios).
BICUBIC_ULPS = 16
# HART's grids upsampled to 64 x 64 agree much better: measured <= 1.4 ulps of
# max|x| (the docstring's 1-2 ulp); 4 leaves a 3x margin.
BICUBIC_HART_GRID_ULPS = 4
# Fast and reference VQ glue per stage of the f_hat chain, in ulps of the largest
# |f_hat| so far.  f_hat += (1 - r) * up + r * phi_conv(up) with up = bicubic(h)
# differs between the paths only through `up` (BICUBIC_HART_GRID_ULPS; the conv
# is the same library call, the blend is bit-exact): the r = 1/2 blend of up and
# its conv passes that on without growth (random-sign weights of scale
# 1/sqrt(fan-in)), and the blend and the add into f_hat may each round to the
# other neighbour (1 ulp each), so <= 6 ulps per stage, and the stages' errors
# add up: after k stages <= 6k.  f_hat is a running sum whose terms cancel, so
# the ulps are of max|f_hat|, not of each element (an element near zero carries
# the rounding of the O(max) terms it was summed from).  Measured: <= 2 ulps
# after any number of stages; the old absolute 1e-6 failed on some machines at
# 1.19e-6 (1.4 ulps of |f_hat| ~ 7) once f_hat had grown.
STAGE_ULPS = 6


def _assert_lowp_faithful(out, x, fn, *args):
    """|out - ref32| <= 2x torch's own low-precision error + 1 ulp of the output (max norm)."""
    assert_within_2x_error(out, fn(x, *args), fn(x.float(), *args), ulps=1)


@pytest.mark.usefixtures("kernel_device")
class TestResize:
    @pytest.mark.parametrize("h", list(range(1, 65, 3)) + [48, 64])
    def test_bicubic_all_hart_grids_fp32(self, kernel_device, h):
        g = torch.Generator().manual_seed(h)
        x = torch.randn(2, 5, h, h, generator=g).to(kernel_device)
        out = bicubic_upsample(x, 64, 64)
        ref = bicubic_upsample_reference(x.cpu(), 64, 64)
        assert out.shape == (2, 5, 64, 64) and out.dtype == x.dtype
        assert_close_ulps(out, ref, BICUBIC_HART_GRID_ULPS, scale=x.abs().max())

    @pytest.mark.parametrize("shape,size", [((1, 3, 5, 7), (11, 6)), ((2, 1, 1, 1), (4, 9)),
                                            ((1, 2, 8, 3), (8, 3)), ((3, 4, 6, 6), (2, 13))])
    def test_bicubic_awkward(self, kernel_device, shape, size):
        x = torch.randn(*shape).to(kernel_device)
        out = bicubic_upsample(x, *size)
        # Includes downsampling axes: a few ulps of the larger intermediate sums
        # (association differs from torch's kernel), bounded by BICUBIC_ULPS.
        assert_close_ulps(out, bicubic_upsample_reference(x.cpu(), *size), BICUBIC_ULPS, scale=x.abs().max())

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
    def test_bicubic_lowp(self, kernel_device, dtype):
        x = torch.randn(1, 32, 9, 9).to(kernel_device, dtype)
        out = bicubic_upsample(x, 64, 64)
        assert out.dtype == dtype
        _assert_lowp_faithful(out, x.cpu(), bicubic_upsample_reference, 64, 64)

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
        _assert_lowp_faithful(out, x.cpu(), area_downsample_reference, 9, 9)

    def test_non_contiguous(self, kernel_device):
        x = torch.randn(1, 6, 12, 12).to(kernel_device).permute(0, 1, 3, 2)
        assert not x.is_contiguous()
        assert_close_ulps(bicubic_upsample(x, 20, 20), bicubic_upsample_reference(x.cpu(), 20, 20),
                          BICUBIC_ULPS, scale=x.abs().max())
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
    for k, si in enumerate([0, 3, 6, 9, 12], start=1):
        pn = pns[si]
        h = torch.randn(1, 32, pn, pn, generator=g)
        f_ref, nxt_ref = HartTokenizer.next_scale_input(tok, si, pns, f_ref, h)
        f_fast, nxt = next_scale_input_fast(tok, si, pns, f_fast, h)
        # The next input is an area average of f_hat: its error is f_hat's, so it
        # is held to the same ulps of max|f_hat| (its own values are smaller).
        scale = f_ref.abs().max()
        assert_close_ulps(f_fast, f_ref, STAGE_ULPS * k, scale=scale, msg=f"f_hat after stage {si}")
        assert_close_ulps(nxt, nxt_ref, STAGE_ULPS * k, scale=scale, msg=f"next input after stage {si}")


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
        # The recording is the official code's chain (torch's bicubic): STAGE_ULPS
        # per stage, as against the reference above; the reference README's drift
        # between equivalent fp32 orders (3.0e-7) is ~1 ulp at |f_hat| <= 2.3.
        want = out[f"forced_nodiff/stage{si:02d}/f_hat"]
        scale = want.abs().max()
        assert_close_ulps(f_hat, want, STAGE_ULPS * (si + 1), scale=scale, msg=f"f_hat, stage {si}")
        assert_close_ulps(nxt, out[f"forced_nodiff/stage{si:02d}/next_input_latent"], STAGE_ULPS * (si + 1),
                          scale=scale, msg=f"next input, stage {si}")


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
    # Same codes: the residual f - sum of the stages' contributions differs by the
    # f_hat chain's rounding (STAGE_ULPS per stage) in ulps of the latent's size.
    assert_close_ulps(got_res, ref_res, STAGE_ULPS * len(pns), scale=f.abs().max())


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
    # (see vq.py), so the codes must agree almost everywhere, not everywhere.
    for si, (a, b) in enumerate(zip(got_idx, ref_idx)):
        agree = (a == b).float().mean().item()
        assert agree >= 0.99, f"stage {si}: only {agree:.4f} of the codes agree with the reference"
    # Whatever codes it chose, the fast residual is what the reference makes of
    # them: f minus the reference tokenizer's latent of those codes (HART's
    # var_hybrid last scale has no phi, so the residual is exactly that
    # difference).  The two sides sum the 14 stages' contributions in other
    # orders (f - h0 - h1 - ... vs f - (h0 + h1 + ...)) and with the fast and the
    # reference upsampling: STAGE_ULPS per stage, in ulps of the latents' size.
    tok.Cvae = 32
    tok.next_scale_input = lambda *a: HartTokenizer.next_scale_input(tok, *a)
    with torch.no_grad():
        rec = HartTokenizer.tokens_to_latent(tok, got_idx, HART_PN)
    given_codes = (f - rec).permute(0, 2, 3, 1).reshape(1, -1, 32)
    scale = max(f.abs().max().item(), rec.abs().max().item())
    assert_close_ulps(got_res, given_codes, STAGE_ULPS * len(HART_PN), scale=scale)
    assert got_res.abs().max() > 0.1  # a real residual, not a zero that matches anything


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
