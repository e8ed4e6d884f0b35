"""Training HART's AR transformer and its residual-diffusion MLP.

Teacher forcing over every scale in one block-causal pass
(`HartTransformer.forward_full`, the same op the cached loop is checked
against): the input of scale si >= 1 is word_embed(area-resize of f_hat after
the ground-truth codes of scales < si), built by the tokenizer's own
`next_scale_input`, exactly as generation builds it from sampled codes. The
outputs at the last context position and at every image position predict the
codes of the scales (cross-entropy over all of them, equally weighted).

Condition dropout: a dropped row becomes the official unconditional input of
the sampler -- zero context, a mask of position 0 only, zero position ids -- so
what classifier-free guidance subtracts at inference is what training saw.

The residual MLP trains as the official DiffLoss: its condition is
decoder_norm(h_last + word_embed(codebook[idx])) with idx sampled from the
model's own last-scale logits (top-k 600, top-p 0.96, as the official trainer),
and its target is what those codes leave of the latent's last-scale rest.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from hart_fast.model.transformer import HartTransformer
from hart_fast.sampling import filter_top_k_top_p_, official_top_k
from hart_fast.train.common import autocast_context, step_seed
from hart_fast.train.diffusion_loss import DiffusionTrainingSchedule, diffusion_loss, guided_diffusion_loss


@torch.no_grad()
def teacher_forcing_inputs(tok, idx_list: Sequence[torch.Tensor], patch_nums: Sequence[int]) -> torch.Tensor:
    """(B, L - 1, Cvae) float32: the next-scale inputs of scales 1.. from ground-truth codes."""
    B = idx_list[0].shape[0]
    P, C = patch_nums[-1], tok.Cvae
    E = tok.quantize.embedding.weight.float()
    f_hat = E.new_zeros(B, C, P, P)
    out = []
    for si, pn in enumerate(patch_nums[:-1]):
        h = E[idx_list[si]].transpose(1, 2).reshape(B, C, pn, pn)
        f_hat, nxt = tok.next_scale_input(si, patch_nums, f_hat, h)
        out.append(nxt.reshape(B, C, -1).transpose(1, 2))
    return torch.cat(out, dim=1)


@torch.no_grad()
def encode_images(tok, images_pm1: torch.Tensor, patch_nums: Sequence[int]) -> Dict[str, torch.Tensor]:
    """What the transformer trains on, per image: codes of every scale (B, L) int64,
    the teacher-forcing inputs (B, L - 1 - ..., Cvae) and the last scale's rest (B, P*P, Cvae)."""
    f = tok.img_to_latent(images_pm1.float())
    idx_list, resid = tok.latent_to_tokens(f, patch_nums)
    last_rest = resid + tok.quantize.embedding.weight.float()[idx_list[-1]]
    return {"idx": torch.cat(idx_list, dim=1), "x_in": teacher_forcing_inputs(tok, idx_list, patch_nums),
            "last_rest": last_rest}


def uncond_rows_(ctx_BTD: torch.Tensor, mask_BT: torch.Tensor, drop_B: torch.Tensor):
    """Turn rows drop_B into the sampler's unconditional input (in place); returns (ctx, mask, pos)."""
    ctx_BTD[drop_B] = 0
    mask_BT[drop_B] = False
    mask_BT[drop_B, 0] = True
    pos = torch.cumsum(mask_BT.long(), dim=1) - 1
    pos[drop_B] = 0
    return ctx_BTD, mask_BT, pos


def full_pass(tr: HartTransformer, ctx_BTD, mask_BT, pos_BT, x_in_BLC):
    """Teacher-forced hidden states (B, T + L - 1, C) and logits of every code (B, L, V)."""
    T = ctx_BTD.shape[1]
    cond = tr.context_embed(tr.context_norm(ctx_BTD.float()).to(tr.context_embed.weight.dtype))
    mods, head_mod = tr.modulations(cond, mask_BT)
    lvl = tr.level_embeddings()
    x = torch.cat([cond + lvl[:, :T], tr.word_embed(x_in_BLC.to(tr.word_embed.weight.dtype)) + lvl[:, T:]], dim=1)
    h = tr.forward_full(x, mods, pos_BT)
    return h, tr.logits(h[:, T - 1:], head_mod)


