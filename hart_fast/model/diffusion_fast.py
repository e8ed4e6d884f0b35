"""Fast residual-diffusion sampler: same contract and noise order as
hart_fast.model.diffusion.sample_residual, restructured for speed.

What changes relative to the reference (all exact rewrites of the maths; the
results differ only by float32 rounding noise from differently shaped GEMMs
and the norm kernel's reduction order):

* cond_embed(z) is computed once per call (it does not depend on t);
* the timestep embedding is one (1, W) row per step, broadcast over rows;
* the adaLN modulation linears of all ResBlocks and of the final layer run as
  ONE GEMM per step (their weights are concatenated once and cached on the
  module), since they all consume the same silu(y);
* in_ln + modulate and the final norm + modulate use the fused norm kernels,
  each ResBlock's gated residual ``x + gate * h`` fused into the norm that
  follows it (hart_fast.ops.add_layer_norm_modulate), with the adaLN
  shift / scale / gate read in place from the batched GEMM output;
* with CFG both halves see the same noisy x, so input_proj(x) is computed for
  N rows and duplicated instead of for 2N rows;
* the CFG combine + p_sample update is one fused kernel (iddpm_step_fused);
* optionally (cuda_graph=True, CUDA only) the whole step loop is captured in a
  CUDA graph once per (shapes, cfg, schedule, temperature) and replayed.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from hart_fast.model.diffusion import (
    VAE_SCALE,
    NoiseFn,
    RespacedSchedule,
    SimpleMLPAdaLN,
    gaussian_noise_fn,
    initial_noise,
)
from hart_fast.ops import add_layer_norm_modulate, iddpm_step_fused, layer_norm_modulate, schedule_scalars

_LN_EPS = 1e-6


class _AdaCache:
    """Concatenated adaLN weights of all blocks + final layer (built once per module)."""

    def __init__(self, net: SimpleMLPAdaLN):
        lins = [blk.adaLN_modulation[1] for blk in net.res_blocks] + [net.final_layer.adaLN_modulation[1]]
        self.weight = torch.cat([lin.weight.detach() for lin in lins], 0)  # (depth*3W + 2W, W)
        self.bias = torch.cat([lin.bias.detach() for lin in lins], 0)
        self.versions = tuple(lin.weight._version for lin in lins) + tuple(lin.bias._version for lin in lins)
        self.key = (self.weight.device, self.weight.dtype, tuple(lin.weight.data_ptr() for lin in lins))
        self.lins = lins


def _ada_cache(net: SimpleMLPAdaLN) -> _AdaCache:
    cache = getattr(net, "_hart_fast_ada", None)
    lins = [blk.adaLN_modulation[1] for blk in net.res_blocks] + [net.final_layer.adaLN_modulation[1]]
    key = (lins[0].weight.device, lins[0].weight.dtype, tuple(lin.weight.data_ptr() for lin in lins))
    versions = tuple(lin.weight._version for lin in lins) + tuple(lin.bias._version for lin in lins)
    if cache is None or cache.key != key or cache.versions != versions:
        with torch.no_grad():
            cache = _AdaCache(net)
        object.__setattr__(net, "_hart_fast_ada", cache)  # not a submodule / parameter
    return cache


def _time_row(net: SimpleMLPAdaLN, t_orig: int, device) -> torch.Tensor:
    """time_embed of one timestep: (1, W)."""
    return net.time_embed(torch.full((1,), t_orig, device=device, dtype=torch.long))


def mlp_forward_fast(net: SimpleMLPAdaLN, ada: _AdaCache, x_in: torch.Tensor, t_row: torch.Tensor,
                     cond: torch.Tensor, dup: bool) -> torch.Tensor:
    """SimpleMLPAdaLN.forward with the rewrites above.

    x_in: (M, C) in the MLP dtype; the MLP sees rows [x_in; x_in] when dup
    (CFG) else x_in.  t_row: (1, W) time embedding; cond: (R, W) cond_embed(z)
    with R = 2M if dup else M.  Returns (R, 2C) in the MLP dtype.
    """
    W = cond.shape[1]
    h0 = net.input_proj(x_in)  # (M, W)
    x = torch.cat([h0, h0], 0) if dup else h0  # (R, W)
    y = t_row + cond  # (R, W): broadcast of the single time row
    mod = F.linear(F.silu(y), ada.weight, ada.bias)  # (R, depth*3W + 2W), one GEMM
    h = gate = None  # the previous ResBlock's `x + gate * h`, fused into the next norm
    for i, blk in enumerate(net.res_blocks):
        base = 3 * W * i
        shift = mod[:, base:base + W]  # column slices, read in place by the kernels
        scale = mod[:, base + W:base + 2 * W]
        w, b = blk.in_ln.weight, blk.in_ln.bias
        if h is None:
            hmod = layer_norm_modulate(x, w, b, scale, shift, _LN_EPS)
        else:
            x, hmod = add_layer_norm_modulate(x, h, gate, w, b, scale, shift, _LN_EPS)
        h = blk.mlp(hmod)
        gate = mod[:, base + 2 * W:base + 3 * W]
    base = 3 * W * len(net.res_blocks)
    shift, scale = mod[:, base:base + W], mod[:, base + W:base + 2 * W]
    if h is None:
        xf = layer_norm_modulate(x, None, None, scale, shift, _LN_EPS)
    else:
        _, xf = add_layer_norm_modulate(x, h, gate, None, None, scale, shift, _LN_EPS)
    return net.final_layer.linear(xf)


def _time_rows(net, sched, device) -> List[torch.Tensor]:
    """(1, W) time embedding of every step, in loop order (s = S-1 .. 0)."""
    return [_time_row(net, sched.timestep_map[s], device) for s in reversed(range(sched.num_steps))]


def _loop(net, ada, x, cond, cfg, guided, sched, temperature, noises, t_rows, dt):
    for k, s in enumerate(reversed(range(sched.num_steps))):
        out = mlp_forward_fast(net, ada, x.to(dt), t_rows[k], cond, dup=guided).float()
        x = iddpm_step_fused(x, out, noises[k], cfg, guided, temperature=temperature,
                             **schedule_scalars(sched, s))
    return x


def sample_residual_fast(
    net: SimpleMLPAdaLN,
    z_2NZ: torch.Tensor,
    cfg: float,
    sched: RespacedSchedule,
    temperature: float = 1.0,
    x_init_NC: Optional[torch.Tensor] = None,
    noise_fn: Optional[NoiseFn] = None,
    cuda_graph: bool = False,
) -> torch.Tensor:
    """Drop-in for sample_residual: (N, Cvae) residual tokens already scaled by 0.6."""
    N2, _ = z_2NZ.shape
    N = N2 // 2
    C = net.in_channels
    guided = not cfg == 1.0
    dev, dt = z_2NZ.device, net.input_proj.weight.dtype
    noise_fn = noise_fn or gaussian_noise_fn(dev)
    with torch.no_grad():
        x = initial_noise(N, C, guided, x_init_NC, noise_fn, dev)
        # Per-step noise in the official order (one (2N, C) draw per step, first half used).
        noises = [noise_fn((N2, C))[:N].to(dev, torch.float32) for _ in range(sched.num_steps)]
        ada = _ada_cache(net)
        z = z_2NZ if guided else z_2NZ[:N]
        if cuda_graph and dev.type == "cuda":
            return _run_graphed(net, ada, x, z, cfg, guided, sched, temperature, noises, dt) * VAE_SCALE
        cond = net.cond_embed(z)  # (R, W), once: independent of t
        t_rows = _time_rows(net, sched, dev)
        x = _loop(net, ada, x, cond, cfg, guided, sched, temperature, noises, t_rows, dt)
    return x * VAE_SCALE


# ----------------------------------------------------------------------------
# CUDA graph path
# ----------------------------------------------------------------------------
class _Graphed:
    def __init__(self, graph, x_in, z_in, noise_in, x_out, t_rows):
        self.graph, self.x_in, self.z_in, self.noise_in, self.x_out = graph, x_in, z_in, noise_in, x_out
        self.t_rows = t_rows  # read by the graph: must stay alive with it


def _run_graphed(net, ada, x, z, cfg, guided, sched, temperature, noises, dt):
    """Capture (once per key) and replay the whole step loop.

    Static buffers: x_in (N, C) fp32, z_in (R, Cz), noise_in (steps, N, C).
    Everything inside the graph (cond_embed, time rows, GEMMs, our kernels)
    reads only these buffers and the weights, so a replay with new contents
    computes the sampler for the new inputs.  The schedule coefficients, cfg
    and temperature are baked into the graph as kernel arguments, hence part
    of the cache key.  Only the most recent graph is kept (its memory pool is
    freed when it is replaced).
    """
    key = (tuple(x.shape), tuple(z.shape), z.dtype, str(z.device), float(cfg), bool(guided),
           tuple(sched.timestep_map), float(temperature), ada.key, ada.versions)
    cache: Dict = getattr(net, "_hart_fast_graph", None) or {}
    g = cache.get(key)
    noise_stack = torch.stack(noises, 0)
    if g is None:
        cache = {}
        object.__setattr__(net, "_hart_fast_graph", cache)
        x_in, z_in, noise_in = x.clone(), z.clone(), noise_stack.clone()
        # The time rows depend only on the schedule (part of the key).  They are
        # computed outside the capture because timestep_embedding builds its
        # frequency table on the host and copies it over, which a capturing
        # stream does not allow.
        t_rows = _time_rows(net, sched, x.device)

        def body():
            cond = net.cond_embed(z_in)
            return _loop(net, ada, x_in, cond, cfg, guided, sched, temperature,
                         list(noise_in.unbind(0)), t_rows, dt)

        # Warm up on a side stream (lazy inits, Triton JIT, cuBLAS workspaces)
        # before capturing, as torch.cuda.graphs recommends.
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            body()
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            x_out = body()
        g = _Graphed(graph, x_in, z_in, noise_in, x_out, t_rows)
        cache[key] = g
    g.x_in.copy_(x)
    g.z_in.copy_(z)
    g.noise_in.copy_(noise_stack)
    g.graph.replay()
    return g.x_out.clone()


def release_graph(net: SimpleMLPAdaLN) -> bool:
    """Drop the captured step-loop graph of net (and its memory pool); True if there was one."""
    cache = getattr(net, "_hart_fast_graph", None)
    if not cache:
        return False
    object.__setattr__(net, "_hart_fast_graph", {})
    return True


__all__ = ["sample_residual_fast", "mlp_forward_fast", "release_graph"]
