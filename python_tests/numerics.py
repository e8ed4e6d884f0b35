"""The test suite's numerical comparison rules, in one place.

Every bound here scales with the data, so a test means the same on every
machine whatever the magnitudes it happens to draw:

* `assert_close_ulps`: closeness in units in the last place (ulps) of a dtype,
  relative to the magnitude of each expected element, or to a larger magnitude
  (`scale`) where the compared value is a sum whose terms can cancel.
* `assert_within_2x_error`: the flash-attention rule for fp16 / bf16 kernels:
  the kernel's error against a higher-precision truth is at most twice the error
  of the reference implementation evaluated in the same low precision (plus a
  small slack in ulps of the truth's magnitude).
* `assert_mostly_close`: the two-level check of the residual diffusion: almost
  every element within a tight bound and every element within a loose cap (see
  test_conformance.py and shared/reference/README.md, "Why the residual gets a
  looser, two-level check").
* `assert_mostly_equal`: at least a fraction of the elements bitwise equal (for
  kernels that round where the reference rounds, up to rare ties).

Definitions. For a floating dtype with machine epsilon `eps` (the spacing of
the dtype just above 1.0) and smallest normal number `tiny`, one ulp of a
magnitude m is `eps * max(m, tiny)`: between one and two true spacings of the
dtype at m, and at least the subnormal spacing, so exact zeros compare sanely.
All arithmetic of the checks runs in float64 on the CPU.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

Scale = Union[None, str, float, torch.Tensor]

__all__ = [
    "ulp",
    "ulps_between",
    "assert_close_ulps",
    "assert_within_2x_error",
    "assert_mostly_close",
    "assert_mostly_equal",
]


def _f64(t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t)
    return t.detach().to(device="cpu", dtype=torch.float64)


def _eps_and_tiny(dtype: torch.dtype) -> Tuple[float, float]:
    info = torch.finfo(dtype)
    return float(info.eps), float(info.tiny)


def _coarsest(*dtypes: torch.dtype) -> torch.dtype:
    """The floating dtype with the largest eps among `dtypes` (non-floating ones ignored)."""
    floats = [d for d in dtypes if d.is_floating_point]
    if not floats:
        return torch.float32
    return max(floats, key=lambda d: torch.finfo(d).eps)


def _magnitude(expected64: torch.Tensor, scale: Scale) -> torch.Tensor:
    """The magnitude each element's ulp is taken of: |expected|, raised to `scale`."""
    mag = expected64.abs()
    if scale is None:
        return mag
    if isinstance(scale, str):
        if scale != "max":
            raise ValueError(f"scale must be None, 'max', a number or a tensor, got {scale!r}")
        finite = mag[torch.isfinite(mag)]
        top = finite.max() if finite.numel() else torch.zeros((), dtype=torch.float64)
        return torch.maximum(mag, top)
    return torch.maximum(mag, _f64(scale))


def ulp(x, dtype: torch.dtype) -> torch.Tensor:
    """One ulp of `dtype` at the magnitude of each element of x: eps * max(|x|, tiny), float64."""
    eps, tiny = _eps_and_tiny(dtype)
    return eps * _f64(x).abs().clamp_min(tiny)


def ulps_between(actual, expected, dtype: Optional[torch.dtype] = None, scale: Scale = None) -> torch.Tensor:
    """|actual - expected| in ulps of `dtype` at the magnitude of expected (see `assert_close_ulps`)."""
    a, e = _f64(actual), _f64(expected)
    if dtype is None:
        dtype = _coarsest(_dtype_of(actual), _dtype_of(expected))
    eps, tiny = _eps_and_tiny(dtype)
    return (a - e).abs() / (eps * _magnitude(e, scale).clamp_min(tiny))


def _dtype_of(t) -> torch.dtype:
    return t.dtype if isinstance(t, torch.Tensor) else torch.float64


def _prefix(msg: Optional[str]) -> str:
    return f"{msg}: " if msg else ""


