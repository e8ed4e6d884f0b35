"""Speed modes: opt-in presets of levers that trade exactness for time.

`exact` (the default) is the official algorithm, bit-faithful on the conformance
path. The other presets combine levers, each also an option of its own:

- `guidance_until` (int or None): classifier-free guidance on the first g scales
  only (negative: counted from the end, -1 = every scale but the last). From
  scale g on only the conditional rows run (half those stages' transformer work)
  and the codes and the residual are drawn unguided.
- `prune_ratios` (sequence of fractions): token pruning inside the blocks of the
  last len(ratios) scales (hart_fast.pruning, FastVAR's cached token pruning);
  (0.5, 0.75), FastVAR's HART setting, prunes half of the second-to-last scale
  and three quarters of the last.
- `diffusion_steps` (int): fewer residual-diffusion steps (a respaced schedule of
  the trained 1000).
- `int8_weights` (bool, CPU, fast path): the transformer's projections as int8
  GEMMs (hart_fast.quantize).
- `fp8_weights` (bool, CUDA compute capability 8.9+, fast path): the same
  projections as fp8 e4m3 GEMMs on the tensor cores (hart_fast.quantize).
- `topk_sampling` (bool, any device): each token's draw and its `more_smooth`
  Gumbel noise use random numbers for the top-k kept candidates only, not the
  whole vocabulary (hart_fast.sampling). The same distribution (outside the
  kept candidates the probabilities are exactly 0) from another random stream:
  no quality cost, only other images for a seed.
- `cpu_bf16` (bool, a float32 CPU pipeline): the transformer, the residual
  diffusion and the decoder in bfloat16 (a bfloat16 copy of the modules, made on
  first use). Only CPUs with native bfloat16 arithmetic (AVX512-BF16 or AMX)
  gain from it; elsewhere torch emulates it and it is slower than float32. With
  int8_weights too (explicitly; the presets add one or the other) the
  projections run int8 from the bfloat16 weights, and everything else in
  bfloat16.

A preset fills in only the levers the caller left unset (None): an explicit
option always wins. Some levers a preset adds only where the pipeline gains from
them (`PRESET_EXTRAS`: int8 weights on a CPU pipeline on the fast path,
bfloat16 instead on a float32 CPU pipeline whose CPU has native bfloat16,
pruning in `fastest` for models whose last scale is at least
MIN_PRUNED_LAST_SCALE wide). Asked for
explicitly where it cannot run, a lever is an error naming the option. What each
preset costs in quality and wins in time is measured by `bench/speed_modes.py`
(BENCHMARKS.md, "Speed modes"); fp8 is not in a preset until a lent GPU has
measured it.
"""

from __future__ import annotations

from typing import Any, Collection, Dict, Optional

import torch

# Which levers each preset sets. Chosen from bench/speed_modes.py's table.
SPEED_PRESETS: Dict[str, Dict[str, Any]] = {
    "exact": {},
    "balanced": {"guidance_until": -1, "topk_sampling": True},
    "fastest": {"guidance_until": -3, "diffusion_steps": 4, "topk_sampling": True},
}
# A preset prunes only models whose last scale is at least this wide. FastVAR
# prunes HART's 48x48 and 64x64 scales, where most tokens are fine detail; on the
# trained demo (6x6 and 8x8, every token a sizeable part of the picture) pruning
# halved the judge's colour and position accuracy (BENCHMARKS.md, "Speed modes").
MIN_PRUNED_LAST_SCALE = 16
# Levers a preset adds only where the pipeline has the named trait (see
# `pipeline_traits`): a property of the machine (a lever that wins on one CPU and
# loses on another) or of the model (`large_scales`).
PRESET_EXTRAS: Dict[str, Dict[str, Dict[str, Any]]] = {
    "cpu_fast_path": {"balanced": {"int8_weights": True}, "fastest": {"int8_weights": True}},
    # With bfloat16 the projections stay bfloat16 GEMMs (AMX / AVX512-BF16) rather than
    # int8 ones, which take float32 inputs: as fast at batch 1, faster at batch 4-16,
    # and one approximation fewer (BENCHMARKS.md, "On a CPU with native bfloat16").
    # The traits apply in sorted order, so this False overrides cpu_fast_path's True.
    "cpu_native_bf16": {"balanced": {"cpu_bf16": True, "int8_weights": False},
                        "fastest": {"cpu_bf16": True, "int8_weights": False}},
    "large_scales": {"fastest": {"prune_ratios": (0.5, 0.75)}},
}
LEVERS = ("guidance_until", "prune_ratios", "diffusion_steps", "topk_sampling", "int8_weights", "fp8_weights",
          "cpu_bf16")
