"""hart_fast.ops.rms_norm_modulate / layer_norm_modulate vs their references.

Tolerances (python_tests/numerics.py): fp32 outputs must match the fp32
reference to 1e-5 (absolute and relative).  For fp16 / bf16 we use the
flash-attention rule: the kernel's error against the reference evaluated on
fp32-upcast inputs may be at most twice the error of the reference itself
evaluated in the low precision, plus 8 fp32 ulps of the output's magnitude
(where the reference happens to be exact, e.g. constant rows, the kernel may
still differ by its fp32 row sums' order).  Because the kernel rounds at the
same points as the reference, it also has to be bitwise equal to the
low-precision reference on almost all elements.
"""

from __future__ import annotations


import pytest
import torch

import hart_fast.ops as ops
from hart_fast.ops import (
    layer_norm_modulate,
    layer_norm_modulate_reference,
    rms_norm_modulate,
    rms_norm_modulate_reference,
)

from numerics import assert_mostly_equal, assert_within_2x_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CHANNELS = [16, 64, 111, 1536]
ROWS = [1, 7, 300, 4096]
EPS = 1e-6

OPS = {
    "rms": (rms_norm_modulate, rms_norm_modulate_reference),
    "layer": (layer_norm_modulate, layer_norm_modulate_reference),
}


def make_args(kind, shape, dtype, device, *, weight=True, bias=True, scale=True, shift=True,
              mod_shape=None, weight_dtype=None, seed=0):
    """Keyword arguments for one call; x (B, L, C), scale/shift (B, 1, C) by default."""
    g = torch.Generator().manual_seed(seed)
    C = shape[-1]
    mod_shape = mod_shape if mod_shape is not None else (shape[0],) + (1,) * (len(shape) - 2) + (C,)

    def rnd(*s, mul=1.0, add=0.0, dt=dtype):
        return (torch.randn(*s, generator=g) * mul + add).to(device=device, dtype=dt)

    args = {"x": rnd(*shape, mul=2.0, add=0.5)}
    wdt = weight_dtype or dtype
    args["weight"] = rnd(C, mul=0.5, add=1.0, dt=wdt) if weight else None
    if kind == "layer":
        args["bias"] = rnd(C, mul=0.2, dt=wdt) if bias else None
    args["scale"] = rnd(*mod_shape, mul=0.3) if scale else None
    args["shift"] = rnd(*mod_shape, mul=0.3) if shift else None
    args["eps"] = EPS
    return args


def upcast(args):
    return {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}


def assert_faithful(kind, out, args):
    op, ref = OPS[kind]
    x = args["x"]
    assert out.dtype == x.dtype and out.shape == x.shape and out.device == x.device
    assert out.is_contiguous()
    ref_same = ref(**args)
    if x.dtype == torch.float32:
        torch.testing.assert_close(out, ref_same, atol=1e-5, rtol=1e-5)
        return
    assert_within_2x_error(out, ref_same, ref(**upcast(args)), ulps=8, ulp_dtype=torch.float32)
    assert_mostly_equal(out, ref_same, 0.99)


