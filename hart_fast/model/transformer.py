"""The HART autoregressive transformer, reference form (plain PyTorch).

Module and parameter names follow the official `HARTForT2I` state dict, so the
official checkpoints load key for key. The KV cache is preallocated for the
whole sequence (context + every scale) and both CFG halves; a stage writes its
keys at its offset, nothing grows with `torch.cat`.

Shapes: B = batch including the CFG doubling, T = context tokens, l = tokens
of the current stage, C = embed dim, H = heads, d = head dim, S = stages.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from hart_fast.config import TransformerConfig
from hart_fast.model.diffusion import SimpleMLPAdaLN, TimestepEmbedder

ROPE_BASE = 10000


class RMSNorm(nn.Module):
    """HART's fused RMSNorm: normalise in float32, round to the input dtype, times weight.

    The official module ignores `elementwise_affine=False`: the weight always
    exists and is always applied.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_f = x.float()
        inv_rms = torch.rsqrt(x_f.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x_f * inv_rms).to(x.dtype) * self.weight.to(x.dtype)


# ---------------------------------------------------------------------------
# Rotary embeddings. cos/sin are computed once per stage and shared by all blocks.
# ---------------------------------------------------------------------------


def _inv_freq(head_dim: int, stride: int) -> torch.Tensor:
    return 1.0 / (ROPE_BASE ** (torch.arange(0, head_dim, stride, dtype=torch.int64).float() / head_dim))