def _check_shapes(a: torch.Tensor, e: torch.Tensor, what: str, msg: Optional[str]) -> None:
    assert a.shape == e.shape, f"{_prefix(msg)}{what} shape {tuple(a.shape)} != expected {tuple(e.shape)}"


def _index(flat_index: int, shape) -> tuple:
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_index), tuple(shape))) if len(shape) else ()


def assert_close_ulps(actual, expected, ulps: float, *, dtype: Optional[torch.dtype] = None,
                      scale: Scale = None, msg: Optional[str] = None) -> None:
    """Every |actual - expected| <= ulps * eps(dtype) * max(magnitude, tiny(dtype)).

    dtype: whose eps and smallest normal to use; default the coarsest floating
        dtype of actual and expected (e.g. float16 when a float16 output is held
        to a float32 reference, float32 for two float32 tensors).
    scale: the magnitude the ulps are taken of.  None: |expected| elementwise,
        for results computed with a few roundings of themselves (products,
        quotients, exp, a sum of same-sign terms).  "max": the largest finite
        |expected| of the tensor, and a number or a broadcastable tensor: at
        least that magnitude; use these where a result is a sum whose terms can
        cancel, so its rounding error is set by the size of the terms, not of
        the (possibly tiny) result.
    Non-finite expected elements must be matched exactly (NaN by NaN, inf by the
    same inf).  Shapes must be equal (no broadcasting).
    """
    e = _f64(expected)
    a = _f64(actual)
    _check_shapes(a, e, "actual", msg)
    if dtype is None:
        dtype = _coarsest(_dtype_of(actual), _dtype_of(expected))
    eps, tiny = _eps_and_tiny(dtype)
    unit = eps * _magnitude(e, scale).clamp_min(tiny)
    err = (a - e).abs()
    finite = torch.isfinite(e)
    ok = torch.where(finite, err <= ulps * unit, (a == e) | (torch.isnan(a) & torch.isnan(e)))
    if bool(ok.all()):
        return
    bad = ~ok
    dist = torch.where(finite, err / unit, torch.full_like(err, float("inf")))
    dist = torch.where(torch.isnan(dist), torch.full_like(dist, float("inf")), dist)
    worst = int(torch.argmax(torch.where(bad, dist, torch.full_like(dist, -1.0))).item())
    idx = _index(worst, e.shape)
    flat_a, flat_e, flat_u = a.reshape(-1), e.reshape(-1), unit.reshape(-1)
    where = "elementwise |expected|" if scale is None else f"scale={scale if isinstance(scale, str) else 'given'}"
    raise AssertionError(
        f"{_prefix(msg)}{int(bad.sum())} of {e.numel()} elements differ by more than {ulps} ulp(s) of {dtype} "
        f"({where}); worst at {idx}: actual {flat_a[worst].item():.9g}, expected {flat_e[worst].item():.9g}, "
        f"|diff| {abs(flat_a[worst].item() - flat_e[worst].item()):.3g} = {dist.reshape(-1)[worst].item():.3g} ulps "
        f"of magnitude {flat_u[worst].item() / eps:.3g} (1 ulp = {flat_u[worst].item():.3g})"
    )