def shape_for(rows, C):
    B = 2 if rows % 2 == 0 else 1
    return (B, rows // B, C)


@pytest.mark.parametrize("kind", ["rms", "layer"])
class TestNormModulate:
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("rows", ROWS)
    @pytest.mark.parametrize("C", CHANNELS)
    def test_shapes(self, kind, kernel_device, C, rows, dtype):
        args = make_args(kind, shape_for(rows, C), dtype, kernel_device, seed=C * 7 + rows)
        assert_faithful(kind, OPS[kind][0](**args), args)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("weight", [True, False])
    @pytest.mark.parametrize("scale", [True, False])
    @pytest.mark.parametrize("shift", [True, False])
    def test_optional_operands(self, kind, kernel_device, dtype, weight, scale, shift):
        args = make_args(kind, (2, 33, 111), dtype, kernel_device, weight=weight, bias=weight,
                         scale=scale, shift=shift)
        assert_faithful(kind, OPS[kind][0](**args), args)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_fp32_weight(self, kind, kernel_device, dtype):
        # HART keeps norm parameters in fp32 while activations run in bf16.
        args = make_args(kind, (2, 17, 64), dtype, kernel_device, weight_dtype=torch.float32)
        assert_faithful(kind, OPS[kind][0](**args), args)

    @pytest.mark.parametrize(
        "x_shape,mod_shape",
        [
            ((2, 9, 64), (64,)),
            ((2, 9, 64), (1, 1, 64)),
            ((2, 9, 64), (2, 1, 64)),
            ((2, 9, 64), (1, 9, 64)),
            ((2, 9, 64), (2, 9, 64)),
            ((2, 9, 64), (9, 64)),
            ((2, 3, 4, 32), (2, 1, 1, 32)),
            ((2, 3, 4, 32), (3, 4, 32)),
            ((2, 3, 4, 32), (2, 1, 4, 32)),  # non-block pattern: expanded internally
            ((40, 64), (40, 64)),
            ((64,), (64,)),
        ],
    )
    def test_broadcast_patterns(self, kind, kernel_device, x_shape, mod_shape):
        args = make_args(kind, x_shape, torch.float32, kernel_device, mod_shape=mod_shape)
        assert_faithful(kind, OPS[kind][0](**args), args)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    def test_non_contiguous(self, kind, kernel_device, dtype):
        args = make_args(kind, (2, 64, 23), dtype, kernel_device)
        args["x"] = args["x"].transpose(1, 2)  # (2, 23, 64) with stride 1 along L
        wide = make_args(kind, (2, 1, 128), dtype, kernel_device, seed=3)
        args["scale"] = wide["scale"][..., ::2]  # (2, 1, 64), strided channels
        args["shift"] = wide["shift"].expand(2, 23, 128)[..., 1::2]  # stride-0 rows
        args["weight"] = wide["weight"][::2]
        if kind == "layer":
            args["bias"] = wide["bias"][1::2]
        assert not args["x"].is_contiguous()
        assert_faithful(kind, OPS[kind][0](**args), args)

    def test_empty_rows(self, kind, kernel_device):
        args = make_args(kind, (2, 0, 64), torch.float32, kernel_device)
        out = OPS[kind][0](**args)
        assert out.shape == (2, 0, 64)

    def test_constant_rows(self, kind, kernel_device):
        # Zero variance: the result is finite and driven by eps alone.
        args = make_args(kind, (2, 5, 64), torch.float32, kernel_device, weight=False,
                         bias=False, scale=False, shift=False)
        args["x"] = torch.full_like(args["x"], 3.0)
        assert_faithful(kind, OPS[kind][0](**args), args)

    def test_matches_cpu_kernel_bitwise(self, kind, cuda_kernel_device):
        # CPU and CUDA kernels share their arithmetic, reduction order included.
        for dtype in DTYPES:
            args = make_args(kind, (2, 300, 1536), dtype, "cuda")
            cpu_args = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
            op = OPS[kind][0]
            assert torch.equal(op(**args).cpu(), op(**cpu_args))

    def test_opcheck(self, kind, kernel_device):
        args = make_args(kind, (2, 7, 48), torch.bfloat16, kernel_device)
        fn = getattr(torch.ops.hart_fast, f"{kind}_norm_modulate").default
        torch.library.opcheck(fn, tuple(args.values()))

    @pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.inductor)])
    def test_torch_compile(self, kind, kernel_device, backend):
        op, _ = OPS[kind]
        args = make_args(kind, (2, 7, 64), torch.float32, kernel_device)

        def fn(**kw):
            return op(**kw) * 2.0

        out = torch.compile(fn, fullgraph=True, backend=backend)(**args)
        torch.testing.assert_close(out, fn(**args), atol=0, rtol=0)


