"""Training HART's hybrid tokenizer: encoder, multi-scale residual quantiser, decoder.

The quantiser is VAR's: at every scale the rest of the latent is area-resized to
pn x pn, snapped to the nearest code, bicubic-upsampled, passed through its phi
conv and subtracted. HART's hybrid last scale has no phi, and the continuous
residual (what the codes miss) is what the residual diffusion learns to draw.

Losses (per step):
- reconstruction (MSE + L1 on [-1, 1] pixels) of two decodes, HART's hybrid
  recipe: half the batch decodes the codes-only latent (straight-through to the
  encoder), the other half the continuous latent (codes + residual, which is the
  encoder's latent itself);
- VQ: codebook (codes toward the detached latent) and commitment (beta, latent
  toward the detached codes), averaged over the scales as VAR does.

With object_weight w > 0, pixels that differ from the image's background (the
median colour of its border ring) weigh 1 + w in the reconstruction losses: the
few object pixels of a scene otherwise count for little against its background.

Codes that no latent picked for `restart_every` steps are re-seeded from the
current batch's latents (dead-code restart), so a short run uses its codebook.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from hart_fast.model.tokenizer import HartTokenizer
from hart_fast.train.common import autocast_context


def quantize_for_training(tok: HartTokenizer, f_BChw: torch.Tensor, patch_nums: Sequence[int], beta: float
                          ) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
    """(f_hat_st, vq_loss, idx per scale, rest vectors per scale) for a latent f.

    f_hat_st is the codes-only latent with a straight-through gradient to f; its
    value is tokens_to_latent(idx) exactly.
    """
    B, C, H, W = f_BChw.shape
    hybrid = tok.cfg.quantizer_type == "var_hybrid"
    SN = len(patch_nums)
    f_ng = f_BChw.detach()
    f_rest = f_ng.clone()
    f_hat = torch.zeros_like(f_ng)
    vq = f_ng.new_zeros(())
    idx_list, rests = [], []
    for si, pn in enumerate(patch_nums):
        last = si == SN - 1
        rest = f_rest if last else F.interpolate(f_rest, size=(pn, pn), mode="area")
        rest_NC = rest.permute(0, 2, 3, 1).reshape(-1, C)
        with torch.no_grad():
            idx_N = tok.nearest_code(rest_NC)
        rests.append(rest_NC)
        h = tok.quantize.embedding(idx_N.view(B, pn, pn)).permute(0, 3, 1, 2)
        if not last:
            h = F.interpolate(h, size=(H, W), mode="bicubic")
        if not (hybrid and last):
            h = tok.quantize.phi(si, SN, h)
        f_hat = f_hat + h
        f_rest = f_rest - h.detach()
        vq = vq + F.mse_loss(f_hat, f_ng) + beta * F.mse_loss(f_hat.detach(), f_BChw)
        idx_list.append(idx_N.view(B, pn * pn))
    # Value f_hat; the encoder gets the decoder's gradient straight through, and the
    # codebook and phi convs get it too (through the lookups), not only from the VQ loss.
    f_hat_st = f_hat + (f_BChw - f_ng)
    return f_hat_st, vq / SN, idx_list, rests


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 image stacks (peak 255)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def to_uint8(img_pm1: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    x = img_pm1.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def reconstruct(tok: HartTokenizer, img_pm1: torch.Tensor, patch_nums: Sequence[int]) -> Dict[str, torch.Tensor]:
    """Codes-only and codes + residual reconstructions of images in [-1, 1]."""
    f = tok.img_to_latent(img_pm1)
    idx, resid = tok.latent_to_tokens(f, patch_nums)
    codes_only = tok.fhat_to_img(tok.tokens_to_latent(idx, patch_nums))
    with_resid = tok.fhat_to_img(tok.tokens_to_latent(idx, patch_nums, resid))
    return {"codes_only": codes_only, "with_residual": with_resid, "idx": idx, "residual": resid}


def object_mask(img_pm1: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """(N, 1, H, W) float: 1 where a pixel differs from its image's background colour
    (the per-channel median of the one-pixel border ring) by more than threshold."""
    border = torch.cat([img_pm1[:, :, 0, :], img_pm1[:, :, -1, :], img_pm1[:, :, 1:-1, 0], img_pm1[:, :, 1:-1, -1]],
                       dim=2)
    bg = border.median(dim=2).values[:, :, None, None]
    return ((img_pm1 - bg).abs().amax(dim=1, keepdim=True) > threshold).to(img_pm1.dtype)


class TokenizerStep:
    """step_fn for train_loop: one batch of images -> the tokenizer's losses.

    object_weight w: object pixels weigh 1 + w in the reconstruction losses (module
    docstring); mask_dilate k widens that mask to every pixel within k (Chebyshev)
    of an object pixel, so the background next to an object, where a blurred decode
    bleeds colour, weighs as much. edge_weight e adds e times the L1 of the error's
    horizontal and vertical pixel-to-pixel differences, each difference weighted by
    the weight of its right (lower) pixel (the one-sided pairing the sixth demo
    model was trained with; with k >= 1 the widened mask covers both sides of an
    edge anyway). Without object_weight, mask_dilate does nothing and the edge term
    is unweighted.

    hybrid_split: which images decode the codes-only latent and which the
    continuous one. "halves" (every demo model up to the seventh): the first half
    of the batch codes-only, the second continuous -- with a stream whose two halves
    are different kinds of scene (refine_images_fn: captioned first, crowded
    second) each path then sees one kind only, and the continuous path never a
    single small object on its background. "interleave": even images codes-only,
    odd ones continuous, so both paths see both kinds. "both": every image decoded
    from both latents (twice the decoder's work per step).

    decoder_only: train the decoder (and post_quant_conv) alone: the encoder, the
    codebook and the phi convs are frozen (the caller sets requires_grad), no VQ
    loss and no dead-code restarts, so every image keeps the codes and the residual
    it had -- a transformer trained on them stays valid.
    """

    def __init__(self, tok: HartTokenizer, images_fn, patch_nums, beta: float = 0.25, restart_every: int = 50,
                 object_weight: float = 0.0, autocast_dtype: Optional[torch.dtype] = None,
                 mask_dilate: int = 0, edge_weight: float = 0.0, hybrid_split: str = "halves",
                 decoder_only: bool = False):
        if hybrid_split not in ("halves", "interleave", "both"):
            raise ValueError(f"hybrid_split must be 'halves', 'interleave' or 'both', got {hybrid_split!r}")
        self.hybrid_split, self.decoder_only = hybrid_split, bool(decoder_only)
        self.tok, self.images_fn = tok, images_fn
        self.object_weight = float(object_weight)
        self.mask_dilate, self.edge_weight = int(mask_dilate), float(edge_weight)
        self.patch_nums = list(patch_nums)
        self.beta = beta
        self.restart_every = restart_every
        self.autocast_dtype = autocast_dtype
        # Code usage counts live on the tokenizer's device: no host sync per step.
        self.usage = torch.zeros(tok.V, device=tok.quantize.embedding.weight.device)
        self.initialised = False

    def state_dict(self):
        return {"usage": self.usage.cpu().clone(), "initialised": self.initialised}

    def load_state_dict(self, sd):
        self.usage = sd["usage"].clone().to(self.usage.device)
        self.initialised = bool(sd["initialised"])

    @torch.no_grad()
    def _seed_codes(self, rests: List[torch.Tensor], which: torch.Tensor):
        """Re-seed the codes `which` (bool (V,)) from random rest vectors of this batch."""
        pool = torch.cat(rests)
        n = int(which.sum())
        if n == 0:
            return
        pick = torch.randint(0, pool.shape[0], (n,)).to(pool.device)
        noise = 0.01 * pool.std() * torch.randn(n, pool.shape[1]).to(pool.device)
        self.tok.quantize.embedding.weight[which] = (pool[pick] + noise).to(self.tok.quantize.embedding.weight.dtype)

    def __call__(self, step: int) -> Dict[str, torch.Tensor]:
        tok = self.tok
        dev = tok.quantize.embedding.weight.device
        x = self.images_fn(step).to(dev)
        if self.decoder_only:
            return self._decoder_only_step(x)
        with autocast_context(dev.type, self.autocast_dtype):
            f = tok.img_to_latent(x).float()
        if not self.initialised:
            # First step: the codebook starts as latents of this batch (k-means++-free init).
            with torch.no_grad():
                rest_all = [F.interpolate(f, size=(pn, pn), mode="area").permute(0, 2, 3, 1).reshape(-1, f.shape[1])
                            for pn in self.patch_nums]
                self._seed_codes(rest_all, torch.ones(tok.V, dtype=torch.bool, device=f.device))
        self.initialised = True
        f_hat_st, vq, idx_list, rests = quantize_for_training(tok, f, self.patch_nums, self.beta)
        with torch.no_grad():
            for idx in idx_list:
                self.usage += torch.bincount(idx.reshape(-1), minlength=tok.V).float()
        if (step + 1) % self.restart_every == 0:
            self._seed_codes([r.detach() for r in rests], self.usage == 0)
            self.usage.zero_()
        rec_loss, mse, l1 = self._reconstruction_loss(x, self._hybrid_latent(f_hat_st, f))
        loss = rec_loss + vq
        with torch.no_grad():
            used = sum((torch.bincount(i.reshape(-1), minlength=tok.V) > 0).sum() for i in idx_list[-2:])
        return {"loss": loss, "mse": mse, "l1": l1, "vq": vq, "codes_used": used.float()}

    def _hybrid_latent(self, f_hat_BChw: torch.Tensor, f_BChw: torch.Tensor) -> torch.Tensor:
        """HART's hybrid training: the codes-only latent for half of the images, the
        continuous one for the other half (a batch of one flips a coin per step, as
        the official recipe does per batch); which half: hybrid_split."""
        B = f_BChw.shape[0]
        if self.hybrid_split == "both":
            return torch.cat([f_hat_BChw, f_BChw])
        if B == 1:
            return f_hat_BChw if bool(torch.rand(()) < 0.5) else f_BChw
        if self.hybrid_split == "halves":
            return torch.cat([f_hat_BChw[:B // 2], f_BChw[B // 2:]])
        odd_B = (torch.arange(B, device=f_BChw.device) % 2 == 1).view(B, 1, 1, 1)
        return torch.where(odd_B, f_BChw, f_hat_BChw)

    def _decoder_only_step(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        tok = self.tok
        with torch.no_grad(), autocast_context(x.device.type, self.autocast_dtype):
            f = tok.img_to_latent(x).float()
        with torch.no_grad():
            # Codes and residual as inference computes them; the decoder learns to draw both.
            idx, _ = tok.latent_to_tokens(f, self.patch_nums)
            f_hat = tok.tokens_to_latent(idx, self.patch_nums).float()
        rec_loss, mse, l1 = self._reconstruction_loss(x, self._hybrid_latent(f_hat, f))
        return {"loss": rec_loss, "mse": mse, "l1": l1}

    def _reconstruction_loss(self, x: torch.Tensor, z: torch.Tensor):
        """(weighted reconstruction loss, plain MSE, plain L1) of decoding latents z against x
        (z may hold each image's latents twice: x is repeated to match)."""
        tok = self.tok
        if z.shape[0] != x.shape[0]:
            x = x.repeat(z.shape[0] // x.shape[0], 1, 1, 1)
        with autocast_context(x.device.type, self.autocast_dtype):
            rec = tok.decoder(tok.post_quant_conv(z)).float()
        mse = F.mse_loss(rec, x)
        l1 = F.l1_loss(rec, x)
        if self.object_weight:
            m = object_mask(x)
            if self.mask_dilate:
                k = 2 * self.mask_dilate + 1
                m = F.max_pool2d(m, k, stride=1, padding=self.mask_dilate)
            w = 1 + self.object_weight * m
            w = w / w.mean()  # the same overall scale as the unweighted losses
            rec_loss = (w * (rec - x) ** 2).mean() + (w * (rec - x).abs()).mean()
        else:
            w = None
            rec_loss = mse + l1
        if self.edge_weight:
            d_N3HW = rec - x
            gx_N3HW1 = d_N3HW[..., :, 1:] - d_N3HW[..., :, :-1]
            gy_N3H1W = d_N3HW[..., 1:, :] - d_N3HW[..., :-1, :]
            if w is not None:  # w: (N, 1, H, W), broadcast over the colour channels
                gx_N3HW1, gy_N3H1W = gx_N3HW1 * w[..., :, 1:], gy_N3H1W * w[..., 1:, :]
            edge = gx_N3HW1.abs().mean() + gy_N3H1W.abs().mean()
            rec_loss = rec_loss + self.edge_weight * edge
        return rec_loss, mse, l1


__all__ = ["quantize_for_training", "object_mask", "reconstruct", "TokenizerStep", "psnr_uint8", "to_uint8"]
