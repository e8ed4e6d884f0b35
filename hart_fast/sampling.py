"""Token sampling of one stage: CFG combine, top-k / top-p filtering, multinomial,
and the `more_smooth` Gumbel-softmax code mixture (official semantics)."""

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


def gumbel_softmax(logits: torch.Tensor, tau: float, generator: Generators) -> torch.Tensor:
    """Soft Gumbel-softmax sample over the last dim, noise = -log(Exp(1)) from `generator`
    (one, or one per row of the leading dim)."""
    noise = torch.empty_like(logits, memory_format=torch.legacy_contiguous_format)
    if isinstance(generator, (list, tuple)):
        for b, g in enumerate(generator):
            noise[b].exponential_(generator=g)
    else:
        noise.exponential_(generator=generator)
    return ((logits - noise.log()) / tau).softmax(-1)


def gumbel_mix(logits_BlV, ratio: float, codebook_VC, generator) -> torch.Tensor:
    """`more_smooth`: the Gumbel-softmax mixture of code embeddings, (B, l, Cvae)."""
    tau = max(0.27 * (1 - ratio * 0.95), 0.005)
    soft = gumbel_softmax(logits_BlV.mul(1 + ratio), tau, generator)
    return soft @ codebook_VC.unsqueeze(0)


__all__ = [
    "official_top_k",
    "cfg_ratio",
    "cfg_combine",
    "filter_top_k_top_p_",
    "multinomial_sample",
    "gumbel_softmax",
    "gumbel_mix",
]