class TestNormErrors:
    """Wrappers raise TypeError / ValueError that name the offending argument."""

    def test_bad_x_dtype(self):
        with pytest.raises(TypeError, match=r"x to have dtype .*int64"):
            rms_norm_modulate(torch.ones(2, 4, dtype=torch.int64))

    def test_not_a_tensor(self):
        with pytest.raises(TypeError, match="weight to be a tensor or None"):
            rms_norm_modulate(torch.ones(2, 4), weight=[1.0] * 4)

    def test_bad_weight_shape(self):
        with pytest.raises(ValueError, match=r"weight to be a 1-D tensor of shape \(4,\).*\(5,\)"):
            rms_norm_modulate(torch.ones(2, 4), weight=torch.ones(5))

    def test_bad_scale_last_dim(self):
        with pytest.raises(ValueError, match=r"scale .*last dimension 8.*\(2, 1, 4\)"):
            layer_norm_modulate(torch.ones(2, 3, 8), scale=torch.ones(2, 1, 4))

    def test_scale_not_broadcastable(self):
        with pytest.raises(ValueError, match=r"shift with shape \(3, 1, 8\) does not broadcast"):
            rms_norm_modulate(torch.ones(2, 3, 8), shift=torch.ones(3, 1, 8))

    def test_scale_too_many_dims(self):
        with pytest.raises(ValueError, match="scale to broadcast against x"):
            rms_norm_modulate(torch.ones(3, 8), scale=torch.ones(1, 1, 8))

    def test_scale_dtype_mismatch(self):
        with pytest.raises(TypeError, match=r"scale to have the same dtype as x \(bfloat16\)"):
            rms_norm_modulate(torch.ones(2, 8, dtype=torch.bfloat16), scale=torch.ones(2, 8))

    def test_layer_norm_weight_dtype(self):
        x = torch.ones(2, 8, dtype=torch.float16)
        with pytest.raises(TypeError, match="weight to have dtype float16, float32"):
            layer_norm_modulate(x, weight=torch.ones(8, dtype=torch.bfloat16))
        with pytest.raises(TypeError, match="weight and bias to have the same dtype"):
            layer_norm_modulate(x, weight=torch.ones(8), bias=torch.ones(8, dtype=torch.float16))

    def test_device_mismatch(self):
        with pytest.raises(ValueError, match=r"weight to be on the same device as x \(cpu\).*meta"):
            rms_norm_modulate(torch.ones(2, 8), weight=torch.ones(8, device="meta"))

    def test_empty_channels(self):
        with pytest.raises(ValueError, match="non-empty last dimension"):
            rms_norm_modulate(torch.ones(2, 0))

    def test_bad_eps(self):
        with pytest.raises(ValueError, match="eps to be a finite non-negative"):
            rms_norm_modulate(torch.ones(2, 8), eps=-1.0)

    def test_kernel_checks_without_wrapper(self, requires_extension):
        # The C++ checks back up the wrapper for direct torch.ops callers.
        with pytest.raises(ValueError, match=r"expected weight to be a 1-D tensor of shape \(8,\)"):
            torch.ops.hart_fast.rms_norm_modulate(torch.ones(2, 8), torch.ones(3), None, None, 1e-6)
        with pytest.raises(TypeError, match="expected x to have dtype Float, Half or BFloat16"):
            torch.ops.hart_fast.layer_norm_modulate(
                torch.ones(2, 8, dtype=torch.float64), None, None, None, None, 1e-6)
        with pytest.raises(ValueError, match="does not broadcast against x"):
            torch.ops.hart_fast.rms_norm_modulate(
                torch.ones(2, 3, 8), None, torch.ones(3, 1, 8), None, 1e-6)

    def test_kernel_mixed_devices_without_wrapper(self, cuda_kernel_device):
        # x on the CPU, weight on the GPU: the dispatcher picks the CUDA kernel,
        # whose device guard names the problem (csrc/cuda/device_guard.h).
        with pytest.raises(ValueError, match="expected x on a CUDA device like the other arguments, but got x on cpu"):
            torch.ops.hart_fast.rms_norm_modulate(torch.ones(2, 8), torch.ones(8, device="cuda"), None, None, 1e-6)


class TestNormFallback:
    """Without the compiled extension the wrappers run the references."""

    @pytest.mark.parametrize("kind", ["rms", "layer"])
    def test_wrapper_uses_reference(self, kind, monkeypatch):
        import hart_fast.ops.norm as norm_module

        op, ref = OPS[kind]
        calls = []

        def spy(*a, **kw):
            calls.append(1)
            return ref(*a, **kw)

        monkeypatch.setattr(ops, "HAS_EXTENSION", False)
        monkeypatch.setattr(norm_module, ref.__name__, spy)
        args = make_args(kind, (2, 5, 32), torch.bfloat16, "cpu")
        out = op(**args)
        assert calls == [1]
        assert torch.equal(out, ref(**args))

    @pytest.mark.parametrize("kind", ["rms", "layer"])
    def test_wrapper_validates_in_fallback(self, kind, monkeypatch):
        monkeypatch.setattr(ops, "HAS_EXTENSION", False)
        with pytest.raises(ValueError, match="weight to be a 1-D tensor"):
            OPS[kind][0](torch.ones(2, 8), weight=torch.ones(2))

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
    def test_reference_matches_hart_formula(self, dtype):
        # HART's fused rms_norm kernel: normalise in fp32, round to x.dtype, then
        # times the weight cast to x.dtype, the product rounded to x.dtype.
        x = torch.randn(3, 16, dtype=dtype)
        w = torch.randn(16)
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(dtype)
        expected = (y.float() * w.to(dtype).float()).to(dtype)
        assert torch.equal(rms_norm_modulate_reference(x, w, eps=EPS), expected)
        # ... which differs from rounding once after an fp32 weight product somewhere here.
        once = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS) * w).to(dtype)
        assert not torch.equal(expected, once)

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
    def test_layer_reference_matches_autocast_formula(self, dtype):
        # The residual MLP under autocast: LayerNorm and modulation in fp32, one rounding.
        g = torch.Generator().manual_seed(3)
        x = torch.randn(4, 24, generator=g).to(dtype)
        w, b = torch.randn(24, generator=g), torch.randn(24, generator=g)
        scale = torch.randn(4, 24, generator=g).to(dtype)
        shift = torch.randn(4, 24, generator=g).to(dtype)
        y = torch.nn.functional.layer_norm(x.float(), (24,), w, b, EPS)
        expected = (y * (1 + scale.float()).to(dtype).float() + shift.float()).to(dtype)
        got = layer_norm_modulate_reference(x, w, b, scale, shift, EPS)
        assert torch.equal(got, expected)


