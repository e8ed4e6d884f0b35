"""Token pruning at the largest scales (FastVAR's cached token pruning), a speed lever.

The last scales hold most of HART's tokens (48x48 and 64x64: 68% of them) but
change little: most of their tokens have converged by then. In every block of a
pruned scale, the attention and the FFN run only on the scale's pivotal tokens,
those whose block input is farthest (squared L2) from the scale's mean token;
the other slots of the sub-layer's output are refilled from the same sub-layer's
output at the reference scale (the last scale before the pruned ones), area-
resized to this scale. The token stream itself stays full-size, so the head, the
sampler and the residual diffusion see every position.

Consistency with the rest of the loop:
- RoPE: a kept token keeps its own 2-D position (its row of the stage's tables);
- KV cache: only the kept tokens' keys and values are written, packed at the
  next free offset; later stages attend to exactly what was written;
- the residual diffusion of the last scale is conditioned on the full-size
  hidden state, as always.

`PrunePlan.build(patch_nums, ratios)`: ratios for the last len(ratios) scales,
e.g. (0.5, 0.75) prunes half of the second-to-last scale's tokens and three
quarters of the last's (FastVAR's published HART setting for the 0.7B
schedule, the default).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Dict, Optional, Sequence, Tuple

import torch

DEFAULT_RATIOS: Tuple[float, ...] = (0.5, 0.75)


@dataclasses.dataclass(frozen=True)
class PrunePlan:
    """Which stages are pruned, how many tokens each keeps, and the reference stage."""

    keep: Dict[int, int]          # stage index -> tokens kept (of pn * pn)
    reference_stage: int          # whose sub-layer outputs refill the pruned slots
    patch_nums: Tuple[int, ...]

    @staticmethod
    def build(patch_nums: Sequence[int], ratios: Optional[Sequence[float]]) -> Optional["PrunePlan"]:
        """The plan for `ratios` (None or all zero: no pruning, None returned)."""
        if ratios is None:
            return None
        ratios = tuple(ratios)
        check_ratios(ratios, len(patch_nums))
        S = len(patch_nums)
        keep = {}
        for j, r in enumerate(ratios):
            si = S - len(ratios) + j
            n = patch_nums[si] ** 2
            k = n - int(n * r)
            if k < n:
                keep[si] = k
        if not keep:
            return None
        return PrunePlan(keep, S - len(ratios) - 1, tuple(patch_nums))


def check_ratios(ratios, num_stages: Optional[int]) -> None:
    """ValueError naming prune_ratios unless it is a sequence of numbers in [0, 1),
    short enough for a model of num_stages scales (None: any length >= 1)."""
    if isinstance(ratios, (str, bytes)) or not isinstance(ratios, (list, tuple)):
        raise ValueError(f"prune_ratios must be a sequence of ratios for the last scales, e.g. (0.5, 0.75), "
                         f"got {ratios!r}")
    # Stage 0 is the context and the reference stage must be an image scale before the pruned ones.
    if not ratios:
        raise ValueError("prune_ratios: an empty sequence (None turns pruning off)")
    if num_stages is not None and not len(ratios) <= num_stages - 2:
        raise ValueError(f"prune_ratios: this model has {num_stages} scales, so between 1 and {num_stages - 2} "
                         f"of the last ones can be pruned, got {len(ratios)} ratios")
    for i, r in enumerate(ratios):
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= float(r) < 1.0:
            raise ValueError(f"prune_ratios[{i}] must be a fraction of tokens to prune in [0, 1), got {r!r}")


def pivotal_tokens(x_BlC: torch.Tensor, n_keep: int) -> torch.Tensor:
    """(B, n_keep) int64, ascending: the tokens farthest from their row's mean token.

    Flat regions give many equal tokens, hence equal scores; scores equal to a
    relative 1e-4 count as ties, and ties keep the lower index, so backends whose
    arithmetic differs by a rounding pick the same tokens.
    """
    xf = x_BlC.float()
    score = (xf - xf.mean(dim=1, keepdim=True)).square().sum(-1).double()  # (B, l)
    l = score.shape[1]
    quantum = score.amax(dim=1, keepdim=True).clamp_min(1e-30) * 1e-4
    rank_key = torch.round(score / quantum) * l + (l - 1 - torch.arange(l, device=score.device, dtype=score.dtype))
    return rank_key.topk(n_keep, dim=1, sorted=False).indices.sort(dim=1).values


def gather_tokens(x_BlC: torch.Tensor, idx_Bn: torch.Tensor) -> torch.Tensor:
    """x[b, idx[b]] for every row: (B, n, C), contiguous."""
    return torch.gather(x_BlC, 1, idx_Bn.unsqueeze(-1).expand(-1, -1, x_BlC.shape[-1]))


@functools.lru_cache(maxsize=64)
def _area_matrix(r: int, pn: int, device: torch.device) -> torch.Tensor:
    """(pn*pn, r*r) float32 on `device`, cached there (no host copy per call): the
    area resize of an r x r map to pn x pn (F.interpolate mode="area", i.e.
    adaptive average pooling) as one linear map on row-major tokens. Output i of
    an axis averages inputs floor(i*r/pn) .. ceil((i+1)*r/pn) - 1; the 2-D
    average over a window is separable."""
    A = torch.zeros(pn, r, dtype=torch.float64)
    for i in range(pn):
        lo, hi = (i * r) // pn, -(-((i + 1) * r) // pn)
        A[i, lo:hi] = 1.0 / (hi - lo)
    return torch.kron(A, A).float().to(device)


def area_resize_tokens(ref_BrC: torch.Tensor, pn: int) -> torch.Tensor:
    """(B, r*r, C) tokens of an r x r map -> (B, pn*pn, C) float32, area-resized.

    One GEMM with the cached resize matrix, on the token layout as it is: the
    channels-first adaptive_avg_pool2d it replaces cost ~0.6 ms per call at
    (512 channels, 10 -> 16) on a 2-core CPU, 32 calls an image on the medium
    config. Agrees with F.interpolate(mode="area") to float32 rounding.
    """
    r = int(round(ref_BrC.shape[1] ** 0.5))
    if r == pn:
        return ref_BrC.to(torch.float32, copy=True)  # restore scatters into it
    return _area_matrix(r, pn, ref_BrC.device) @ ref_BrC.float()


def restore(ref_BrC: torch.Tensor, kept_BnC: torch.Tensor, idx_Bn: torch.Tensor, pn: int) -> torch.Tensor:
    """A sub-layer's full (B, pn*pn, C) output: the reference scale's output
    area-resized to pn x pn, with the kept tokens' own outputs scattered in."""
    C = ref_BrC.shape[-1]
    full = area_resize_tokens(ref_BrC, pn).to(kept_BnC.dtype)
    return full.scatter_(1, idx_Bn.unsqueeze(-1).expand(-1, -1, C), kept_BnC)