BOOL_LEVERS = ("topk_sampling", "int8_weights", "fp8_weights", "cpu_bf16")


def check_speed(speed) -> str:
    """The preset's name, or ValueError naming the option and the choices."""
    if not isinstance(speed, str) or speed not in SPEED_PRESETS:
        raise ValueError(f"speed must be one of {', '.join(repr(s) for s in SPEED_PRESETS)}, got {speed!r}")
    return speed


def check_bool_levers(**levers) -> None:
    """ValueError naming the first on/off lever that is neither None, True nor False."""
    for name in BOOL_LEVERS:
        v = levers.get(name)
        if v is not None and not isinstance(v, bool):
            raise ValueError(f"{name} must be True or False, got {v!r}")


def cpu_native_bf16() -> bool:
    """Whether this CPU does bfloat16 arithmetic natively (AVX512-BF16 or AMX tiles)."""
    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(bool(p()) for p in probes if p is not None)


def pipeline_traits(device: torch.device, dtype: torch.dtype, fast: bool, last_scale: int = 0) -> frozenset:
    """The PRESET_EXTRAS keys a pipeline on (device, dtype, fast) has, whose model's
    last scale is `last_scale` tokens wide."""
    traits = set()
    if last_scale >= MIN_PRUNED_LAST_SCALE:
        traits.add("large_scales")
    if device.type == "cpu" and fast:
        traits.add("cpu_fast_path")
    if device.type == "cpu" and dtype == torch.float32 and cpu_native_bf16():
        traits.add("cpu_native_bf16")
    return frozenset(traits)


def check_levers_where(levers: Dict[str, Any], device, dtype=None, fast: Optional[bool] = None) -> None:
    """ValueError naming the first lever that cannot run on `device` (and `dtype`, and
    the fast path `fast`; None: not known yet, not checked)."""
    device = torch.device(device)
    if levers.get("int8_weights") and levers.get("fp8_weights"):
        raise ValueError("int8_weights and fp8_weights exclude each other: choose one")
    if fast is False:
        for name in ("int8_weights", "fp8_weights"):
            if levers.get(name):
                raise ValueError(f"{name} runs on the fast path only (this pipeline has fast=False or no "
                                 "compiled extension)")
    if levers.get("int8_weights") and device.type != "cpu":
        raise ValueError(f"int8_weights runs on the CPU only, not on {device}; on a GPU use dtype='float16' or "
                         "'bfloat16', or fp8_weights on Hopper / Ada")
    if levers.get("fp8_weights"):
        from hart_fast.quantize import fp8_supported

        if not fp8_supported(device):
            raise ValueError(f"fp8_weights needs a CUDA GPU of compute capability 8.9 or later (Ada, Hopper); "
                             f"this pipeline runs on {device}" + ("; on the CPU use int8_weights"
                                                                  if device.type == "cpu" else ""))
    if levers.get("cpu_bf16") and device.type != "cpu":
        raise ValueError(f"cpu_bf16 is a CPU lever (this pipeline runs on {device}); on a GPU load the pipeline "
                         "with dtype='bfloat16'")
    if levers.get("cpu_bf16") and dtype is not None and dtype != torch.float32:
        raise ValueError(f"cpu_bf16 runs a float32 pipeline in bfloat16; this one is already {dtype}")


def resolve_levers(speed: str = "exact", *, traits: Collection[str] = (), **explicit) -> Dict[str, Any]:
    """The levers a call runs with: the preset's (with the PRESET_EXTRAS of every
    trait the pipeline has), overridden by every explicit (non-None) lever."""
    unknown = set(explicit) - set(LEVERS)
    if unknown:
        raise TypeError(f"unknown speed lever(s) {sorted(unknown)}; the levers are {', '.join(LEVERS)}")
    levers: Dict[str, Any] = {k: None for k in LEVERS}
    levers.update(SPEED_PRESETS[check_speed(speed)])
    for trait in sorted(traits):
        levers.update(PRESET_EXTRAS[trait].get(speed, {}))
    levers.update({k: v for k, v in explicit.items() if v is not None})
    return levers


__all__ = ["BOOL_LEVERS", "LEVERS", "MIN_PRUNED_LAST_SCALE", "PRESET_EXTRAS", "SPEED_PRESETS", "check_bool_levers",
           "check_levers_where", "check_speed", "cpu_native_bf16", "pipeline_traits", "resolve_levers"]