class TransformerStep:
    """step_fn for train_loop over an encoded dataset.

    data: idx (N, L), x_in (N, L - 1, Cvae), last_rest (N, P*P, Cvae), caption (N,) int
    indices into embeds (U, T, D) / masks (U, T).
    """

    def __init__(self, tr: HartTransformer, codebook_VC: torch.Tensor, data: Dict[str, torch.Tensor],
                 embeds: torch.Tensor, masks: torch.Tensor, batch: int, seed: int, cond_drop: float = 0.1,
                 diffusion: bool = True, device="cpu", autocast_dtype: Optional[torch.dtype] = None):
        self.tr, self.E = tr, codebook_VC.float().to(device)
        self.data, self.embeds, self.masks = data, embeds, masks
        self.batch, self.seed, self.cond_drop = batch, seed, cond_drop
        self.diffusion = diffusion
        self.device, self.autocast_dtype = device, autocast_dtype
        self.sched = DiffusionTrainingSchedule()
        self.N = data["idx"].shape[0]
        P = tr.cfg.patch_nums[-1]
        self.last = P * P

    def batch_at(self, step: int):
        g = torch.Generator().manual_seed(step_seed(self.seed, step, 2))
        rows = torch.randint(0, self.N, (self.batch,), generator=g)
        drop = torch.rand(self.batch, generator=g) < self.cond_drop
        d = {k: v[rows] for k, v in self.data.items()}
        ctx = self.embeds[d["caption"]].float().clone()
        mask = self.masks[d["caption"]].clone()
        ctx, mask, pos = uncond_rows_(ctx, mask, drop)
        return d, ctx, mask, pos, g

    def __call__(self, step: int) -> Dict[str, torch.Tensor]:
        tr, dev = self.tr, self.device
        d, ctx, mask, pos, g = self.batch_at(step)
        with autocast_context(dev, self.autocast_dtype):
            h, logits = full_pass(tr, ctx.to(dev), mask.to(dev), pos.to(dev), d["x_in"].to(dev))
        idx = d["idx"].to(dev)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), idx.reshape(-1))
        with torch.no_grad():
            acc = (logits[:, -self.last:].argmax(-1) == idx[:, -self.last:]).float().mean()
        out = {"ce": ce, "acc_last": acc}
        loss = ce
        if self.diffusion:
            with torch.no_grad():
                lg = filter_top_k_top_p_(logits[:, -self.last:].float().clone(), min(600, tr.V), 0.96)
                probs = lg.softmax(-1).reshape(-1, tr.V)
                gs = torch.Generator(device=probs.device).manual_seed(step_seed(self.seed, step, 4))
                sampled = torch.multinomial(probs, 1, generator=gs).view(self.batch, self.last)
            discrete = self.E[sampled]                                         # (B, P*P, Cvae)
            with autocast_context(dev, self.autocast_dtype):
                z = tr.decoder_norm(h[:, -self.last:] + tr.word_embed(discrete.to(tr.word_embed.weight.dtype)))
                target = d["last_rest"].to(dev).float() - discrete
                gd = torch.Generator(device=dev).manual_seed(step_seed(self.seed, step, 3))
                # As the official forward_diff_loss: every (condition, target) pair is
                # used diffusion_batch_mul times, with its own timestep and noise each.
                k = max(1, int(tr.cfg.diffusion_batch_mul))
                dl = diffusion_loss(tr.diffloss.net, target.reshape(-1, target.shape[-1]).repeat(k, 1),
                                    z.reshape(-1, z.shape[-1]).repeat(k, 1), self.sched, generator=gd)
            out["diff"] = dl
            loss = loss + dl
        out["loss"] = loss
        return out


