"""Validation of generation inputs and options: every error names the option.

Used by HartPipeline.generate (Python), hart_fast.generate and the CLI before
anything runs or is written.
"""

from __future__ import annotations

import math

import torch

# torch.Generator.manual_seed takes a signed 64-bit integer.
MAX_SEED = 2**63 - 1

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"unsupported dtype {dtype}: use float32, float16 or bfloat16")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"unsupported dtype {dtype!r}: use 'float32', 'float16' or 'bfloat16'")


def check_number(name, value, kind, lo=None, hi=None, lo_open=False, hi_open=False, hint=""):
    """Raise ValueError unless value is an int (kind int) / finite number within the bounds."""
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok:
        raise ValueError(f"{name} must be {'an integer' if kind is int else 'a finite number'}, got {value!r}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value!r}{hint}")
    if hi is not None and (value >= hi if hi_open else value > hi):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {value!r}{hint}")


def validate_options(guidance_scale=4.5, top_k=None, top_p=0.0, diffusion_steps=None, diffusion_temperature=1.0,
                     seed=0, schedule_fn=None, speed="exact", guidance_until=None, prune_ratios=None,
                     **levers) -> None:
    """Raise ValueError naming the first invalid sampling option.

    schedule_fn(steps_string) builds a respaced schedule (raises ValueError for a bad one).
    levers: the on/off speed levers (hart_fast.speed.BOOL_LEVERS), each None, True or False.
    guidance_until's range, how many prune_ratios fit and where each lever can
    run depend on the model and the pipeline (HartPipeline.validate_options checks them).
    """
    from hart_fast.speed import BOOL_LEVERS, check_bool_levers, check_speed

    check_speed(speed)
    unknown = set(levers) - set(BOOL_LEVERS)
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}")
    check_bool_levers(**levers)
    if guidance_until is not None:
        check_number("guidance_until", guidance_until, int,
                     hint=" (the number of scales, from the first, that run guidance; negative: from the end)")
    if prune_ratios is not None:
        from hart_fast.pruning import check_ratios

        check_ratios(prune_ratios, None)
    # CFG extrapolates (1 + t) * cond - t * uncond with t = guidance_scale * ratio; a
    # negative scale would steer towards the unconditional image: refused.
    check_number("guidance_scale (cfg)", guidance_scale, float, lo=0,
                 hint=" (0 turns classifier-free guidance off; the official default is 4.5)")
    if top_k is not None:
        check_number("top_k", top_k, int, lo=0)
    check_number("top_p", top_p, float, lo=0, hi=1, hi_open=True)
    if diffusion_steps is None:
        pass
    elif isinstance(diffusion_steps, str):
        if schedule_fn is not None:
            try:
                schedule_fn(diffusion_steps)
            except ValueError as e:
                raise ValueError(f"invalid diffusion_steps {diffusion_steps!r}: {e}") from e
    else:
        check_number("diffusion_steps", diffusion_steps, int, lo=1)
        if diffusion_steps > 1000:
            raise ValueError(f"diffusion_steps must be <= 1000 (the trained schedule), got {diffusion_steps}")
    check_number("diffusion_temperature", diffusion_temperature, float, lo=0)
    if isinstance(seed, (list, tuple)):
        if not seed:
            raise ValueError("seed: an empty list of seeds")
        for i, s in enumerate(seed):
            check_number(f"seed[{i}]", s, int, lo=0, hi=MAX_SEED)
    elif seed is not None:
        check_number("seed", seed, int, lo=0, hi=MAX_SEED)


def validate_inputs(cfg, Cvae: int, prompt_embeds, prompt_mask, residual_latents, output_type, seed=None) -> None:
    """Raise ValueError unless the tensors (and a per-row seed list) fit the model (cfg: its TransformerConfig)."""
    if not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.dim() != 3:
        raise ValueError(
            "prompt_embeds must be a tensor of shape (B, context_token, context_dim), got "
            f"{getattr(prompt_embeds, 'shape', type(prompt_embeds).__name__)}"
        )
    B, T, D = prompt_embeds.shape
    if B == 0:
        raise ValueError("prompt_embeds has batch size 0: nothing to generate")
    if (T, D) != (cfg.context_token, cfg.context_dim):
        raise ValueError(
            f"prompt_embeds has shape {tuple(prompt_embeds.shape)}, expected (B, {cfg.context_token}, "
            f"{cfg.context_dim}) for this model (context_token, context_dim)"
        )
    if not prompt_embeds.dtype.is_floating_point:
        raise ValueError(f"prompt_embeds must be a float tensor, got {prompt_embeds.dtype}")
    if prompt_mask is not None:
        if not isinstance(prompt_mask, torch.Tensor) or tuple(prompt_mask.shape) != (B, T):
            raise ValueError(
                f"prompt_mask must be a (B, context_token) = {(B, T)} tensor, got "
                f"{getattr(prompt_mask, 'shape', type(prompt_mask).__name__)}"
            )
        if prompt_mask.dtype != torch.bool and prompt_mask.dtype.is_floating_point:
            raise ValueError(f"prompt_mask must be bool (or 0/1 integers), got {prompt_mask.dtype}")
    if isinstance(seed, (list, tuple)) and len(seed) != B:
        raise ValueError(f"seed: got {len(seed)} seeds for a batch of {B} (one per row, or one int)")
    if isinstance(seed, int) and not isinstance(seed, bool) and seed + B - 1 > MAX_SEED:
        raise ValueError(f"seed: rows take seed + b, so seed must be <= {MAX_SEED - B + 1} for a batch of {B}")
    if output_type not in ("pt", "pil", "latent"):
        raise ValueError(f"output_type must be 'pt', 'pil' or 'latent', got {output_type!r}")
    if residual_latents is not None:
        shape = (B, cfg.patch_nums[-1] ** 2, Cvae)
        if not isinstance(residual_latents, torch.Tensor) or tuple(residual_latents.shape) != shape:
            raise ValueError(
                f"residual_latents must have shape (B, L_last, Cvae) = {shape}, got "
                f"{getattr(residual_latents, 'shape', type(residual_latents).__name__)}"
            )


__all__ = ["MAX_SEED", "parse_dtype", "check_number", "validate_options", "validate_inputs"]
