"""Fused IDDPM update of HART's residual-diffusion sampler.

``iddpm_step_fused`` does, in one elementwise pass over (N, C), what the
reference sampler (hart_fast/model/diffusion.py: sample_residual + iddpm_step)
does with ~20 separate tensor ops after each MLP call: split the MLP output
into eps / variance values, combine the CFG halves, and take one p_sample
step.  Every product and sum is rounded to fp32 in the reference's order.

The one operation that is not bit-reproducible across devices is exp: torch's
CPU kernel uses a vectorised (SLEEF, <= 1 ulp) exp, CUDA's expf is <= 2 ulp,
and our CPU kernel uses the C library's expf.  The sampled noise term
``exp(0.5 * log_var) * noise * temperature`` can therefore differ by ~2 ulp of
itself; everything else matches bit for bit.
"""

from __future__ import annotations

import torch

from hart_fast.ops._checks import check_float_dtype, check_same_device, check_tensor, use_compiled


def iddpm_step_fused_reference(
    x: torch.Tensor,  # (N, C) float32
    model_out: torch.Tensor,  # (2N, 2C) guided / (N, 2C): [eps | var values], float32
    noise: torch.Tensor,  # (N, C) float32
    cfg: float, guided: bool,
    c_recip: float, c_recipm1: float, c_coef1: float, c_coef2: float,
    min_log: float, max_log: float, nonzero: float, temperature: float,
) -> torch.Tensor:  # (N, C) float32
    N, C = x.shape
    eps, var_values = model_out[:, :C], model_out[:, C:]
    if guided:
        eps = eps[:N] * (1 + cfg) - cfg * eps[N:]  # (N, C)
        var_values = var_values[:N]
    frac = (var_values + 1) / 2
    log_var = frac * max_log + (1 - frac) * min_log
    x0 = (c_recip * x - c_recipm1 * eps).clamp(-1, 1)
    mean = c_coef1 * x0 + c_coef2 * x
    return mean + nonzero * torch.exp(0.5 * log_var) * noise * temperature


def schedule_scalars(sched, s: int) -> dict:
    """The float32-rounded schedule coefficients of respaced step s, by keyword."""
    c = sched.coef
    return dict(
        c_recip=c("sqrt_recip_alphas_cumprod", s),
        c_recipm1=c("sqrt_recipm1_alphas_cumprod", s),
        c_coef1=c("posterior_mean_coef1", s),
        c_coef2=c("posterior_mean_coef2", s),
        min_log=c("posterior_log_variance_clipped", s),
        max_log=c("log_betas", s),
        nonzero=1.0 if s != 0 else 0.0,
    )


def iddpm_step_fused(x, model_out, noise, cfg: float, guided: bool, c_recip: float,
                     c_recipm1: float, c_coef1: float, c_coef2: float, min_log: float,
                     max_log: float, nonzero: float, temperature: float) -> torch.Tensor:
    """One p_sample step from the raw MLP output; returns the new x (N, C) float32."""
    op = "iddpm_step_fused"
    for name, t in (("x", x), ("model_out", model_out), ("noise", noise)):
        check_tensor(op, name, t)
        check_float_dtype(op, name, t, (torch.float32,))
    check_same_device(op, "model_out", model_out, x, "x")
    check_same_device(op, "noise", noise, x, "x")
    if x.dim() != 2:
        raise ValueError(f"{op}: expected x to be 2-D (N, C), but got shape {tuple(x.shape)}.")
    N, C = x.shape
    rows = 2 * N if guided else N
    if tuple(model_out.shape) != (rows, 2 * C):
        raise ValueError(
            f"{op}: expected model_out with shape ({rows}, {2 * C}) for x {tuple(x.shape)} "
            f"({'guided' if guided else 'unguided'}), but got {tuple(model_out.shape)}."
        )
    if noise.shape != x.shape:
        raise ValueError(f"{op}: expected noise with x's shape {tuple(x.shape)}, but got "
                         f"{tuple(noise.shape)}.")
    args = (float(cfg), bool(guided), float(c_recip), float(c_recipm1), float(c_coef1),
            float(c_coef2), float(min_log), float(max_log), float(nonzero), float(temperature))
    if not use_compiled(x):
        return iddpm_step_fused_reference(x, model_out, noise, *args)
    return torch.ops.hart_fast.iddpm_step_fused(x, model_out, noise, *args)


__all__ = ["iddpm_step_fused", "iddpm_step_fused_reference", "schedule_scalars"]