def assert_within_2x_error(actual, reference, truth, *, ulps: float = 1, ulp_dtype: Optional[torch.dtype] = None,
                           msg: Optional[str] = None) -> Tuple[float, float]:
    """The low-precision rule: max|actual - truth| <= 2 * max|reference - truth| + slack.

    actual: the kernel's low-precision (fp16 / bf16) result.
    reference: the reference implementation evaluated in that same low precision.
    truth: the reference evaluated in a higher precision (fp32-upcast or fp64 inputs).
    slack = ulps * eps(ulp_dtype) * max|truth|: room for a kernel that, where the
        reference happens to be (nearly) exact, rounds a tie the other way or sums
        in another order.  ulp_dtype defaults to reference's dtype (one ulp of the
        output's own precision); pass torch.float32 for a slack at the level of
        the fp32 accumulation instead; ulps=0 for the bare 2x rule.
    Errors are taken in the max norm over all elements, as flash-attention does.
    Returns (kernel error, reference error).
    """
    a, r, t = _f64(actual), _f64(reference), _f64(truth)
    _check_shapes(a, t, "actual", msg)
    _check_shapes(r, t, "reference", msg)
    if ulp_dtype is None:
        ulp_dtype = _dtype_of(reference)
    eps, _ = _eps_and_tiny(ulp_dtype)
    if t.numel() == 0:
        return 0.0, 0.0
    assert bool(torch.isfinite(t).all()), f"{_prefix(msg)}the truth has non-finite elements"
    diff = (a - t).abs()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    err = diff.max().item()
    ref_err = (r - t).abs().max().item()
    slack = ulps * eps * t.abs().max().item()
    bound = 2 * ref_err + slack
    if not err <= bound:
        worst = int(torch.argmax(diff).item())
        idx = _index(worst, t.shape)
        raise AssertionError(
            f"{_prefix(msg)}kernel error {err:.4g} > 2 x reference error {ref_err:.4g} + slack {slack:.3g} "
            f"({ulps} ulp(s) of {ulp_dtype} at max|truth| {t.abs().max().item():.3g}); ratio "
            f"{err / ref_err if ref_err else float('inf'):.3g}; worst at {idx}: actual "
            f"{a.reshape(-1)[worst].item():.6g}, truth {t.reshape(-1)[worst].item():.6g}, reference "
            f"{r.reshape(-1)[worst].item():.6g}"
        )
    return err, ref_err


def assert_mostly_close(actual, expected, *, tight: float, cap: float, fraction: float = 0.99,
                        scale: Union[str, float] = 1.0, msg: Optional[str] = None) -> None:
    """At least `fraction` of the elements within tight * s of expected, and all within cap * s.

    s = scale: 1.0 (the bounds are absolute) suits a value whose error has a
    fixed scale of its own, such as the residual diffusion's output: its rare
    large errors are float32 rounding of the MLP's O(1) noise prediction
    amplified by 1/sqrt(alphabar) ~ 2e4 before the x0 clip to [-1, 1], whatever
    the magnitude of the latent the residual is then added to.  scale="max"
    takes s = max|expected| (at least the smallest normal float32), for values
    whose errors grow with them.
    """
    a, e = _f64(actual), _f64(expected)
    _check_shapes(a, e, "actual", msg)
    if isinstance(scale, str):
        if scale != "max":
            raise ValueError(f"scale must be a number or 'max', got {scale!r}")
        s = max(e.abs().max().item() if e.numel() else 0.0, torch.finfo(torch.float32).tiny)
    else:
        s = float(scale)
    if e.numel() == 0:
        return
    err = (a - e).abs()
    err = torch.where(torch.isnan(err), torch.full_like(err, float("inf")), err)
    within = (err <= tight * s).double().mean().item()
    worst = err.max().item()
    where = _index(int(torch.argmax(err).item()), e.shape)
    assert within >= fraction, (
        f"{_prefix(msg)}only {within:.4f} of elements within {tight * s:.3g} (tight {tight} x scale {s:.3g}); "
        f"needed {fraction}; max err {worst:.3g} at {where}"
    )
    assert worst <= cap * s, (
        f"{_prefix(msg)}max error {worst:.3g} at {where} above the cap {cap * s:.3g} (cap {cap} x scale {s:.3g})"
    )


def assert_mostly_equal(actual, expected, fraction: float, *, msg: Optional[str] = None) -> float:
    """At least `fraction` of the elements bitwise equal (same dtype and shape); returns the fraction."""
    assert isinstance(actual, torch.Tensor) and isinstance(expected, torch.Tensor)
    assert actual.dtype == expected.dtype, f"{_prefix(msg)}dtype {actual.dtype} != expected {expected.dtype}"
    _check_shapes(actual, expected, "actual", msg)
    if expected.numel() == 0:
        return 1.0
    same = (actual.cpu() == expected.cpu()).double().mean().item()
    assert same >= fraction, (
        f"{_prefix(msg)}only {same:.4f} of {expected.numel()} elements bitwise equal to the {expected.dtype} "
        f"reference (needed {fraction})"
    )
    return same
