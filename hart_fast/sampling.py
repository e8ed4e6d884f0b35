"""Token sampling of one stage: CFG combine, top-k / top-p filtering, multinomial,
and the `more_smooth` Gumbel-softmax code mixture (official semantics).

The `_topk` variants are the `topk_sampling` speed lever: after top-k filtering
every logit outside the k kept ones is -inf, so the draw and the Gumbel-softmax
mixture only ever land on those k; drawing the random numbers for them alone
(k per position instead of the vocabulary's V) gives the same distribution from
another random stream. CPU random numbers are drawn one by one (~18 ns each for
exponential_, 2-core CPU), so at V = 4096 and k = 300-600 this is most of the
sampling's time.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch


def official_top_k(si: int) -> int:
    """The official loop ignores its top_k argument: 600 for stages 0-6, 300 after."""
    return 600 if si < 7 else 300


def cfg_ratio(si: int, num_stages: int) -> float:
    """si/(S-1) for stages before the last; the last stage reuses the previous ratio."""
    return min(si, num_stages - 2) / (num_stages - 1)


def cfg_combine(logits_2BlV: torch.Tensor, t: float) -> torch.Tensor:
    """(1+t)*cond - t*uncond with the conditional rows first."""
    B = logits_2BlV.shape[0] // 2
    return (1 + t) * logits_2BlV[:B] - t * logits_2BlV[B:]


def filter_top_k_top_p_(logits_BlV: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (in place, with -inf) all but the top-k logits, then all outside the top-p mass.

    top_k <= 0 or >= V keeps everything (the official topk call would fail for
    top_k > V; keeping all is what that request means).
    """
    V = logits_BlV.shape[-1]
    if 0 < top_k < V:
        kth = logits_BlV.topk(top_k, largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
        logits_BlV.masked_fill_(logits_BlV < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits_BlV.sort(dim=-1, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False
        logits_BlV.masked_fill_(remove.scatter(sorted_idx.ndim - 1, sorted_idx, remove), -torch.inf)
    return logits_BlV


Generators = Union[torch.Generator, Sequence[torch.Generator], None]


def multinomial_sample(logits_BlV: torch.Tensor, generator: Generators) -> torch.Tensor:
    """One draw per position from softmax(logits): (B, l) int64. No host synchronisation.

    generator: one for the whole batch, or one per row (row b draws only from
    generator[b], so its codes do not depend on the other rows).
    """
    B, l, V = logits_BlV.shape
    if isinstance(generator, (list, tuple)):
        return torch.cat([multinomial_sample(logits_BlV[b:b + 1], g) for b, g in enumerate(generator)])
    probs = logits_BlV.softmax(dim=-1).view(-1, V)
    return torch.multinomial(probs, num_samples=1, replacement=True, generator=generator).view(B, l)


def kept_candidates(logits_BlV: torch.Tensor, k: int):
    """(values, indices) of the k largest filtered logits per position, (B, l, k).

    Exact ties at the k-th value that top-k filtering kept beyond k are dropped
    here (topk returns exactly k): a measure-zero difference for float logits.
    """
    return logits_BlV.topk(min(k, logits_BlV.shape[-1]), dim=-1, largest=True, sorted=False)


def _exponential(shape_like: torch.Tensor, generator: Generators) -> torch.Tensor:
    q = torch.empty_like(shape_like, memory_format=torch.legacy_contiguous_format)
    if isinstance(generator, (list, tuple)):
        for b, g in enumerate(generator):
            q[b].exponential_(generator=g)
    else:
        q.exponential_(generator=generator)
    return q


def multinomial_sample_topk(vals_Blk: torch.Tensor, idx_Blk: torch.Tensor, generator: Generators) -> torch.Tensor:
    """One draw per position from softmax over the kept candidates: (B, l) int64.

    The exponential race torch.multinomial itself runs for one sample (argmax of
    p / Exp(1)), over k candidates instead of V; row b draws from generator[b].
    """
    probs = vals_Blk.float().softmax(dim=-1)
    choice = (probs / _exponential(probs, generator)).argmax(dim=-1, keepdim=True)
    return idx_Blk.gather(-1, choice).squeeze(-1)


def gumbel_mix_topk(vals_Blk, idx_Blk, V: int, ratio: float, codebook_VC, generator) -> torch.Tensor:
    """gumbel_mix with the Gumbel noise drawn for the kept candidates only: the
    softmax over the others is exactly 0 there, so the mixture is the same in law."""
    soft_Blk = gumbel_softmax(vals_Blk.mul(1 + ratio), gumbel_tau(ratio), generator)
    soft_BlV = torch.zeros(*vals_Blk.shape[:-1], V, dtype=soft_Blk.dtype, device=soft_Blk.device)
    return soft_BlV.scatter_(-1, idx_Blk, soft_Blk) @ codebook_VC.unsqueeze(0)


def gumbel_softmax(logits: torch.Tensor, tau: float, generator: Generators) -> torch.Tensor:
    """Soft Gumbel-softmax sample over the last dim, noise = -log(Exp(1)) from `generator`
    (one, or one per row of the leading dim)."""
    return ((logits - _exponential(logits, generator).log()) / tau).softmax(-1)


def gumbel_tau(ratio: float) -> float:
    """The official `more_smooth` temperature at a stage's cfg ratio."""
    return max(0.27 * (1 - ratio * 0.95), 0.005)


def gumbel_mix(logits_BlV, ratio: float, codebook_VC, generator) -> torch.Tensor:
    """`more_smooth`: the Gumbel-softmax mixture of code embeddings, (B, l, Cvae)."""
    soft = gumbel_softmax(logits_BlV.mul(1 + ratio), gumbel_tau(ratio), generator)
    return soft @ codebook_VC.unsqueeze(0)


__all__ = [
    "official_top_k",
    "cfg_ratio",
    "cfg_combine",
    "filter_top_k_top_p_",
    "multinomial_sample",
    "gumbel_softmax",
    "gumbel_mix",
    "kept_candidates",
    "multinomial_sample_topk",
    "gumbel_mix_topk",
]
