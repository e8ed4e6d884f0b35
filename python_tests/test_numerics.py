"""The suite's comparison rules (numerics.py) accept and reject what they say."""

from __future__ import annotations

import pytest
import torch

from numerics import (
    assert_close_ulps,
    assert_mostly_close,
    assert_mostly_equal,
    assert_within_2x_error,
    ulp,
    ulps_between,
)

EPS32 = torch.finfo(torch.float32).eps


def test_ulp_is_eps_times_magnitude_with_a_floor():
    x = torch.tensor([0.0, 1.0, -3.0, 1e-40])
    tiny = torch.finfo(torch.float32).tiny
    assert torch.equal(ulp(x, torch.float32), torch.tensor([EPS32 * tiny, EPS32, 3 * EPS32, EPS32 * tiny],
                                                           dtype=torch.float64))
    assert ulp(torch.tensor(1.0), torch.bfloat16).item() == 2.0 ** -7


@pytest.mark.parametrize("magnitude", [1e-3, 1.0, 1e4])
def test_close_ulps_scales_with_the_values(magnitude):
    # The same relative perturbation passes or fails the same way at every magnitude.
    e = torch.linspace(0.5, 1.0, 101) * magnitude
    assert_close_ulps(e * (1 + 3 * EPS32), e, 4)
    with pytest.raises(AssertionError, match=r"ulp\(s\) of torch.float32"):
        assert_close_ulps(e * (1 + 8 * EPS32), e, 4)


def test_close_ulps_exact_zeros_and_non_finite():
    assert_close_ulps(torch.zeros(3), torch.zeros(3), 0)
    nan, inf = float("nan"), float("inf")
    assert_close_ulps(torch.tensor([nan, inf, -inf, 1.0]), torch.tensor([nan, inf, -inf, 1.0]), 1)
    with pytest.raises(AssertionError):
        assert_close_ulps(torch.tensor([inf]), torch.tensor([-inf]), 1)
    with pytest.raises(AssertionError):
        assert_close_ulps(torch.tensor([nan]), torch.tensor([1.0]), 1e9)
    with pytest.raises(AssertionError, match="shape"):
        assert_close_ulps(torch.zeros(2, 1), torch.zeros(2), 1)


def test_close_ulps_scale_for_cancelling_sums():
    # A sum of O(1) terms that lands near zero carries their rounding, not its own.
    f32 = dict(dtype=torch.float32)  # float64 data, so that the perturbation is exact
    expected = torch.tensor([4.0, 1e-7, -2.0], dtype=torch.float64)
    actual = expected + torch.tensor([0.0, 4 * EPS32, 0.0], dtype=torch.float64)
    with pytest.raises(AssertionError):
        assert_close_ulps(actual, expected, 4, **f32)  # elementwise: 4 eps is huge next to 1e-7
    assert_close_ulps(actual, expected, 1, scale="max", **f32)  # 4 eps = 1 ulp of max|expected|
    with pytest.raises(AssertionError):
        assert_close_ulps(actual, expected, 0.9, scale="max", **f32)
    assert_close_ulps(actual, expected, 4, scale=1.0, **f32)
    assert_close_ulps(actual, expected, 1, scale=torch.tensor([1.0, 4.0, 1.0]), **f32)


def test_close_ulps_dtype_defaults_to_the_coarser_one():
    e = torch.ones(4)
    a = (e + 3 * 2.0 ** -10).half()  # 3 fp16 ulps above 1
    assert_close_ulps(a, e, 3)  # fp16 ulps: the coarser dtype
    with pytest.raises(AssertionError, match="float32"):
        assert_close_ulps(a, e, 3, dtype=torch.float32)
    assert ulps_between(a, e).max().item() == pytest.approx(3.0)


def test_close_ulps_failure_message_names_the_worst_element():
    e = torch.ones(2, 3)
    a = e.clone()
    a[1, 2] += 100 * EPS32
    a[0, 0] += 10 * EPS32
    with pytest.raises(AssertionError) as info:
        assert_close_ulps(a, e, 4, msg="stage 3")
    text = str(info.value)
    assert text.startswith("stage 3: 2 of 6 elements") and "(1, 2)" in text and "100 ulps" in text


def test_within_2x_error():
    truth = torch.linspace(-3, 3, 1000, dtype=torch.float64)
    reference = truth.to(torch.bfloat16)  # within half an ulp of the truth
    assert_within_2x_error(truth.to(torch.bfloat16), reference, truth)
    # Twice the reference's error plus one bf16 ulp of max|truth| passes; more fails.
    ref_err = (reference.double() - truth).abs().max().item()
    slack = 2.0 ** -7 * 3
    ok = truth + 2 * ref_err + 0.9 * slack
    bad = truth + 2 * ref_err + 1.1 * slack
    assert_within_2x_error(ok, reference, truth)
    with pytest.raises(AssertionError, match=r"kernel error .* > 2 x reference error"):
        assert_within_2x_error(bad, reference, truth)
    # The slack in fp32 ulps, or none at all.
    with pytest.raises(AssertionError):
        assert_within_2x_error(ok, reference, truth, ulps=1, ulp_dtype=torch.float32)
    with pytest.raises(AssertionError):
        assert_within_2x_error(truth + 2.01 * ref_err, reference, truth, ulps=0)
    err, r = assert_within_2x_error(reference, reference, truth)
    assert err == r == ref_err
    with pytest.raises(AssertionError):
        assert_within_2x_error(torch.full_like(truth, float("nan")), reference, truth)


def test_mostly_close():
    e = torch.zeros(1000)
    a = e.clone()
    a[:9] = 1e-2  # 0.9% of the elements off by more than tight, all below the cap
    assert_mostly_close(a, e, tight=1e-4, cap=2e-2)
    a[9] = 1e-2  # 1.0% off: still >= 99% within
    assert_mostly_close(a, e, tight=1e-4, cap=2e-2)
    a[10] = 1e-2
    with pytest.raises(AssertionError, match="only 0.9890 of elements within"):
        assert_mostly_close(a, e, tight=1e-4, cap=2e-2)
    a = e.clone()
    a[0] = 3e-2
    with pytest.raises(AssertionError, match="above the cap"):
        assert_mostly_close(a, e, tight=1e-4, cap=2e-2)
    # Relative to the values' size on request.
    big = torch.full((100,), 1e3)
    assert_mostly_close(big + 1e-2, big, tight=1e-4, cap=2e-2, scale="max")
    with pytest.raises(AssertionError):
        assert_mostly_close(big + 1e-2, big, tight=1e-4, cap=2e-2)


def test_mostly_equal():
    e = torch.arange(100.0)
    a = e.clone()
    a[0] += 1
    assert assert_mostly_equal(a, e, 0.99) == 0.99
    with pytest.raises(AssertionError, match="only 0.9900 of 100 elements bitwise equal"):
        assert_mostly_equal(a, e, 0.995)
    with pytest.raises(AssertionError, match="dtype"):
        assert_mostly_equal(a.half(), e, 0.5)
