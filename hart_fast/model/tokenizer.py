"""HART's hybrid tokenizer, reference form: VQGAN conv encoder/decoder and the
multi-scale residual quantiser (VAR) with HART's continuous last-scale residual.

Module names follow the official `HARTAutoEncoder` state dict (the file stores
them under `vae.`). The encoder and `quant_conv` are optional: the reference
folders are decode-only, and generation never needs them.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from hart_fast.config import TokenizerConfig, phi_index


def Normalize(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=c, eps=1e-6, affine=True)


class Upsample2x(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Downsample2x(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, pad=(0, 1, 0, 1), mode="constant", value=0))


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = Normalize(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.norm2 = Normalize(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1, 1, 0) if c_in != c_out else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels (materialised HW x HW, as the official code)."""

    def __init__(self, c: int):
        super().__init__()
        self.C = c
        self.norm = Normalize(c)
        self.qkv = nn.Conv2d(c, 3 * c, 1, 1, 0)
        self.w_ratio = int(c) ** (-0.5)
        self.proj_out = nn.Conv2d(c, c, 1, 1, 0)

    def forward(self, x):
        qkv = self.qkv(self.norm(x))
        B, _, H, W = qkv.shape
        C = self.C
        q, k, v = qkv.reshape(B, 3, C, H, W).unbind(1)
        q = q.reshape(B, C, H * W).permute(0, 2, 1)                   # (B, HW, C)
        k = k.reshape(B, C, H * W)                                     # (B, C, HW)
        w = torch.bmm(q, k).mul_(self.w_ratio)                         # (B, HWq, HWk)
        w = F.softmax(w, dim=2)
        v = v.reshape(B, C, H * W)
        h = torch.bmm(v, w.permute(0, 2, 1))                           # (B, C, HWq)
        return x + self.proj_out(h.view(B, C, H, W))


class _Level(nn.Module):
    pass


class Encoder(nn.Module):
    def __init__(self, ch: int, ch_mult: Sequence[int], z_channels: int, num_res_blocks: int = 2):
        super().__init__()
        n = len(ch_mult)
        self.num_resolutions, self.num_res_blocks = n, num_res_blocks
        self.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
        in_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for i in range(n):
            lvl = _Level()
            lvl.block, lvl.attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_mult[i], ch * ch_mult[i]
            for _ in range(num_res_blocks):
                lvl.block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if i == n - 1:
                    lvl.attn.append(AttnBlock(block_in))
            if i != n - 1:
                lvl.downsample = Downsample2x(block_in)
            self.down.append(lvl)
        self.mid = _Level()
        self.mid.block_1 = ResnetBlock(block_in, block_in)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for i, lvl in enumerate(self.down):
            for j in range(self.num_res_blocks):
                h = lvl.block[j](h)
                if len(lvl.attn) > 0:
                    h = lvl.attn[j](h)
            if i != self.num_resolutions - 1:
                h = lvl.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch: int, ch_mult: Sequence[int], z_channels: int, num_res_blocks: int = 2):
        super().__init__()
        n = len(ch_mult)
        self.num_resolutions, self.num_res_blocks = n, num_res_blocks
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, 1, 1)
        self.mid = _Level()
        self.mid.block_1 = ResnetBlock(block_in, block_in)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in)
        ups = []
        for i in reversed(range(n)):
            lvl = _Level()
            lvl.block, lvl.attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i]
            for _ in range(num_res_blocks + 1):
                lvl.block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if i == n - 1:
                    lvl.attn.append(AttnBlock(block_in))
            if i != 0:
                lvl.upsample = Upsample2x(block_in)
            ups.insert(0, lvl)
        self.up = nn.ModuleList(ups)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 3, 3, 1, 1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for i in reversed(range(self.num_resolutions)):
            lvl = self.up[i]
            for j in range(self.num_res_blocks + 1):
                h = lvl.block[j](h)
                if len(lvl.attn) > 0:
                    h = lvl.attn[j](h)
            if i != 0:
                h = lvl.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Phi(nn.Conv2d):
    """3x3 conv blended with its input: x*(1-r) + conv(x)*r."""

    def __init__(self, c: int, ratio: float):
        super().__init__(c, c, 3, 1, 1)
        self.resi_ratio = abs(ratio)

    def forward(self, h):
        return h.mul(1 - self.resi_ratio) + super().forward(h).mul_(self.resi_ratio)


class _PhiShared(nn.Module):
    def __init__(self, phi):
        super().__init__()
        self.qresi = phi


class _PhiPartiallyShared(nn.Module):
    def __init__(self, phis):
        super().__init__()
        self.qresi_ls = nn.ModuleList(phis)


