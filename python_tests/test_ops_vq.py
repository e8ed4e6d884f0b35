"""hart_fast.ops.vq_nearest_code vs the official HART nearest-code search.

Two kinds of data:
  * well separated (z = a codebook row + small noise): the index must equal
    the reference's (and the planted one) exactly;
  * unstructured random data: genuine near ties are possible, so we check that
    the chosen code's distance (in float64) equals the minimum distance up to
    fp32 rounding, and that the index matches the reference almost everywhere.
"""

from __future__ import annotations


import pytest
import torch

import hart_fast.ops as ops
from hart_fast.ops import vq_nearest_code, vq_nearest_code_reference

from numerics import assert_close_ulps, assert_mostly_equal

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (N, V, C): real HART is V=4096, C=32, N up to 16*64*64.
SHAPES = [(1, 1, 32), (7, 16, 8), (300, 111, 33), (4096, 4096, 32), (300, 4096, 64), (1000, 7, 3)]


def separated(n, v, c, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    codebook = torch.randn(v, c, generator=g)
    idx = torch.randint(0, v, (n,), generator=g)
    z = codebook[idx] + 0.01 * torch.randn(n, c, generator=g)
    return z.to(device, dtype), codebook.to(device, dtype), idx.to(device)


def distances64(z, codebook):
    return torch.cdist(z.double(), codebook.double()).square()  # (N, V)


@pytest.mark.usefixtures("kernel_device")
class TestVQNearestCode:
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("n,v,c", SHAPES)
    def test_separated_exact(self, kernel_device, n, v, c, dtype):
        z, codebook, planted = separated(n, v, c, dtype, kernel_device, seed=n + v + c)
        out = vq_nearest_code(z, codebook)
        assert out.dtype == torch.int64 and out.shape == (n,) and out.device == z.device
        ref = vq_nearest_code_reference(z, codebook)
        assert torch.equal(out, ref)
        if v > 1 and c >= 8:  # planted codes are the nearest when codes are far apart
            assert torch.equal(out, planted)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("n,v,c", [(300, 111, 33), (4096, 4096, 32), (257, 4096, 8)])
    def test_random_min_distance(self, kernel_device, n, v, c, dtype):
        g = torch.Generator().manual_seed(v * 3 + c)
        z = torch.randn(n, c, generator=g).to(kernel_device, dtype)
        codebook = torch.randn(v, c, generator=g).to(kernel_device, dtype)
        out = vq_nearest_code(z, codebook)
        d = distances64(z, codebook)  # (N, V)
        chosen = d.gather(1, out[:, None]).squeeze(1)
        best = d.min(1).values
        # fp32 rounding of ||z||^2 + ||e||^2 - 2 z.e, relative to its terms: in any
        # order (FMA or not) each c-term sum is within gamma_c = c u = c eps / 2 of
        # its terms' size, so a computed distance is within ~(c + 1) eps * scale
        # of the exact one.  The kernel's pick beats the best code by its computed
        # distance, so exactly it is at most the two errors, 2 (c + 1), worse.
        scale = z.double().square().sum(1) + codebook.double().square().sum(1).max()
        assert_close_ulps(chosen, best, 2 * (c + 2), dtype=torch.float32, scale=scale)
        assert_mostly_equal(out, vq_nearest_code_reference(z, codebook), 0.99)

    def test_duplicate_codes_pick_lowest_index(self, kernel_device):
        g = torch.Generator().manual_seed(1)
        codebook = torch.randn(64, 32, generator=g)
        codebook[40] = codebook[3]
        codebook[50] = codebook[3]
        z = codebook[[3, 40, 50]] + 0.001 * torch.randn(3, 32, generator=g)
        out = vq_nearest_code(z.to(kernel_device), codebook.to(kernel_device))
        assert out.tolist() == [3, 3, 3]

    def test_nan_row_follows_torch_argmin(self, kernel_device):
        # torch.argmin treats NaN as the minimum: a NaN row maps to code 0.
        z = torch.randn(4, 16)
        z[2, 5] = float("nan")
        codebook = torch.randn(9, 16)
        out = vq_nearest_code(z.to(kernel_device), codebook.to(kernel_device)).cpu()
        assert torch.equal(out, vq_nearest_code_reference(z, codebook))
        assert out[2].item() == 0

    def test_non_contiguous(self, kernel_device):
        z, codebook, _ = separated(200, 300, 32, torch.float32, kernel_device)
        z_t = z.t().contiguous().t()  # same values, column-major
        cb_strided = torch.stack([codebook, torch.zeros_like(codebook)], 1)[:, 0]  # row stride 2C
        assert not z_t.is_contiguous() and not cb_strided.is_contiguous()
        assert torch.equal(vq_nearest_code(z_t, cb_strided), vq_nearest_code_reference(z, codebook))

    def test_empty_rows(self, kernel_device):
        out = vq_nearest_code(torch.empty(0, 32, device=kernel_device),
                              torch.randn(16, 32, device=kernel_device))
        assert out.shape == (0,) and out.dtype == torch.int64

    def test_opcheck(self, kernel_device):
        z, codebook, _ = separated(33, 20, 8, torch.float16, kernel_device)
        torch.library.opcheck(torch.ops.hart_fast.vq_nearest_code.default, (z, codebook))

    @pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.inductor)])
    def test_torch_compile(self, kernel_device, backend):
        z, codebook, _ = separated(100, 50, 32, torch.float32, kernel_device)

        def fn(z, codebook):
            return codebook[vq_nearest_code(z, codebook)]  # quantised z

        compiled = torch.compile(fn, fullgraph=True, backend=backend)
        torch.testing.assert_close(compiled(z, codebook), fn(z, codebook), atol=0, rtol=0)