def rope_1d(position_ids_BL: torch.Tensor, head_dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Llama RoPE for context tokens: cos, sin (B, L, d) float32."""
    inv = _inv_freq(head_dim, 2).to(position_ids_BL.device)                # (d/2,)
    freqs_BLh = position_ids_BL.float()[..., None] * inv                   # one rounding, as the K=1 matmul
    emb = torch.cat((freqs_BLh, freqs_BLh), dim=-1)
    return emb.cos(), emb.sin()


def rope_2d(pos_BL2: torch.Tensor, head_dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """HART's 2-D RoPE for image tokens: cos, sin (B, L, d) float32.

    Frequencies have stride 4 over head_dim; the first half of d rotates with
    the row coordinate, the second half with the column coordinate, each half
    laid out as [f, f] (the official cat-then-transpose order).
    """
    inv = _inv_freq(head_dim, 4).to(pos_BL2.device)                          # (d/4,)
    f_row = pos_BL2[..., 0:1] * inv                                           # (B, L, d/4)
    f_col = pos_BL2[..., 1:2] * inv
    emb = torch.cat((f_row, f_row, f_col, f_col), dim=-1)                     # (B, L, d)
    return emb.cos(), emb.sin()


def image_positions(pn: int, last_pn: int, offset_B: torch.Tensor) -> torch.Tensor:
    """Grid positions of a pn x pn stage on the last grid, plus the context offset: (B, pn*pn, 2)."""
    ar = torch.arange(pn, device=offset_B.device)
    grid = torch.stack(torch.meshgrid(ar, ar, indexing="ij"), dim=-1)         # (pn, pn, 2) int
    coords = (grid / pn * last_pn).reshape(1, -1, 2)                         # float32, official order
    return coords + offset_B.view(-1, 1, 1)


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x_BHLd, cos_BLd, sin_BLd):
    cos = cos_BLd.to(x_BHLd.dtype).unsqueeze(1)
    sin = sin_BLd.to(x_BHLd.dtype).unsqueeze(1)
    return x_BHLd * cos + rotate_half(x_BHLd) * sin


# ---------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------


class KVCache:
    """Static per-layer K and V buffers (B, H, total_len, d) written at stage offsets."""

    def __init__(self, depth, B, H, total_len, d, device, dtype):
        self.k = [torch.zeros(B, H, total_len, d, device=device, dtype=dtype) for _ in range(depth)]
        self.v = [torch.zeros(B, H, total_len, d, device=device, dtype=dtype) for _ in range(depth)]
        self.total_len = total_len

    def write(self, layer: int, start: int, k_BHld, v_BHld):
        end = start + k_BHld.shape[2]
        self.k[layer][:, :, start:end] = k_BHld
        self.v[layer][:, :, start:end] = v_BHld
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


# ---------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------


class LlamaAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        C, self.H, self.d = cfg.embed_dim, cfg.num_heads, cfg.head_dim
        self.qkv_proj = nn.Linear(C, 3 * C, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(C))
        self.v_bias = nn.Parameter(torch.zeros(C))
        self.register_buffer("zero_k_bias", torch.zeros(C))
        self.proj = nn.Linear(C, C)
        self.attn_l2_norm = cfg.attn_l2_norm
        if self.attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, self.H, 1, 1), 4.0).log())
            self.max_scale_mul = torch.log(torch.tensor(100)).item()
        else:
            self.scale = 0.25 / self.d ** 0.5

    def forward(self, x_BlC, rope, cache: Optional[KVCache], layer: int, start: int, attn_mask=None):
        B, l, C = x_BlC.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x_BlC, self.qkv_proj.weight, bias).view(B, l, 3, self.H, self.d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                       # (B, H, l, d) each
        if self.attn_l2_norm:
            scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            q = F.normalize(q, dim=-1).mul(scale_mul)
            k = F.normalize(k, dim=-1)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.write(layer, start, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(B, l, C))


class FFN(nn.Module):
    """gpt2 MLP: fc1 -> GELU(tanh) -> fc2."""

    def __init__(self, C: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(C, hidden)
        self.fc2 = nn.Linear(hidden, C)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class LlamaMLP(nn.Module):
    """SwiGLU MLP without biases."""

    def __init__(self, C: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(C, hidden, bias=False)
        self.up_proj = nn.Linear(C, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, C, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def pool_condition(cond_BTD: torch.Tensor, mask_BT: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool the per-token condition over the context: (B, T, D) -> (B, D)."""
    if mode == "max":
        return cond_BTD.max(1).values
    c_mask = mask_BT.unsqueeze(-1)
    cond = cond_BTD * c_mask.to(cond_BTD.dtype)
    cond = cond / c_mask.sum(1).clamp_(1).unsqueeze(1)
    return cond.sum(1)


class AdaLNSelfAttn(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        C = cfg.embed_dim
        self.C = C
        self.disable_aln, self.shared_aln = cfg.disable_aln, cfg.shared_aln
        self.pooling = cfg.sep_aln_pooling_mode
        self.attn = LlamaAttention(cfg)
        self.ffn = FFN(C, cfg.ffn_hidden) if cfg.mlp_type == "gpt2" else LlamaMLP(C, cfg.ffn_hidden)
        self.ln_wo_grad = RMSNorm(C, eps=cfg.norm_eps)
        if not self.disable_aln:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        elif self.shared_aln:
            self.scale_shift_table = nn.Parameter(torch.randn(6, C) / C ** 0.5)

    def modulation(self, cond_BTD, mask_BT) -> Optional[Tuple[torch.Tensor, ...]]:
        """(gamma1, gamma2, scale1, scale2, shift1, shift2), each (B, 1, C); None without AdaLN.

        Depends only on the condition, so the generation loop computes it once per image.
        """
        if not self.disable_aln:
            condition = pool_condition(cond_BTD, mask_BT, self.pooling).unsqueeze(1)
            return self.ada_lin(condition).view(-1, 1, 6, self.C).unbind(2)
        if self.shared_aln:
            condition = pool_condition(cond_BTD, mask_BT, "avg")
            return (self.scale_shift_table[None] + condition.unsqueeze(1)).chunk(6, dim=1)
        return None

    def forward(self, x, mod, rope, cache, layer, start, attn_mask=None):
        if mod is None:
            x = x + self.attn(self.ln_wo_grad(x), rope, cache, layer, start, attn_mask)
            return x + self.ffn(self.ln_wo_grad(x))
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mod
        h = self.ln_wo_grad(x).mul(scale1.add(1)).add_(shift1)
        x = x + self.attn(h, rope, cache, layer, start, attn_mask).mul_(gamma1)
        h = self.ln_wo_grad(x).mul(scale2.add(1)).add_(shift2)
        return x + self.ffn(h).mul(gamma2)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, C: int, eps: float):
        super().__init__()
        self.C = C
        self.ln_wo_grad = RMSNorm(C, eps=eps)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))

    def modulation(self, cond_BTD):
        # The head always max-pools the condition over the context, whatever the config says.
        cond = cond_BTD.max(1, keepdim=True).values
        return self.ada_lin(cond).view(-1, 1, 2, self.C).unbind(2)

    def forward(self, x, mod):
        scale, shift = mod
        return self.ln_wo_grad(x).mul(scale.add(1)).add_(shift)