class Quantizer(nn.Module):
    """Codebook plus the phi convs (names as the official VectorQuantizer2)."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.Cvae)
        k = cfg.num_phi
        if k == 0:
            self.phis: List[nn.Module] = []
        elif cfg.share_quant_resi == 0:
            self.quant_resi = nn.ModuleList([Phi(cfg.Cvae, cfg.quant_resi) for _ in range(k)])
            self.phis = list(self.quant_resi)
        elif cfg.share_quant_resi == 1:
            self.quant_resi = _PhiShared(Phi(cfg.Cvae, cfg.quant_resi))
            self.phis = [self.quant_resi.qresi]
        else:
            self.quant_resi = _PhiPartiallyShared([Phi(cfg.Cvae, cfg.quant_resi) for _ in range(k)])
            self.phis = list(self.quant_resi.qresi_ls)

    def phi(self, si: int, num_stages: int, h_BChw: torch.Tensor) -> torch.Tensor:
        if not self.phis:
            return h_BChw  # quant_resi ~ 0: identity, as the official nn.Identity
        return self.phis[phi_index(self.cfg, si, num_stages)](h_BChw)


class HartTokenizer(nn.Module):
    """Decoder (always) and encoder (when its weights were loaded)."""

    def __init__(self, cfg: TokenizerConfig, with_encoder: bool = True):
        super().__init__()
        self.cfg = cfg
        self.Cvae, self.V = cfg.Cvae, cfg.vocab_size
        ks = cfg.quant_conv_ks
        self.has_encoder = with_encoder
        if with_encoder:
            self.encoder = Encoder(cfg.ch, cfg.ch_mult, cfg.z_channels)
            self.quant_conv = nn.Conv2d(cfg.Cvae, cfg.Cvae, ks, 1, ks // 2)
        self.decoder = Decoder(cfg.ch, cfg.ch_mult, cfg.z_channels)
        self.post_quant_conv = nn.Conv2d(cfg.Cvae, cfg.Cvae, ks, 1, ks // 2)
        self.quantize = Quantizer(cfg)

    # -- decode side -----------------------------------------------------------

    def next_scale_input(self, si: int, patch_nums, f_hat, h_BChw):
        """After stage si (not last): f_hat += phi(bicubic_up(h)); return f_hat, area_down(f_hat)."""
        HW = patch_nums[-1]
        h = self.quantize.phi(si, len(patch_nums), F.interpolate(h_BChw, size=(HW, HW), mode="bicubic"))
        f_hat.add_(h)
        pn_next = patch_nums[si + 1]
        return f_hat, F.interpolate(f_hat, size=(pn_next, pn_next), mode="area")

    def fhat_to_img(self, f_hat):
        """Latent -> image in [-1, 1]."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp_(-1, 1)

    # -- encode side -------------------------------------------------------------

    def _require_encoder(self):
        if not self.has_encoder:
            raise RuntimeError(
                "this tokenizer was loaded without encoder weights (a decode-only folder: "
                "no 'vae.encoder.*' / 'vae.quant_conv.*' keys), so it cannot encode images; "
                "load a tokenizer folder that contains the full autoencoder"
            )

    def img_to_latent(self, img_pm1: torch.Tensor) -> torch.Tensor:
        """Image (B, 3, H, W) in [-1, 1] -> continuous latent f (B, Cvae, H/ds, W/ds)."""
        self._require_encoder()
        return self.quant_conv(self.encoder(img_pm1))

    def nearest_code(self, z_NC: torch.Tensor) -> torch.Tensor:
        E_VC = self.quantize.embedding.weight
        if self.cfg.using_znorm:
            return torch.argmax(F.normalize(z_NC, dim=-1) @ F.normalize(E_VC.T, dim=0), dim=1)
        d = torch.sum(z_NC.square(), dim=1, keepdim=True) + torch.sum(E_VC.square(), dim=1, keepdim=False)
        d.addmm_(z_NC, E_VC.T, alpha=-2, beta=1)
        return torch.argmin(d, dim=1)

    def latent_to_tokens(self, f_BChw: torch.Tensor, patch_nums: Sequence[int]):
        """Multi-scale residual quantisation of a latent.

        Returns (idx_list, residual_BLC): one (B, pn*pn) int64 code map per scale and
        the continuous residual of the last scale, (B, L_last, Cvae), such that
        generating with these codes and `residual_latents`-free residual gives back f.
        For 'var_hybrid' the last scale has no phi (HART); for 'var' it does (VAR).
        """
        B, C, H, W = f_BChw.shape
        if patch_nums[-1] != H or H != W:
            raise ValueError(f"latent is {H}x{W}, but the last scale is {patch_nums[-1]}x{patch_nums[-1]}")
        hybrid = self.cfg.quantizer_type == "var_hybrid"
        f_rest = f_BChw.detach().clone()
        SN = len(patch_nums)
        idx_list = []
        residual = None
        for si, pn in enumerate(patch_nums):
            last = si == SN - 1
            rest = f_rest if last else F.interpolate(f_rest, size=(pn, pn), mode="area")
            idx_N = self.nearest_code(rest.permute(0, 2, 3, 1).reshape(-1, C))
            h = self.quantize.embedding(idx_N.view(B, pn, pn)).permute(0, 3, 1, 2)
            h = F.interpolate(h, size=(H, W), mode="bicubic").contiguous()
            if not (hybrid and last):
                h = self.quantize.phi(si, SN, h)
            if last:
                residual = (f_rest - h).permute(0, 2, 3, 1).reshape(B, -1, C)
            f_rest.sub_(h)
            idx_list.append(idx_N.reshape(B, pn * pn))
        return idx_list, residual

    def tokens_to_latent(self, idx_list, patch_nums, residual_BLC: Optional[torch.Tensor] = None):
        """Inverse of latent_to_tokens (the generation loop's f_hat with given codes)."""
        B = idx_list[0].shape[0]
        P = patch_nums[-1]
        f_hat = self.quantize.embedding.weight.new_zeros(B, self.Cvae, P, P)
        SN = len(patch_nums)
        for si, pn in enumerate(patch_nums[:-1]):
            h = self.quantize.embedding(idx_list[si]).transpose(1, 2).reshape(B, self.Cvae, pn, pn)
            f_hat, _ = self.next_scale_input(si, patch_nums, f_hat, h)
        last = self.quantize.embedding(idx_list[-1])
        if residual_BLC is not None:
            last = last + residual_BLC
        last = last.transpose(1, 2).reshape(B, self.Cvae, P, P)
        if self.cfg.quantizer_type != "var_hybrid":
            last = self.quantize.phi(SN - 1, SN, last)
        return f_hat + last
