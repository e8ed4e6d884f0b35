"""hart_fast.ops.group_norm_silu vs F.group_norm (+ F.silu).

Tolerances (python_tests/numerics.py): fp32 outputs must match the fp32
reference to 1e-5, absolute and relative (the kernel sums the statistics in
fp64, torch in fp32: rounding noise only).  fp16 / bf16 follow the
flash-attention rule: the kernel's error against the reference evaluated on
fp32-upcast inputs is at most twice the error of the reference evaluated in
the low precision (plus 8 fp32 ulps of the output's magnitude, for cases where
that error is ~0); and since the kernel rounds where the reference rounds
(after the norm, after the SiLU) at least 99% of the elements must be bitwise
equal to the low-precision reference.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hart_fast.ops as ops
from hart_fast.ops import group_norm_silu, group_norm_silu_reference

from numerics import assert_mostly_equal, assert_within_2x_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CHANNELS = [32, 64, 96, 160]
SPATIAL = [(1, 1), (3, 5), (7, 7), (16, 16), (64, 64)]
EPS = 1e-6


def make_args(shape, dtype, device, *, affine=True, channels_last=False, param_dtype=None, seed=0,
              mean=0.5, std=2.0):
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = (torch.randn(*shape, generator=g) * std + mean).to(device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    pdt = param_dtype or dtype
    w = (torch.randn(C, generator=g) * 0.5 + 1.0).to(device=device, dtype=pdt) if affine else None
    b = (torch.randn(C, generator=g) * 0.3).to(device=device, dtype=pdt) if affine else None
    return x, w, b


def up(t):
    return None if t is None else t.float()


def dbl(t):
    return None if t is None else t.double()


def assert_faithful(out, x, w, b, groups=32, silu=True):
    assert out.dtype == x.dtype and out.shape == x.shape and out.device == x.device
    cl = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    fmt = torch.channels_last if cl else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)
    ref_same = group_norm_silu_reference(x, w, b, groups, EPS, silu)
    if x.dtype == torch.float32:
        # Against the fp64 evaluation: torch's own fp32 GroupNorm folds the
        # mean into the shift (x * a + (b - mean * a)), which cancels for
        # groups of tiny spread (e.g. one element per group: 1e-4 off); the
        # kernel computes (x - mean) * a + b and is accurate there.
        ref64 = group_norm_silu_reference(x.double(), dbl(w), dbl(b), groups, EPS, silu).float()
        torch.testing.assert_close(out, ref64, atol=1e-5, rtol=1e-5)
        return
    ref32 = group_norm_silu_reference(x.float(), up(w), up(b), groups, EPS, silu)
    assert_within_2x_error(out, ref_same, ref32, ulps=8, ulp_dtype=torch.float32)
    if x[0, : x.shape[1] // groups].numel() == 1:
        return  # 1-element groups: torch's fp32 noise (see above) decides the rounding
    if x.device.type == "cuda":
        # torch's CUDA GroupNorm rounds differently from its CPU kernel (it folds
        # mean and affine into one x * a + b in fp32 before the fp16/bf16 store);
        # measured on an H200, ~70% bitwise agreement. The 2x-error rule above is
        # the bound that holds on both devices.
        return
    assert_mostly_equal(out, ref_same, 0.99)


class TestGroupNormSilu:
    @pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("hw", SPATIAL, ids=lambda s: f"{s[0]}x{s[1]}")
    @pytest.mark.parametrize("C", CHANNELS)
    def test_shapes(self, kernel_device, C, hw, dtype, channels_last):
        x, w, b = make_args((2, C) + hw, dtype, kernel_device, channels_last=channels_last,
                            seed=C + hw[0])
        assert_faithful(group_norm_silu(x, w, b, 32, EPS), x, w, b)

    @pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
    def test_real_size(self, kernel_device, channels_last):
        # The decoder's widest activation per 256 x 256 tile of a 1024px image.
        x, w, b = make_args((1, 160, 256, 256), torch.float32, kernel_device,
                            channels_last=channels_last)
        out = group_norm_silu(x, w, b, 32, EPS)
        assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        # 10^5 elements per group: torch's fp32 statistics are accurate here,
        # and the fp64 reference would cost seconds on a small CPU.
        torch.testing.assert_close(out, group_norm_silu_reference(x, w, b, 32, EPS), atol=1e-5, rtol=1e-5)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("affine", [True, False])
    @pytest.mark.parametrize("silu", [True, False])
    def test_options(self, kernel_device, dtype, affine, silu):
        x, w, b = make_args((3, 64, 9, 11), dtype, kernel_device, affine=affine)
        assert_faithful(group_norm_silu(x, w, b, 32, EPS, silu), x, w, b, silu=silu)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("C", [4, 20, 40, 1100])
    def test_nhwc_odd_channels(self, kernel_device, C, dtype):
        # The CPU kernel sums NHWC channels in blocks of 16 (C % 16 left over for
        # a plain loop) and normalises runs of whole pixels up to 1,024 values
        # (one pixel in 1,024-value pieces above that): widths on each side of both.
        x, w, b = make_args((2, C, 3, 5), dtype, kernel_device, channels_last=True, seed=C)
        assert_faithful(group_norm_silu(x, w, b, 4, EPS), x, w, b, groups=4)

    @pytest.mark.parametrize("groups", [1, 4, 16, 96])
    def test_groups(self, kernel_device, groups):
        x, w, b = make_args((2, 96, 5, 6), torch.float32, kernel_device)
        assert_faithful(group_norm_silu(x, w, b, groups, EPS), x, w, b, groups=groups)

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
    def test_fp32_params(self, kernel_device, dtype):
        # Mixed precision: low-precision activations, fp32 GroupNorm parameters.
        x, w, b = make_args((2, 64, 8, 8), dtype, kernel_device, param_dtype=torch.float32)
        assert_faithful(group_norm_silu(x, w, b, 32, EPS), x, w, b)

    @pytest.mark.parametrize("shape", [(2, 64), (2, 64, 37), (1, 32, 2, 3, 4)])
    def test_other_ranks(self, kernel_device, shape):
        x, w, b = make_args(shape, torch.float32, kernel_device)
        assert_faithful(group_norm_silu(x, w, b, 32, EPS), x, w, b)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    def test_non_contiguous(self, kernel_device, dtype):
        # Arbitrary strides are copied to NCHW; the result is NCHW-contiguous.
        x, w, b = make_args((2, 64, 12, 14), dtype, kernel_device)
        xs = x[:, :, ::2, 1::2]
        assert not xs.is_contiguous()
        assert_faithful(group_norm_silu(xs, w, b, 32, EPS), xs, w, b)
        xt = x.transpose(2, 3)
        assert_faithful(group_norm_silu(xt, w, b, 32, EPS), xt, w, b)
        wide = torch.randn(128, device=kernel_device, dtype=dtype)
        assert_faithful(group_norm_silu(x, wide[::2], wide[1::2], 32, EPS), x, wide[::2], wide[1::2])

    def test_large_mean_offset(self, kernel_device):
        # var = E[x^2] - mean^2 in fp64: no cancellation trouble at |mean| / std = 1e3.
        x, w, b = make_args((1, 32, 32, 32), torch.float32, kernel_device, mean=1000.0, std=1.0)
        out = group_norm_silu(x, w, b, 32, EPS)
        ref = group_norm_silu_reference(x.double(), w.double(), b.double(), 32, EPS).float()
        torch.testing.assert_close(out, ref, atol=2e-4, rtol=1e-4)  # limited by x's own fp32 ulp (6e-5)

    def test_constant_groups(self, kernel_device):
        # Zero variance: rstd = 1 / sqrt(eps), the output is finite.
        x = torch.full((2, 32, 4, 4), 3.0, device=kernel_device)
        out = group_norm_silu(x, None, None, 32, EPS)
        assert torch.isfinite(out).all()
        assert_faithful(out, x, None, None)

    def test_empty_batch(self, kernel_device):
        x = torch.empty(0, 32, 4, 4, device=kernel_device)
        assert group_norm_silu(x, None, None, 32, EPS).shape == (0, 32, 4, 4)

    def test_silu_formula_fp32(self, kernel_device):
        # The fp32 SiLU is torch's own formula y / (1 + exp(-y)); with a
        # unit-variance input and no affine the only other step is the norm.
        x, _, _ = make_args((1, 32, 16, 16), torch.float32, kernel_device)
        y = F.group_norm(x, 32, None, None, EPS)
        torch.testing.assert_close(group_norm_silu(x, None, None, 32, EPS), y / (1 + torch.exp(-y)),
                                   atol=1e-5, rtol=1e-5)

    def test_matches_cpu_kernel(self, cuda_kernel_device):
        for dtype in DTYPES:
            for cl in (False, True):
                x, w, b = make_args((2, 160, 40, 40), dtype, "cuda", channels_last=cl)
                got = group_norm_silu(x, w, b, 32, EPS).cpu()
                want = group_norm_silu(x.cpu(), w.cpu(), b.cpu(), 32, EPS)
                # Different fp64 summation orders and exp implementations (CUDA
                # expf vs Sleef): one rounding step of the output dtype at most.
                tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
                torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)

    @pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
    def test_opcheck(self, kernel_device, channels_last):
        x, w, b = make_args((2, 64, 5, 7), torch.bfloat16, kernel_device, channels_last=channels_last)
        torch.library.opcheck(torch.ops.hart_fast.group_norm_silu.default, (x, w, b, 32, EPS, True))

    def test_torch_compile(self, kernel_device):
        x, w, b = make_args((2, 64, 5, 7), torch.float32, kernel_device, channels_last=True)

        def fn(x, w, b):
            return group_norm_silu(x, w, b, 32, EPS) * 2.0

        out = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, w, b)
        torch.testing.assert_close(out, fn(x, w, b), atol=0, rtol=0)


class TestGroupNormSiluErrors:
    def test_groups_do_not_divide(self):
        with pytest.raises(ValueError, match=r"groups \(32\) to be positive and to divide .*\(48\)"):
            group_norm_silu(torch.ones(1, 48, 2, 2), groups=32)

    def test_bad_weight_shape(self):
        with pytest.raises(ValueError, match=r"weight to be a 1-D tensor of shape \(64,\).*\(32,\)"):
            group_norm_silu(torch.ones(1, 64, 2, 2), torch.ones(32), None, 32)
        with pytest.raises(ValueError, match=r"bias to be a 1-D tensor of shape \(64,\)"):
            group_norm_silu(torch.ones(1, 64, 2, 2), None, torch.ones(1, 64), 32)

    def test_bad_dtypes(self):
        with pytest.raises(TypeError, match=r"x to have dtype .*int64"):
            group_norm_silu(torch.ones(1, 32, 2, 2, dtype=torch.int64))
        with pytest.raises(TypeError, match="weight to have dtype bfloat16, float32"):
            group_norm_silu(torch.ones(1, 32, 2, 2, dtype=torch.bfloat16), torch.ones(32, dtype=torch.float16))

    def test_bad_scalars(self):
        x = torch.ones(1, 32, 2, 2)
        with pytest.raises(TypeError, match="groups to be an int"):
            group_norm_silu(x, groups=32.0)
        with pytest.raises(ValueError, match="eps to be a finite non-negative"):
            group_norm_silu(x, eps=-1.0)
        with pytest.raises(TypeError, match="silu to be a bool"):
            group_norm_silu(x, silu=1)

    def test_bad_rank_and_device(self):
        with pytest.raises(ValueError, match="at least 2 dimensions"):
            group_norm_silu(torch.ones(32), groups=32)
        with pytest.raises(ValueError, match=r"weight to be on the same device as x \(cpu\)"):
            group_norm_silu(torch.ones(1, 32, 2, 2), torch.ones(32, device="meta"))

    def test_kernel_checks_without_wrapper(self, requires_extension):
        op = torch.ops.hart_fast.group_norm_silu
        with pytest.raises(ValueError, match=r"expected groups \(32\) to be positive and to divide"):
            op(torch.ones(1, 48, 2, 2), None, None, 32, EPS, True)
        with pytest.raises(ValueError, match=r"weight to be a 1-D tensor of shape \(32,\)"):
            op(torch.ones(1, 32, 2, 2), torch.ones(3), None, 32, EPS, True)
        with pytest.raises(TypeError, match="expected x to have dtype Float, Half or BFloat16"):
            op(torch.ones(1, 32, 2, 2, dtype=torch.float64), None, None, 32, EPS, True)


class TestGroupNormSiluFallback:
    def test_wrapper_uses_reference(self, monkeypatch):
        import hart_fast.ops.group_norm as module

        calls = []

        def spy(*a, **kw):
            calls.append(1)
            return group_norm_silu_reference(*a, **kw)

        monkeypatch.setattr(ops, "HAS_EXTENSION", False)
        monkeypatch.setattr(module, "group_norm_silu_reference", spy)
        x, w, b = make_args((2, 64, 3, 3), torch.bfloat16, "cpu", channels_last=True)
        out = group_norm_silu(x, w, b, 32, EPS)
        assert calls == [1]
        assert torch.equal(out, group_norm_silu_reference(x, w, b, 32, EPS))
        assert out.is_contiguous(memory_format=torch.channels_last)

    def test_wrapper_validates_in_fallback(self, monkeypatch):
        monkeypatch.setattr(ops, "HAS_EXTENSION", False)
        with pytest.raises(ValueError, match="weight to be a 1-D tensor"):
            group_norm_silu(torch.ones(1, 32, 2, 2), torch.ones(2))

    def test_reference_is_official_pair(self):
        x, w, b = make_args((2, 64, 4, 4), torch.bfloat16, "cpu")
        assert torch.equal(group_norm_silu_reference(x, w, b, 32, EPS), F.silu(F.group_norm(x, 32, w, b, EPS)))
