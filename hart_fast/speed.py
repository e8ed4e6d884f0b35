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
  GEMMs (hart_fast.quantize). A preset uses it where the pipeline can run it
  (a CPU pipeline on the fast path); asked for explicitly where it cannot run, it
  is an error naming the option.

A preset fills in only the levers the caller left unset (None): an explicit
option always wins. What each preset costs in quality and wins in time is
measured by `bench/speed_modes.py` (BENCHMARKS.md, "Speed modes").
"""

from __future__ import annotations

from typing import Any, Dict, Optional

# Which levers each preset sets. Chosen from bench/speed_modes.py's table.
SPEED_PRESETS: Dict[str, Dict[str, Any]] = {
    "exact": {},
    "balanced": {"guidance_until": -1},
    "fastest": {"guidance_until": -3, "prune_ratios": (0.5, 0.75), "diffusion_steps": 4},
}
# Levers a preset adds only where the pipeline runs them (see resolve_levers).
CPU_FAST_PATH_EXTRAS: Dict[str, Dict[str, Any]] = {"exact": {}, "balanced": {"int8_weights": True},
                                                   "fastest": {"int8_weights": True}}
LEVERS = ("guidance_until", "prune_ratios", "diffusion_steps", "int8_weights")


def check_speed(speed) -> str:
    """The preset's name, or ValueError naming the option and the choices."""
    if not isinstance(speed, str) or speed not in SPEED_PRESETS:
        raise ValueError(f"speed must be one of {', '.join(repr(s) for s in SPEED_PRESETS)}, got {speed!r}")
    return speed


def resolve_levers(speed: str = "exact", *, guidance_until: Optional[int] = None, prune_ratios=None,
                   diffusion_steps=None, int8_weights: Optional[bool] = None,
                   cpu_fast_path: bool = False) -> Dict[str, Any]:
    """The levers a call runs with: the preset's (with its CPU extras when the
    pipeline is a CPU one on the fast path), overridden by every explicit
    (non-None) option."""
    levers: Dict[str, Any] = {k: None for k in LEVERS}
    levers.update(SPEED_PRESETS[check_speed(speed)])
    if cpu_fast_path:
        levers.update(CPU_FAST_PATH_EXTRAS[speed])
    for k, v in (("guidance_until", guidance_until), ("prune_ratios", prune_ratios),
                 ("diffusion_steps", diffusion_steps), ("int8_weights", int8_weights)):
        if v is not None:
            levers[k] = v
    return levers


__all__ = ["SPEED_PRESETS", "CPU_FAST_PATH_EXTRAS", "LEVERS", "check_speed", "resolve_levers"]