# ---------------------------------------------------------------------------
# Residual-add variants: (s, norm(s)) with s = x + branch * gate
# ---------------------------------------------------------------------------
ADD_OPS = {
    "rms": (ops.add_rms_norm_modulate, ops.add_rms_norm_modulate_reference),
    "layer": (ops.add_layer_norm_modulate, ops.add_layer_norm_modulate_reference),
}


def make_add_args(kind, shape, dtype, device, *, gate=True, gate_shape=None, seed=0, **kw):
    """make_args plus branch (x's shape) and gate ((B, 1, C) by default)."""
    args = make_args(kind, shape, dtype, device, seed=seed, **kw)
    g = torch.Generator().manual_seed(seed + 1000)
    C = shape[-1]
    gate_shape = gate_shape if gate_shape is not None else (shape[0],) + (1,) * (len(shape) - 2) + (C,)
    x = args.pop("x")
    out = {"x": x, "branch": (torch.randn(*shape, generator=g) * 3.0).to(device=device, dtype=dtype)}
    out["gate"] = (torch.randn(*gate_shape, generator=g) * 0.5).to(device=device, dtype=dtype) if gate else None
    out.update(args)
    return out


def assert_add_faithful(kind, got, args):
    """The sum is bitwise the torch expression; the norm of it is held to assert_faithful."""
    s, y = got
    x, branch, gate = args["x"], args["branch"], args["gate"]
    expected_s = x + (branch if gate is None else branch * gate)
    assert s.dtype == x.dtype and s.shape == x.shape and s.is_contiguous()
    assert torch.equal(s, expected_s), "the residual sum must round exactly like x + branch * gate"
    norm_args = {k: v for k, v in args.items() if k not in ("branch", "gate")}
    norm_args["x"] = expected_s
    assert_faithful(kind, y, norm_args)