class ResidualStep:
    """step_fn for train_loop: the residual MLP alone, the transformer frozen.

    Every row runs the teacher-forced pass twice, with its caption and as the
    sampler's unconditional input, and gets a guidance scale w drawn from
    [0, guidance_max]. Its last-scale codes are drawn as inference draws them at
    that scale: from the guided logits (1 + w) cond - w uncond with the official
    top-k of the stage. The target is what those codes leave of the latent, and the
    MLP learns it under both conditions and under their guided combination at the
    same w (`guided_diffusion_loss`): what inference draws. (The joint stage,
    like the official trainer, conditions on unguided draws; the residual it then
    learns corrects the errors of those draws, which guided draws make less often,
    and under guidance it dulled the objects' colours: BENCHMARKS.md, "The residual
    under guidance".)
    """

    def __init__(self, tr: HartTransformer, codebook_VC: torch.Tensor, data: Dict[str, torch.Tensor],
                 embeds: torch.Tensor, masks: torch.Tensor, batch: int, seed: int, guidance_max: float = 5.0,
                 guided_weight: float = 1.0, device="cpu", autocast_dtype: Optional[torch.dtype] = None):
        self.tr, self.E = tr, codebook_VC.float().to(device)
        self.data, self.embeds, self.masks = data, embeds, masks
        self.batch, self.seed, self.guidance_max = batch, seed, float(guidance_max)
        self.guided_weight = float(guided_weight)
        self.device, self.autocast_dtype = device, autocast_dtype
        self.sched = DiffusionTrainingSchedule()
        self.N = data["idx"].shape[0]
        P = tr.cfg.patch_nums[-1]
        self.last = P * P
        self.top_k = min(official_top_k(len(tr.cfg.patch_nums) - 1), tr.V)

    def __call__(self, step: int) -> Dict[str, torch.Tensor]:
        tr, dev, B, L = self.tr, self.device, self.batch, self.last
        g = torch.Generator().manual_seed(step_seed(self.seed, step, 5))
        rows = torch.randint(0, self.N, (B,), generator=g)
        w_B = self.guidance_max * torch.rand(B, generator=g)
        d = {k: v[rows] for k, v in self.data.items()}
        ctx = self.embeds[d["caption"]].float().repeat(2, 1, 1)
        mask = self.masks[d["caption"]].repeat(2, 1)
        ctx, mask, pos = uncond_rows_(ctx, mask, torch.arange(2 * B) >= B)
        with torch.no_grad(), autocast_context(dev, self.autocast_dtype):
            h, logits = full_pass(tr, ctx.to(dev), mask.to(dev), pos.to(dev), d["x_in"].to(dev).repeat(2, 1, 1))
            lg = logits[:, -L:].float()
            w = w_B.to(dev)[:, None, None]
            guided = filter_top_k_top_p_((1 + w) * lg[:B] - w * lg[B:], self.top_k, 0.0)
            gs = torch.Generator(device=lg.device).manual_seed(step_seed(self.seed, step, 6))
            sampled = torch.multinomial(guided.softmax(-1).reshape(-1, tr.V), 1, generator=gs).view(B, L)
            discrete = self.E[sampled]                                          # (B, P*P, Cvae)
            e = tr.word_embed(discrete.to(tr.word_embed.weight.dtype)).repeat(2, 1, 1)
            z = tr.decoder_norm(h[:, -L:] + e).float()                         # (2B, P*P, D)
        target = d["last_rest"].to(dev).float() - discrete
        k = max(1, int(tr.cfg.diffusion_batch_mul))
        D = z.shape[-1]
        gd = torch.Generator(device=dev).manual_seed(step_seed(self.seed, step, 7))
        with autocast_context(dev, self.autocast_dtype):
            return guided_diffusion_loss(tr.diffloss.net, target.reshape(-1, target.shape[-1]).repeat(k, 1),
                                         z[:B].reshape(-1, D).repeat(k, 1), z[B:].reshape(-1, D).repeat(k, 1),
                                         self.sched, w_B.to(dev).repeat_interleave(L).repeat(k),
                                         self.guided_weight, generator=gd)


def encode_captions(encoder, captions: List[str], batch: int = 256):
    """Unique captions -> (embeds (U, T, D) float32, masks (U, T) bool), through the
    same text-encoder object generation uses."""
    embs, masks = [], []
    for i in range(0, len(captions), batch):
        e, m = encoder(captions[i:i + batch])
        embs.append(e.float().cpu())
        masks.append(m.bool().cpu())
    return torch.cat(embs), torch.cat(masks)


__all__ = ["teacher_forcing_inputs", "encode_images", "uncond_rows_", "full_pass", "TransformerStep",
           "ResidualStep", "encode_captions"]