# Outside TestVQNearestCode: its class-wide kernel_device would run this once per device.
def test_matches_cpu_kernel_bitwise(cuda_kernel_device):
    g = torch.Generator().manual_seed(5)
    for dtype in DTYPES:
        z = torch.randn(5000, 32, generator=g).to(dtype)
        codebook = torch.randn(4096, 32, generator=g).to(dtype)
        assert torch.equal(vq_nearest_code(z.cuda(), codebook.cuda()).cpu(),
                           vq_nearest_code(z, codebook))


class TestVQErrors:
    def test_z_not_2d(self):
        with pytest.raises(ValueError, match=r"z to be a 2-D tensor of shape \(N, C\).*\(2, 3, 4\)"):
            vq_nearest_code(torch.ones(2, 3, 4), torch.ones(5, 4))

    def test_channel_mismatch(self):
        with pytest.raises(ValueError, match=r"same number of channels.*\(2, 4\).*\(5, 3\)"):
            vq_nearest_code(torch.ones(2, 4), torch.ones(5, 3))

    def test_empty_codebook(self):
        with pytest.raises(ValueError, match="non-empty 2-D tensor"):
            vq_nearest_code(torch.ones(2, 4), torch.ones(0, 4))

    def test_int_dtype(self):
        with pytest.raises(TypeError, match="z to have dtype"):
            vq_nearest_code(torch.ones(2, 4, dtype=torch.int32), torch.ones(5, 4, dtype=torch.int32))

    def test_dtype_mismatch(self):
        with pytest.raises(TypeError, match=r"codebook to have the same dtype as z \(float16\)"):
            vq_nearest_code(torch.ones(2, 4, dtype=torch.float16), torch.ones(5, 4))

    def test_device_mismatch(self):
        with pytest.raises(ValueError, match=r"codebook to be on the same device as z \(cpu\)"):
            vq_nearest_code(torch.ones(2, 4), torch.ones(5, 4, device="meta"))

    def test_not_a_tensor(self):
        with pytest.raises(TypeError, match="codebook to be a tensor"):
            vq_nearest_code(torch.ones(2, 4), [[1.0] * 4])

    def test_kernel_checks_without_wrapper(self, requires_extension):
        with pytest.raises(ValueError, match="same number of channels"):
            torch.ops.hart_fast.vq_nearest_code(torch.ones(2, 4), torch.ones(5, 3))
        with pytest.raises(TypeError, match="codebook to have the same dtype as z"):
            torch.ops.hart_fast.vq_nearest_code(torch.ones(2, 4), torch.ones(5, 4, dtype=torch.half))


class TestVQFallback:
    def test_wrapper_uses_reference(self, monkeypatch):
        import hart_fast.ops.vq as vq_module

        calls = []

        def spy(*a, **kw):
            calls.append(1)
            return vq_nearest_code_reference(*a, **kw)

        monkeypatch.setattr(ops, "HAS_EXTENSION", False)
        monkeypatch.setattr(vq_module, "vq_nearest_code_reference", spy)
        z, codebook, planted = separated(50, 40, 32, torch.bfloat16, "cpu")
        out = vq_nearest_code(z, codebook)
        assert calls == [1]
        assert torch.equal(out, planted)

    def test_reference_is_hart_formula(self):
        z, codebook, _ = separated(20, 30, 32, torch.float32, "cpu")
        d = (z[:, None, :] - codebook[None]).square().sum(-1)
        assert torch.equal(vq_nearest_code_reference(z, codebook), d.argmin(1))