@pytest.mark.parametrize("kind", ["rms", "layer"])
class TestAddNormModulate:
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("rows", [1, 7, 300, 2 * 4096])
    @pytest.mark.parametrize("C", [16, 111, 1024, 1536])
    def test_shapes(self, kind, kernel_device, C, rows, dtype):
        args = make_add_args(kind, shape_for(rows, C), dtype, kernel_device, seed=C * 3 + rows)
        assert_add_faithful(kind, ADD_OPS[kind][0](**args), args)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("gate", [True, False])
    @pytest.mark.parametrize("modulate", [True, False])
    def test_optional_operands(self, kind, kernel_device, dtype, gate, modulate):
        args = make_add_args(kind, (2, 33, 111), dtype, kernel_device, gate=gate, scale=modulate,
                             shift=modulate, weight=modulate, bias=modulate)
        assert_add_faithful(kind, ADD_OPS[kind][0](**args), args)

    @pytest.mark.parametrize(
        "x_shape,gate_shape",
        [
            ((2, 9, 64), (64,)),
            ((2, 9, 64), (2, 1, 64)),  # HART's AR blocks: one gate row per image
            ((2, 9, 64), (2, 9, 64)),
            ((40, 64), (40, 64)),  # the diffusion MLP: one gate row per token
            ((2, 3, 4, 32), (2, 1, 4, 32)),  # non-block pattern: expanded internally
        ],
    )
    def test_gate_broadcast(self, kind, kernel_device, x_shape, gate_shape):
        args = make_add_args(kind, x_shape, torch.float32, kernel_device, gate_shape=gate_shape)
        assert_add_faithful(kind, ADD_OPS[kind][0](**args), args)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
    def test_strided_operands(self, kind, kernel_device, dtype):
        # The diffusion MLP's gate is a column slice of one (R, k*W) adaLN GEMM output.
        args = make_add_args(kind, (48, 64), dtype, kernel_device)
        wide = torch.randn(48, 3 * 64, dtype=torch.float32).to(kernel_device, dtype)
        args["shift"], args["scale"], args["gate"] = wide[:, :64], wide[:, 64:128] * 0.3, wide[:, 128:]
        args["scale"] = torch.cat([args["scale"], args["scale"]], 1)[:, 32:96]  # another slice
        args["branch"] = torch.randn(64, 48).to(kernel_device, dtype).t()
        assert not args["gate"].is_contiguous() and not args["branch"].is_contiguous()
        assert_add_faithful(kind, ADD_OPS[kind][0](**args), args)

    def test_inputs_untouched(self, kind, kernel_device):
        args = make_add_args(kind, (2, 5, 32), torch.float16, kernel_device)
        before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
        ADD_OPS[kind][0](**args)
        for k, v in before.items():
            assert torch.equal(args[k], v), f"{k} was modified"

    def test_empty_rows(self, kind, kernel_device):
        args = make_add_args(kind, (2, 0, 64), torch.float32, kernel_device)
        s, y = ADD_OPS[kind][0](**args)
        assert s.shape == y.shape == (2, 0, 64)

    def test_matches_cpu_kernel_bitwise(self, kind, cuda_kernel_device):
        for dtype in DTYPES:
            args = make_add_args(kind, (2, 300, 1536), dtype, "cuda")
            cpu_args = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
            op = ADD_OPS[kind][0]
            for got, want in zip(op(**args), op(**cpu_args)):
                assert torch.equal(got.cpu(), want)

    def test_opcheck(self, kind, kernel_device):
        args = make_add_args(kind, (2, 7, 48), torch.bfloat16, kernel_device)
        fn = getattr(torch.ops.hart_fast, f"add_{kind}_norm_modulate").default
        torch.library.opcheck(fn, tuple(args.values()))

    def test_torch_compile(self, kind, kernel_device):
        op, _ = ADD_OPS[kind]
        args = make_add_args(kind, (2, 7, 64), torch.float32, kernel_device)

        def fn(**kw):
            s, y = op(**kw)
            return s * 2.0, y + 1.0

        out = torch.compile(fn, fullgraph=True, backend="aot_eager")(**args)
        for a, b in zip(out, fn(**args)):
            torch.testing.assert_close(a, b, atol=0, rtol=0)

    def test_fallback_matches_kernel(self, kind, monkeypatch):
        op, ref = ADD_OPS[kind]
        args = make_add_args(kind, (2, 5, 32), torch.bfloat16, "cpu")
        monkeypatch.setattr(ops, "HAS_EXTENSION", False)
        s, y = op(**args)
        rs, ry = ref(**args)
        assert torch.equal(s, rs) and torch.equal(y, ry)


class TestAddNormErrors:
    def test_branch_shape(self):
        with pytest.raises(ValueError, match=r"branch to have the same shape as x, \(2, 3, 8\).*\(2, 1, 8\)"):
            ops.add_rms_norm_modulate(torch.ones(2, 3, 8), torch.ones(2, 1, 8))

    def test_branch_dtype(self):
        with pytest.raises(TypeError, match=r"branch to have the same dtype as x \(float16\)"):
            ops.add_layer_norm_modulate(torch.ones(2, 8, dtype=torch.float16), torch.ones(2, 8))

    def test_gate_dtype_and_shape(self):
        x = torch.ones(2, 3, 8, dtype=torch.bfloat16)
        with pytest.raises(TypeError, match=r"gate to have the same dtype as x \(bfloat16\)"):
            ops.add_rms_norm_modulate(x, x, torch.ones(2, 1, 8))
        with pytest.raises(ValueError, match=r"gate with shape \(3, 1, 8\) does not broadcast"):
            ops.add_rms_norm_modulate(x, x, torch.ones(3, 1, 8, dtype=torch.bfloat16))

    def test_branch_not_a_tensor(self):
        with pytest.raises(TypeError, match="branch to be a tensor"):
            ops.add_rms_norm_modulate(torch.ones(2, 8), None)

    def test_kernel_checks_without_wrapper(self, requires_extension):
        with pytest.raises(ValueError, match=r"expected branch to have the same shape as x"):
            torch.ops.hart_fast.add_rms_norm_modulate(
                torch.ones(2, 8), torch.ones(2, 4), None, None, None, None, 1e-6)
        with pytest.raises(TypeError, match=r"expected gate to have the same dtype as x"):
            torch.ops.hart_fast.add_layer_norm_modulate(
                torch.ones(2, 8), torch.ones(2, 8), torch.ones(8, dtype=torch.float16), None, None,
                None, None, 1e-6)
