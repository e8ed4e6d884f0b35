"""Seeded random HART configurations spanning the official config space.

`sweep_config(i)` is the i-th configuration: a transformer config (`llm/`), a
tokenizer config (`tokenizer/`) and a batch of padded prompts, all drawn from a
generator seeded with i, so a failure names one reproducible model.  The space:

* head dims 8-160 (multiples of 4, as the 2-D RoPE needs; powers of two and not;
  160 is above the CUDA RoPE kernel's 128), 1-4 heads, so widths are rarely
  multiples of 64;
* patch_nums starting at 1, 3-7 scales, ratios that are not integers (1, 2, 3, 5, 7);
* llama / gpt2 MLP, mlp_ratio 2-4; AdaLN on (max | avg pooling), shared AdaLN,
  or none; timestep vs level embeddings; context norm on / off; l2-norm attention;
* tokenizer vocabularies below and above the official top-k (300 / 600), Cvae 2-16,
  1-3 decoder levels, phi convs shared 0 / 1 / 2 / 4 ways or none (quant_resi 0),
  `var` and `var_hybrid` quantizers;
* diffusion MLP width 8-48, depth 1-3, 2-8 sampling steps;
* batch 1-3 with right-padded contexts.

Used by python_tests/test_sweep.py (CPU, CI) and by the device check (CUDA, fp16 /
bf16), so both run the same models.
"""

from __future__ import annotations

import random
from typing import Dict, Tuple

import torch

HEAD_DIMS = (8, 12, 16, 20, 24, 28, 32, 40, 48, 64, 72, 80, 96, 128, 160)
NUM_CONFIGS = 32


def _patch_nums(rng: random.Random) -> list:
    n = rng.randint(3, 7)
    out = [1]
    while len(out) < n:
        out.append(out[-1] + rng.choice((1, 1, 2, 3)))
    return out


def sweep_config(i: int) -> Dict:
    """The i-th configuration: {"llm": ..., "tok": ..., "batch": B, "seed": i, "name": ...}."""
    rng = random.Random(1000 + i)
    d = HEAD_DIMS[i % len(HEAD_DIMS)] if i < len(HEAD_DIMS) else rng.choice(HEAD_DIMS)
    H = rng.choice((1, 2, 3)) if d >= 64 else rng.choice((1, 2, 3, 4))
    C = H * d
    pn = _patch_nums(rng)
    aln = rng.choice(("max", "avg", "shared", "none"))
    llm = dict(
        context_token=rng.randint(1, 10), context_dim=rng.choice((8, 12, 20, 32, 40)),
        depth=rng.randint(1, 3), embed_dim=C, num_heads=H,
        mlp_ratio=rng.choice((2.0, 3.0, 4.0)), mlp_type=rng.choice(("gpt2", "llama")),
        attn_type="llama", patch_nums=pn,
        disable_aln=aln in ("shared", "none"), shared_aln=aln == "shared",
        sep_aln_pooling_mode="avg" if aln == "avg" else "max",
        use_timestep_embed=rng.random() < 0.5, use_context_norm=rng.random() < 0.6,
        attn_l2_norm=rng.random() < 0.3,
        diff_width=rng.choice((8, 12, 16, 24, 48)), diff_depth=rng.randint(1, 3),
        num_sampling_steps=str(rng.choice((2, 4, 8))), norm_eps=rng.choice((1e-6, 1e-5)),
        vae_path=None,
    )
    levels = rng.randint(1, 3)
    quant_resi = rng.choice((0.5, 0.5, 0.0, -0.5))
    tok = dict(
        vocab_size=rng.choice((16, 64, 200, 320, 700)), z_channels=rng.choice((2, 4, 8, 16)),
        ch=32, ch_mult=[1] + [rng.choice((1, 2)) for _ in range(levels - 1)], v_patch_nums=pn,
        quantizer_type=rng.choice(("var", "var_hybrid")),
        share_quant_resi=rng.choice((0, 1, 2, 4)), quant_resi=quant_resi,
    )
    B = rng.randint(1, 3)
    name = (f"cfg{i:02d}-d{d}h{H}-pn{'.'.join(map(str, pn))}-{llm['mlp_type']}-aln_{aln}"
            f"{'-l2' if llm['attn_l2_norm'] else ''}-V{tok['vocab_size']}-B{B}")
    return {"llm": llm, "tok": tok, "batch": B, "seed": i, "name": name}


def sweep_prompts(cfg: Dict) -> Tuple[torch.Tensor, torch.Tensor]:
    """(context (B, T, D), mask (B, T) bool) with random right padding; row 0 unpadded."""
    g = torch.Generator().manual_seed(7000 + cfg["seed"])
    B, T, D = cfg["batch"], cfg["llm"]["context_token"], cfg["llm"]["context_dim"]
    context = torch.randn(B, T, D, generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return context, mask


def forced_codes(cfg: Dict, vocab_size: int):
    """Random codes per stage, (B, l) int64 with l = 1 at stage 0 and pn*pn after."""
    g = torch.Generator().manual_seed(9000 + cfg["seed"])
    B = cfg["batch"]
    return [torch.randint(vocab_size, (B, pn * pn), generator=g) for pn in cfg["llm"]["patch_nums"]]


__all__ = ["HEAD_DIMS", "NUM_CONFIGS", "sweep_config", "sweep_prompts", "forced_codes"]