class HartTransformer(nn.Module):
    """The AR transformer plus the residual-diffusion MLP (`diffloss.net`)."""

    def __init__(self, cfg: TransformerConfig, Cvae: int, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        C = cfg.embed_dim
        self.Cvae, self.V = Cvae, vocab_size
        self.context_norm = RMSNorm(cfg.context_dim, eps=cfg.norm_eps) if cfg.use_context_norm else nn.Identity()
        self.context_embed = nn.Linear(cfg.context_dim, C)
        self.word_embed = nn.Linear(Cvae, C)
        if cfg.use_timestep_embed:
            self.lvl_embed = TimestepEmbedder(C)
        else:
            self.lvl_embed = nn.Embedding(cfg.num_stages, C)
        self.blocks = nn.ModuleList([AdaLNSelfAttn(cfg) for _ in range(cfg.depth)])
        self.head_nm = AdaLNBeforeHead(C, cfg.norm_eps)
        self.head = nn.Linear(C, vocab_size)
        self.decoder_norm = RMSNorm(C, eps=cfg.norm_eps)
        self.diffloss = nn.Module()
        self.diffloss.net = SimpleMLPAdaLN(Cvae, cfg.diff_width, C, cfg.diff_depth)
        # Level of every position of the full sequence: 0 for context, si for stage si.
        lvl = [0] * cfg.context_token
        for si, pn in enumerate(cfg.patch_nums[1:], start=1):
            lvl += [si] * (pn * pn)
        self.register_buffer("lvl_1L", torch.tensor(lvl, dtype=torch.int64).view(1, -1))

    # -- pieces of the generation loop -----------------------------------------

    def stage_slices(self) -> List[Tuple[int, int]]:
        """[start, end) of every stage in the full sequence; stage 0 is the context."""
        cfg = self.cfg
        out, cur = [(0, cfg.context_token)], cfg.context_token
        for pn in cfg.patch_nums[1:]:
            out.append((cur, cur + pn * pn))
            cur += pn * pn
        return out

    def level_embeddings(self) -> torch.Tensor:
        """(1, total_len, C): the level embedding of every sequence position."""
        if isinstance(self.lvl_embed, TimestepEmbedder):
            return self.lvl_embed(self.lvl_1L[0]).unsqueeze(0)
        return self.lvl_embed(self.lvl_1L)

    def condition(self, context_BTD):
        """context (B, T, Dctx) -> (cond (2B, T, C)) with the unconditional half all-zero context.

        As the official sampler: the text encoder's states arrive in float32 and the
        context norm runs on them in float32 (its weight float32, see
        FLOAT32_PARAMETERS); context_embed then sees them rounded to its dtype.
        """
        context_BTD = context_BTD.float()
        doubled = torch.cat((context_BTD, torch.zeros_like(context_BTD)), dim=0)
        return self.context_embed(self.context_norm(doubled).to(self.context_embed.weight.dtype))

    # Parameters the official sampler uses in float32 whatever the autocast dtype
    # (its weights stay float32 under autocast; these feed float32 math, not a
    # Linear): the context norm (on the float32 prompt), the head's norm (on
    # h.float()) and the residual MLP's LayerNorms (float32 ops under autocast).
    FLOAT32_PARAMETERS = ("context_norm.weight", "head_nm.ln_wo_grad.weight")
    FLOAT32_MODULE_TYPES = (nn.LayerNorm,)

    def float32_parameters(self) -> List[str]:
        """Names of the parameters a half-precision run keeps in float32."""
        names = [n for n, _ in self.named_parameters() if n in self.FLOAT32_PARAMETERS]
        for mname, m in self.named_modules():
            if isinstance(m, self.FLOAT32_MODULE_TYPES):
                names += [f"{mname}.{n}" for n, _ in m.named_parameters(recurse=False)]
        return names

    def to_run_dtype(self, device, dtype) -> "HartTransformer":
        """Move to device and cast to dtype, keeping float32_parameters() in float32."""
        names = set(self.float32_parameters())
        keep = {n: p.detach().float().clone() for n, p in self.named_parameters() if n in names}
        self.to(device, dtype)
        params = dict(self.named_parameters())
        for n, v in keep.items():
            params[n].data = v.to(device)
        return self

    def modulations(self, cond_BTC, mask_BT):
        return [b.modulation(cond_BTC, mask_BT) for b in self.blocks], self.head_nm.modulation(cond_BTC)

    def stage_rope(self, si: int, context_pos_BT: torch.Tensor):
        d = self.cfg.head_dim
        if si == 0:
            return rope_1d(context_pos_BT, d)
        pn, last = self.cfg.patch_nums[si], self.cfg.patch_nums[-1]
        return rope_2d(image_positions(pn, last, context_pos_BT[:, -1]), d)

    def forward_stage(self, x_BlC, si, mods, rope, cache: Optional[KVCache], start: int, attn_mask=None):
        for i, block in enumerate(self.blocks):
            x_BlC = block(x_BlC, mods[i], rope, cache, i, start, attn_mask)
        return x_BlC

    def block_causal_bias(self, device, dtype=torch.float32) -> torch.Tensor:
        """(L, L) additive mask of the training-time pass: a token sees its own and earlier scales."""
        lvl = self.lvl_1L[0].to(device)
        zero = torch.zeros((), device=device, dtype=dtype)
        return torch.where(lvl[:, None] >= lvl[None, :], zero, torch.full_like(zero, -torch.inf))

    def forward_full(self, x_BLC, mods, context_pos_BT):
        """Teacher-forced pass over the whole sequence (context + every scale) at once.

        Gives the same hidden states as the cached stage-by-stage loop; used to
        check the cache and for training-style evaluation.
        """
        ropes = [self.stage_rope(si, context_pos_BT) for si in range(self.cfg.num_stages)]
        rope = (torch.cat([r[0] for r in ropes], dim=1), torch.cat([r[1] for r in ropes], dim=1))
        mask = self.block_causal_bias(x_BLC.device, x_BLC.dtype)
        return self.forward_stage(x_BLC, -1, mods, rope, None, 0, attn_mask=mask)

    def logits(self, h_BlC, head_mod):
        # As the official get_logits under autocast: the head norm runs in float32,
        # the vocabulary projection in the weights' dtype, the logits in float32.
        return self.head(self.head_nm(h_BlC.float(), head_mod).to(self.head.weight.dtype)).float()
