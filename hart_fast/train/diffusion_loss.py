"""The residual-diffusion MLP's training loss: IDDPM with a learned-range variance.

What the official DiffLoss trains with (MAR's, on improved-DDPM): the cosine
schedule over 1000 steps, the target divided by the VAE scale 0.6, and the
"hybrid" objective -- MSE on the predicted noise plus the variational bound on
the learned variance with the predicted mean frozen (its gradient goes only into
the variance half of the output). The sampler in hart_fast.model.diffusion is
the inference side of the same schedule.
"""

from __future__ import annotations

import math
from typing import Dict

import numpy as np
import torch

from hart_fast.model.diffusion import VAE_SCALE, SimpleMLPAdaLN, cosine_betas


class DiffusionTrainingSchedule:
    """The unrespaced 1000-step cosine schedule as float32 tables."""

    def __init__(self, num_steps: int = 1000):
        betas = cosine_betas(num_steps)
        ac = np.cumprod(1.0 - betas)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        self.num_steps = num_steps
        t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
        self.sqrt_ac = t(np.sqrt(ac))
        self.sqrt_1m_ac = t(np.sqrt(1.0 - ac))
        self.sqrt_recip_ac = t(np.sqrt(1.0 / ac))
        self.sqrt_recipm1_ac = t(np.sqrt(1.0 / ac - 1))
        self.coef1 = t(betas * np.sqrt(ac_prev) / (1.0 - ac))
        self.coef2 = t((1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac))
        self.post_logvar = t(np.log(np.append(post_var[1], post_var[1:])))
        self.log_betas = t(np.log(betas))


def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _std_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_nll(x, mean, log_scale):
    """-log p(x) under a Gaussian discretised to 255 bins on [-1, 1] (IDDPM's decoder term)."""
    centered = x - mean
    inv_stdv = torch.exp(-log_scale)
    cdf_plus = _std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_1m_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    log_probs = torch.where(x < -0.999, log_cdf_plus,
                            torch.where(x > 0.999, log_1m_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))))
    return -log_probs


def _noised(target_NC: torch.Tensor, sched: DiffusionTrainingSchedule, generator):
    """(x0, t, noise, x_t, table lookup) of one draw for N residual targets."""
    N, _ = target_NC.shape
    dev = target_NC.device
    x0 = target_NC.float() / VAE_SCALE
    t = torch.randint(0, sched.num_steps, (N,), device=dev, generator=generator)
    noise = torch.randn(x0.shape, device=dev, generator=generator)
    g = lambda tab: tab.to(dev)[t].unsqueeze(1)  # noqa: E731
    x_t = g(sched.sqrt_ac) * x0 + g(sched.sqrt_1m_ac) * noise
    return x0, t, noise, x_t, g


def _hybrid_terms(eps, var_v, x0, t, noise, x_t, g, sched) -> torch.Tensor:
    """Per-row IDDPM hybrid loss: MSE on the noise + the variance's variational bound."""
    mse = (noise - eps).pow(2).mean(1)
    # Variational bound on the variance only: the mean comes from the detached eps.
    min_log, max_log = g(sched.post_logvar), g(sched.log_betas)
    frac = (var_v + 1) / 2
    model_logvar = frac * max_log + (1 - frac) * min_log
    pred_x0 = g(sched.sqrt_recip_ac) * x_t - g(sched.sqrt_recipm1_ac) * eps.detach()
    model_mean = g(sched.coef1) * pred_x0 + g(sched.coef2) * x_t
    true_mean = g(sched.coef1) * x0 + g(sched.coef2) * x_t
    kl = normal_kl(true_mean, min_log, model_mean, model_logvar).mean(1) / math.log(2.0)
    nll = discretized_gaussian_nll(x0, model_mean, 0.5 * model_logvar).mean(1) / math.log(2.0)
    return mse + torch.where(t == 0, nll, kl)


def diffusion_loss(net: SimpleMLPAdaLN, target_NC: torch.Tensor, z_NZ: torch.Tensor,
                   sched: DiffusionTrainingSchedule, generator=None) -> torch.Tensor:
    """Mean hybrid loss over N tokens; target_NC is the residual (before the 0.6 scaling)."""
    C = target_NC.shape[1]
    x0, t, noise, x_t, g = _noised(target_NC, sched, generator)
    out = net(x_t.to(net.input_proj.weight.dtype), t, z_NZ).float()
    return _hybrid_terms(out[:, :C], out[:, C:], x0, t, noise, x_t, g, sched).mean()


def guided_diffusion_loss(net: SimpleMLPAdaLN, target_NC: torch.Tensor, z_cond_NZ: torch.Tensor,
                          z_uncond_NZ: torch.Tensor, sched: DiffusionTrainingSchedule, guidance_N: torch.Tensor,
                          guided_weight: float = 1.0, generator=None) -> Dict[str, torch.Tensor]:
    """The hybrid loss under both conditions of a token plus the loss of the guided noise.

    Inference guides the MLP with the stage's scale w: eps_g = (1 + w) eps_cond - w
    eps_uncond (the official sampler). Trained on each condition alone, the two
    predictions err independently, and the guidance multiplies their difference
    by w: the drawn residual comes out larger than any true one (BENCHMARKS.md,
    "The residual under guidance"). So both conditions see the same noised target,
    and eps_g, with each token's guidance scale w (guidance_N, (N,)), must predict
    the noise too -- which holds when the two agree wherever the condition does not
    matter. guided_weight weighs that last term against the two hybrid losses.
    """
    N, C = target_NC.shape
    x0, t, noise, x_t, g = _noised(target_NC, sched, generator)
    dt = net.input_proj.weight.dtype
    out = net(torch.cat([x_t, x_t]).to(dt), torch.cat([t, t]), torch.cat([z_cond_NZ, z_uncond_NZ])).float()
    eps_c, eps_u = out[:N, :C], out[N:, :C]
    hyb_c = _hybrid_terms(eps_c, out[:N, C:], x0, t, noise, x_t, g, sched)
    hyb_u = _hybrid_terms(eps_u, out[N:, C:], x0, t, noise, x_t, g, sched)
    w = guidance_N.to(x0.device, torch.float32).reshape(N, 1)
    eps_g = (1 + w) * eps_c - w * eps_u
    mse_g = (noise - eps_g).pow(2).mean(1)
    loss = (hyb_c + hyb_u + guided_weight * mse_g).mean()
    with torch.no_grad():
        gap = (eps_c - eps_u).pow(2).mean().sqrt()
    return {"loss": loss, "diff_cond": hyb_c.mean().detach(), "diff_uncond": hyb_u.mean().detach(),
            "mse_guided": mse_g.mean().detach(), "eps_gap": gap}


__all__ = ["DiffusionTrainingSchedule", "diffusion_loss", "guided_diffusion_loss", "normal_kl",
           "discretized_gaussian_nll"]