def _norm(block, x, scale, shift):
    h = block.ln_wo_grad(x)
    return h if scale is None else h.mul(scale.add(1)).add_(shift)


def _gates(mod):
    """(gamma1, gamma2, scale1, scale2, shift1, shift2), all None without modulation."""
    return (None,) * 6 if mod is None else mod


def block_forward_recording(block, x, mod, rope, cache, layer: int, start: int):
    """AdaLNSelfAttn.forward, the same operations in the same order (so the same
    result), also returning the attention and FFN outputs before their gates:
    the reference stage's outputs that refill the pruned slots later."""
    g1, g2, s1, s2, h1, h2 = _gates(mod)
    a = block.attn(_norm(block, x, s1, h1), rope, cache, layer, start)
    x = x + (a if g1 is None else a.mul(g1))
    f = block.ffn(_norm(block, x, s2, h2))
    return x + (f if g2 is None else f.mul(g2)), (a, f)


def pruned_block_forward(block, x, mod, rope, cache, layer: int, start: int, n_keep: int, ref_outputs, pn: int):
    """One block of a pruned stage (reference math): attention and FFN on the
    n_keep pivotal tokens of their inputs, the rest refilled from ref_outputs
    (the reference stage's (attention, FFN) outputs of this block).  Writes
    n_keep keys and values at `start` of the cache."""
    g1, g2, s1, s2, h1, h2 = _gates(mod)
    cos, sin = rope
    idx = pivotal_tokens(x, n_keep)
    a_kept = block.attn(_norm(block, gather_tokens(x, idx), s1, h1),
                        (gather_tokens(cos, idx), gather_tokens(sin, idx)), cache, layer, start)
    a = restore(ref_outputs[0], a_kept, idx, pn)
    x = x + (a if g1 is None else a.mul(g1))
    idx = pivotal_tokens(x, n_keep)
    f = restore(ref_outputs[1], block.ffn(_norm(block, gather_tokens(x, idx), s2, h2)), idx, pn)
    return x + (f if g2 is None else f.mul(g2))


__all__ = ["PrunePlan", "block_forward_recording", "pruned_block_forward", "DEFAULT_RATIOS", "check_ratios", "pivotal_tokens", "gather_tokens", "restore"]
