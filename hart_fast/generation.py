"""HART's generation loop, top to bottom, for any backend.

The loop follows the official `autoregressive_infer_cfg`: condition -> stage 0
over the context -> one transformer pass per scale (CFG, sample codes, grow
f_hat, build the next scale's input) -> the last scale (codes plus the residual
diffusion) -> the decoder's input latent f_hat.

What a backend supplies (the reference one is `hart_fast.reference.ReferenceBackend`,
the kernel one `hart_fast.engine.FastEngine`):

    begin(mods, head_mod, pos2, prune) per-call state: KV cache, modulations, RoPE tables, and
                                       the token-pruning plan (hart_fast.pruning.PrunePlan or None)
    stage(si, x_2BlC) -> (h, logits)   one transformer pass over stage si (both CFG halves);
                                       logits (2B, l, V) float32, before CFG
    drop_unconditional()               from now on stage() runs the conditional rows only
                                       (x and logits of B rows; the `guidance_until` lever)
    guide(logits, t, top_k, top_p)     CFG combine + top-k / top-p filter: (B, l, V);
                                       t None: logits are conditional rows only, no CFG
    next_scale_input(si, f_hat, h)     grow f_hat by the stage's code map, area-resize it
    sample_residual(net, z, t, sched, *, temperature, x_init_NC, noise_fn)
                                       the residual diffusion of the last scale

Everything else (seeding, the CFG mask and ramp, the top-k schedule, the token
sampler hook, Gumbel smoothing, embeddings, the trace) is here, once, so both
backends run the same algorithm and differ only in floating-point association.

Randomness is per row: row b of a batch draws its codes, its Gumbel noise and its
residual-diffusion noise only from generators seeded with its own seed
(`row_seeds`), so an image depends on its prompt, seed and settings, not on
which other prompts share its batch or where it sits in it.

Speed levers (hart_fast.speed; all off by default, where the loop is the
official algorithm): `guidance_until` g runs classifier-free guidance on the
first g scales only (negative: counted from the end); from scale g on only the
conditional rows go through the transformer (half the work of those stages) and
the codes and the residual diffusion are drawn unguided. `prune_ratios` prunes
tokens inside the blocks of the last scales (hart_fast.pruning; the backend
does it, the loop is unchanged). `topk_sampling` draws the codes and the
`more_smooth` Gumbel noise over the top-k kept candidates only
(hart_fast.sampling): the same distribution from fewer random numbers.

A trace (dict) records, on both backends alike: `stageXX/x` (the stage's input,
both CFG halves), `stageXX/logits` (CFG-combined, before top-k: what a token
sampler sees), `stageXX/idx`, `stageXX/f_hat`, `stageXX/next_input_latent`,
`diffusion/z`, `residual`, `final_tokens`, `f_hat_final`.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Union

import torch

from hart_fast.pruning import PrunePlan
from hart_fast.sampling import (cfg_combine, cfg_ratio, gumbel_mix, gumbel_mix_topk, kept_candidates,
                                multinomial_sample, multinomial_sample_topk, official_top_k)

TokenSampler = Callable[[int, torch.Tensor], torch.Tensor]


def generate_latent(tr, tok, backend, prompt_embeds, prompt_mask, *, guidance_scale, seed, top_k, top_p,
                    more_smooth, residual_diffusion, schedule, diffusion_temperature, residual_latents,
                    token_sampler: Optional[TokenSampler], trace: Optional[dict] = None,
                    diffusion_noise_fn=None, guidance_until: Optional[int] = None,
                    prune_ratios: Optional[Sequence[float]] = None, topk_sampling: bool = False) -> torch.Tensor:
    """The decoder's input latent f_hat (B, Cvae, P, P) float32 for validated inputs.

    tr / tok: the HartTransformer and HartTokenizer (on the run's device and dtype);
    schedule: the RespacedSchedule of the residual diffusion.
    """
    cfg = tr.cfg
    dev = tr.word_embed.weight.device
    dt = tr.word_embed.weight.dtype
    B, T, _ = prompt_embeds.shape
    S, P, Cvae = cfg.num_stages, cfg.patch_nums[-1], tok.Cvae
    codebook_f = tok.quantize.embedding.weight.float()                     # (V, Cvae), once per call
    seeds = row_seeds(seed, B)
    generators = [torch.Generator(device=dev).manual_seed(s) for s in seeds]  # one stream per row

    mask2, pos2 = cfg_doubled_mask_and_positions(prompt_mask, B, T, dev)
    cond_BTC = tr.condition(prompt_embeds.to(dev))                         # (2B, T, C)
    block_mods, head_mod = tr.modulations(cond_BTC, mask2)
    backend.begin(block_mods, head_mod, pos2, PrunePlan.build(cfg.patch_nums, prune_ratios))
    lvl_pos = tr.level_embeddings()                                        # (1, total, C)
    slices = tr.stage_slices()
    f_hat = torch.zeros(B, Cvae, P, P, device=dev, dtype=torch.float32)

    n_guided = guided_stages(guidance_until, S)

    x = cond_BTC + lvl_pos[:, :T]
    for si, pn in enumerate(cfg.patch_nums):
        last = si == S - 1
        ratio = cfg_ratio(si, S)
        guided = si < n_guided
        if si == n_guided:  # the unconditional branch ends here; the conditional rows go on alone
            backend.drop_unconditional()
            x = x[:B]
        t = guidance_scale * ratio if guided else None
        if trace is not None:
            trace[f"stage{si:02d}/x"] = x.clone()
        h, raw = backend.stage(si, x)
        if si == 0:
            raw = raw[:, -1:]  # the 1x1 map comes from the last context position
        k = official_top_k(si) if top_k is None else top_k
        if trace is not None:
            trace[f"stage{si:02d}/logits"] = cfg_combine(raw, t) if guided else raw.clone()
        # topk_sampling: random numbers for the k kept candidates only (same law).
        sparse = topk_sampling and 0 < k < raw.shape[-1]
        # The filtered logits (or their kept candidates) feed our draw and the Gumbel
        # mixture; a token_sampler draws from the unfiltered ones itself.
        needed = token_sampler is None or more_smooth
        # Unguided, no top-p: the kept candidates are the raw logits' top k (top-k
        # filtering first would only mask what topk drops anyway).
        raw_kept = sparse and t is None and not top_p > 0
        logits = backend.guide(raw, t, k, top_p) if needed and not raw_kept else None
        kept = kept_candidates(raw if raw_kept else logits, k) if needed and sparse else None
        if token_sampler is None:
            idx_Bl = multinomial_sample_topk(*kept, generators) if sparse else multinomial_sample(logits, generators)
        else:
            idx_Bl = _call_token_sampler(token_sampler, si, cfg_combine(raw, t) if guided else raw)
        if trace is not None:
            trace[f"stage{si:02d}/idx"] = idx_Bl.clone()
        if not more_smooth:
            h_BlC = codebook_f[idx_Bl]
        elif sparse:
            h_BlC = gumbel_mix_topk(*kept, raw.shape[-1], ratio, codebook_f, generators)
        else:
            h_BlC = gumbel_mix(logits, ratio, codebook_f, generators)
        if not last:
            h_BChw = h_BlC.transpose(1, 2).reshape(B, Cvae, pn, pn).to(dt)
            f_hat, nxt = backend.next_scale_input(si, f_hat, h_BChw)
            if trace is not None:
                trace[f"stage{si:02d}/f_hat"] = f_hat.clone()
                trace[f"stage{si:02d}/next_input_latent"] = nxt.clone()
            s_next, e_next = slices[si + 1]
            x = tr.word_embed(nxt.reshape(B, Cvae, -1).transpose(1, 2).to(dt)) + lvl_pos[:, s_next:e_next]
            if si + 1 < n_guided:
                x = x.repeat(2, 1, 1)  # both CFG halves see the same next-scale input
            continue
        # The last scale: discrete codes plus the continuous residual (no phi).
        tokens_BLC = h_BlC
        if residual_diffusion:
            tokens_BLC = h_BlC + residual_tokens(
                tr, backend, h, idx_Bl, codebook_f, t, seeds, schedule, diffusion_temperature,
                residual_latents, trace, diffusion_noise_fn,
            )
        final = tokens_BLC.transpose(1, 2).reshape(B, Cvae, P, P)
        if trace is not None:
            trace["final_tokens"] = final.clone()
        f_hat = f_hat + final
    if trace is not None:
        trace["f_hat_final"] = f_hat.clone()
    return f_hat


def residual_tokens(tr, backend, h_2BLC, idx_BL, codebook_f, t, seeds, schedule, temperature, residual_latents,
                    trace, noise_fn) -> torch.Tensor:
    """The residual diffusion of the last scale: (B, L, Cvae) float32.

    The MLP is conditioned on decoder_norm(h + word_embed(codebook[idx])) for
    both CFG halves and guided with the stage's t; t None (the last stage ran
    unguided, h_2BLC holds the conditional rows only): the sampler's unguided
    path (cfg 1), which reads only the first half of its doubled conditions.  Without noise_fn the noise
    is drawn per row on the CPU (`row_noise_fn`), so a seed gives the same
    residual on every device and in every batch.
    """
    B, L = idx_BL.shape
    dt = tr.word_embed.weight.dtype
    discrete = tr.word_embed(codebook_f[idx_BL].to(dt))
    if t is None:
        z = tr.decoder_norm(h_2BLC + discrete).reshape(B * L, -1)
        z, t = torch.cat([z, z]), 1.0
    else:
        z = tr.decoder_norm(h_2BLC + torch.cat([discrete, discrete], dim=0)).reshape(2 * B * L, -1)
    if trace is not None:
        trace["diffusion/z"] = z.clone()
    x_init = None if residual_latents is None else residual_latents.reshape(B * L, -1)
    if noise_fn is None:
        noise_fn = row_noise_fn(seeds, L, z.device)
    resid = backend.sample_residual(tr.diffloss.net, z, t, schedule, temperature=temperature,
                                    x_init_NC=x_init, noise_fn=noise_fn)
    resid = resid.float().view(B, L, -1)
    if trace is not None:
        trace["residual"] = resid.clone()
    return resid


def guided_stages(guidance_until: Optional[int], num_stages: int) -> int:
    """How many scales, from the first, run classifier-free guidance (all for None)."""
    if guidance_until is None:
        return num_stages
    if isinstance(guidance_until, bool) or not isinstance(guidance_until, int) \
            or not -num_stages <= guidance_until <= num_stages:
        raise ValueError(f"guidance_until must be None or an integer in [{-num_stages}, {num_stages}] for this "
                         f"model's {num_stages} scales (negative: counted from the end), got {guidance_until!r}")
    return guidance_until % num_stages if guidance_until < 0 else guidance_until


def first_rows(obj, B: int):
    """Tensors (in nested tuples / lists) with 2B rows cut to their first B: the
    conditional half of CFG-doubled per-row state; anything else unchanged."""
    if isinstance(obj, torch.Tensor):
        return obj[:B] if obj.dim() > 0 and obj.shape[0] == 2 * B else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(first_rows(o, B) for o in obj)
    return obj


def row_seeds(seed: Union[int, Sequence[int], None], B: int) -> List[int]:
    """The seed of every row: an int s gives s, s + 1, ..., s + B - 1 (row b of a
    batch seeded s is the image seeded s + b alone); a sequence gives one per row;
    None draws fresh ones."""
    if seed is None:
        return [int(v) for v in torch.randint(0, 2**62, (B,))]
    if isinstance(seed, int):
        return [seed + b for b in range(B)]
    seeds = [int(s) for s in seed]
    if len(seeds) != B:
        raise ValueError(f"seed: expected one seed per row ({B}), got {len(seeds)}")
    return seeds


def _diffusion_seed(seed: int) -> int:
    """The residual-diffusion stream of a row: a different stream than its token
    sampling (and than the next row's), from the same seed."""
    return (seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % 2**63


def row_noise_fn(seeds: Sequence[int], L: int, device):
    """noise_fn for the residual sampler with one CPU stream per row.

    The sampler asks for (k * B * L, C) draws (k = 1 or 2, see
    hart_fast.model.diffusion.sample_residual) of which it only ever reads the
    first B * L rows, the conditional half: row b's L tokens draw from row b's
    own generator; the unread rows are zeros (nothing drawn for them).
    """
    gens = [torch.Generator(device="cpu").manual_seed(_diffusion_seed(s)) for s in seeds]
    B = len(gens)

    def draw(shape):
        rows, C = shape
        cond = torch.cat([torch.randn(L, C, generator=g) for g in gens])
        out = cond if rows == B * L else torch.cat([cond, torch.zeros(rows - B * L, C)])
        return out.to(device)

    return draw


def cfg_doubled_mask_and_positions(prompt_mask, B: int, T: int, device):
    """Mask and position ids of the CFG-doubled batch: (2B, T) bool, (2B, T) int64.

    Position ids are cumsum(mask) - 1; the unconditional half has zero position
    ids and a mask of zeros except position 0 (the official convention).
    """
    mask = (torch.ones(B, T, dtype=torch.bool) if prompt_mask is None else prompt_mask.bool()).to(device)
    pos = torch.cumsum(mask.long(), dim=1) - 1
    pos2 = torch.cat((pos, torch.zeros_like(pos)), dim=0)
    mask2 = torch.cat((mask, torch.zeros_like(mask)), dim=0)
    mask2[B:, 0] = True
    return mask2, pos2


def _call_token_sampler(token_sampler: TokenSampler, si: int, logits_BlV: torch.Tensor) -> torch.Tensor:
    """The user's draw for stage si, checked: (B, l) int64 on the logits' device."""
    idx = token_sampler(si, logits_BlV)
    B, l, _ = logits_BlV.shape
    if not isinstance(idx, torch.Tensor) or tuple(idx.shape) != (B, l) or idx.dtype != torch.int64:
        raise ValueError(
            f"token_sampler must return an int64 tensor of shape {(B, l)} at stage {si}, got "
            f"{getattr(idx, 'dtype', type(idx).__name__)} {tuple(getattr(idx, 'shape', ()))}"
        )
    return idx.to(logits_BlV.device)


__all__ = ["TokenSampler", "generate_latent", "residual_tokens", "guided_stages", "first_rows", "row_seeds",
           "row_noise_fn",
           "cfg_doubled_mask_and_positions"]
