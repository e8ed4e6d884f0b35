"""The residual-diffusion head: MAR's SimpleMLPAdaLN and the respaced IDDPM sampler.

Reference form: plain PyTorch, float32-faithful to the official sampler. The
schedule is built in float64 numpy and each coefficient is rounded to float32 when
used, exactly as the official `_extract_into_tensor` does, so a float32 run
reproduces the official numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

VAE_SCALE = 0.6  # the diffusion models target / 0.6; samples are multiplied back


def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: (N,) -> (N, dim) float32."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half
    ).to(device=t.device)
    args_NH = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args_NH), torch.sin(args_NH)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """sinusoid(256) -> Linear -> SiLU -> Linear. Used by the MLP and as HART's level embedding."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t_N: torch.Tensor) -> torch.Tensor:
        t_freq = timestep_embedding(t_N, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


def ln_modulate(ln: nn.LayerNorm, x: torch.Tensor, shift, scale) -> torch.Tensor:
    """modulate(ln(x), shift, scale) rounded where the official sampler rounds.

    The official code runs this MLP under autocast, where layer_norm is a float32
    op (float32 affine weights): the LayerNorm output is float32, the modulation
    promotes to float32 (only `1 + scale` rounds, to scale's dtype) and the
    result rounds once to x's dtype at the next Linear.  In float32 this is
    plain modulate(ln(x), shift, scale).
    """
    w = None if ln.weight is None else ln.weight.float()
    b = None if ln.bias is None else ln.bias.float()
    y = torch.nn.functional.layer_norm(x.float(), ln.normalized_shape, w, b, ln.eps)
    return modulate(y, shift, scale).to(x.dtype)


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels))

    def forward(self, x_NW, y_NW):
        shift, scale, gate = self.adaLN_modulation(y_NW).chunk(3, dim=-1)
        h = self.mlp(ln_modulate(self.in_ln, x_NW, shift, scale))
        return x_NW + gate * h


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x_NW, y_NW):
        shift, scale = self.adaLN_modulation(y_NW).chunk(2, dim=-1)
        return self.linear(ln_modulate(self.norm_final, x_NW, shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """Per-token MLP denoiser: (x_t (N, Cvae), t (N,), z (N, Cz)) -> (eps, var) (N, 2*Cvae)."""

    def __init__(self, in_channels: int, width: int, z_channels: int, depth: int):
        super().__init__()
        self.in_channels = in_channels
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(z_channels, width)
        self.input_proj = nn.Linear(in_channels, width)
        self.res_blocks = nn.ModuleList([ResBlock(width) for _ in range(depth)])
        self.final_layer = FinalLayer(width, 2 * in_channels)

    def forward(self, x_NC, t_N, z_NZ):
        x = self.input_proj(x_NC)
        y = self.time_embed(t_N) + self.cond_embed(z_NZ)
        for block in self.res_blocks:
            x = block(x, y)
        return self.final_layer(x, y)


# ----------------------------------------------------------------------------
# The IDDPM schedule (cosine, 1000 steps, respaced) and sampler.
# ----------------------------------------------------------------------------


def cosine_betas(num_steps: int = 1000, max_beta: float = 0.999) -> np.ndarray:
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array(
        [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    )


def space_timesteps(num_timesteps: int, section_counts) -> set:
    """Which original timesteps a respaced sampler keeps ("8", "4,4", "ddim25")."""
    if isinstance(section_counts, int):
        section_counts = str(section_counts)
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride")
        try:
            section_counts = [int(x) for x in section_counts.split(",")]
        except ValueError as e:
            raise ValueError(f"expected comma-separated integers, got {section_counts!r}") from e
    if not section_counts or any(c <= 0 for c in section_counts):
        raise ValueError(f"section counts must be positive, got {section_counts!r}")
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return set(steps)


@dataclass
class RespacedSchedule:
    """Per respaced step s (s = 0 is the last, noise-free step) the float64 coefficients."""

    timestep_map: List[int]          # respaced index -> original timestep the model sees
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    log_betas: np.ndarray

    @property
    def num_steps(self) -> int:
        return len(self.timestep_map)

    @classmethod
    def build(cls, section_counts, num_train_steps: int = 1000) -> "RespacedSchedule":
        base_betas = cosine_betas(num_train_steps)
        alphas_cumprod = np.cumprod(1.0 - base_betas, axis=0)
        keep = space_timesteps(num_train_steps, section_counts)
        last, betas, tmap = 1.0, [], []
        for i, ac in enumerate(alphas_cumprod):
            if i in keep:
                betas.append(1 - ac / last)
                last = ac
                tmap.append(i)
        betas = np.array(betas, dtype=np.float64)
        ac = np.cumprod(1.0 - betas, axis=0)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        post_logvar = (
            np.log(np.append(post_var[1], post_var[1:])) if len(post_var) > 1 else np.array([])
        )
        return cls(
            timestep_map=tmap,
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1),
            posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
            posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac),
            posterior_log_variance_clipped=post_logvar,
            log_betas=np.log(betas),
        )

    def coef(self, name: str, s: int) -> float:
        """Coefficient `name` at respaced step s, rounded to float32 like the official code."""
        return float(np.float32(getattr(self, name)[s]))


def iddpm_step(x, eps, var_values, sched: RespacedSchedule, s: int, noise, temperature: float):
    """One p_sample update (learned-range variance, x0 clipped to [-1, 1]).

    x, eps, var_values, noise: (N, C). Returns x_{s-1}. The association of every
    product follows the official code so float32 results agree bit for bit.
    """
    c = sched.coef
    min_log = c("posterior_log_variance_clipped", s)
    max_log = c("log_betas", s)
    frac = (var_values + 1) / 2
    log_var = frac * max_log + (1 - frac) * min_log
    x0 = (c("sqrt_recip_alphas_cumprod", s) * x - c("sqrt_recipm1_alphas_cumprod", s) * eps).clamp(-1, 1)
    mean = c("posterior_mean_coef1", s) * x0 + c("posterior_mean_coef2", s) * x
    nonzero = 1.0 if s != 0 else 0.0
    return mean + nonzero * torch.exp(0.5 * log_var) * noise * temperature


NoiseFn = Callable[[Sequence[int]], torch.Tensor]


def gaussian_noise_fn(device) -> NoiseFn:
    """The default noise_fn: fresh float32 standard normal draws on `device`."""
    return lambda shape: torch.randn(*shape, device=device, dtype=torch.float32)


def initial_noise(N: int, C: int, guided: bool, x_init_NC: Optional[torch.Tensor], noise_fn: NoiseFn,
                  device) -> torch.Tensor:
    """The sampler's starting x (N, C) float32, drawn as the official code draws it.

    Guided: one (N, C) draw (the official code duplicates it for the other half);
    unguided: a (2N, C) draw of which the first N rows are used; x_init_NC, when
    given, replaces the draw (nothing is drawn). Shared by the reference and the
    fast sampler so both consume the noise stream identically.
    """
    if x_init_NC is not None:
        x = x_init_NC
    elif guided:
        x = noise_fn((N, C))
    else:
        x = noise_fn((2 * N, C))[:N]
    return x.to(device=device, dtype=torch.float32)


def sample_residual(
    net: SimpleMLPAdaLN,
    z_2NZ: torch.Tensor,
    cfg: float,
    sched: RespacedSchedule,
    temperature: float = 1.0,
    x_init_NC: Optional[torch.Tensor] = None,
    noise_fn: Optional[NoiseFn] = None,
) -> torch.Tensor:
    """Residual tokens for the conditional half: (N, Cvae), already scaled by 0.6.

    z_2NZ holds the conditions, conditional rows first then unconditional (2N rows).
    The official sampler keeps a doubled x of which only the first half ever
    reaches the MLP (it is duplicated before every call), so the conditional
    half alone determines the result; this computes just that half.

    noise_fn(shape) supplies Gaussian draws in the official order and shapes
    (initial x: (N, C) when guided, (2N, C) when cfg == 1; every step: (2N, C)),
    so a seeded generator gives the official stream. x_init_NC, when given,
    replaces the initial draw (nothing is drawn for it).
    """
    N2, _ = z_2NZ.shape
    N = N2 // 2
    C = net.in_channels
    guided = not cfg == 1.0
    dev, dt = z_2NZ.device, net.input_proj.weight.dtype
    noise_fn = noise_fn or gaussian_noise_fn(dev)
    # x and the update stay in float32 whatever the MLP's dtype.
    x = initial_noise(N, C, guided, x_init_NC, noise_fn, dev)
    for s in reversed(range(sched.num_steps)):
        t_orig = sched.timestep_map[s]
        if guided:
            x_in = torch.cat([x, x], dim=0).to(dt)
            out = net(x_in, torch.full((N2,), t_orig, device=dev, dtype=torch.long), z_2NZ).float()
            eps, var_values = out[:, :C], out[:, C:]
            eps_c, eps_u = eps[:N], eps[N:]
            eps_g = eps_c * (1 + cfg) - cfg * eps_u
            var_c = var_values[:N]
        else:
            out = net(x.to(dt), torch.full((N,), t_orig, device=dev, dtype=torch.long), z_2NZ[:N]).float()
            eps_g, var_c = out[:, :C], out[:, C:]
        noise = noise_fn((N2, C))[:N].to(dev, torch.float32)
        x = iddpm_step(x, eps_g, var_c, sched, s, noise, temperature)
    return x * VAE_SCALE


__all__ = [
    "VAE_SCALE",
    "TimestepEmbedder",
    "SimpleMLPAdaLN",
    "RespacedSchedule",
    "space_timesteps",
    "cosine_betas",
    "iddpm_step",
    "sample_residual",
    "initial_noise",
    "gaussian_noise_fn",
    "timestep_embedding",
]
