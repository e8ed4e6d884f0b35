"""Unit tests of the reference model's pieces, each against an independent computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hart_fast.config import TokenizerConfig, TransformerConfig, phi_index
from hart_fast.model.diffusion import RespacedSchedule, cosine_betas, iddpm_step, space_timesteps
from hart_fast.model.tokenizer import HartTokenizer
from hart_fast.model.transformer import HartTransformer, image_positions, rope_1d, rope_2d
from hart_fast.pipeline import HartPipeline
from hart_fast.sampling import cfg_combine, cfg_ratio, filter_top_k_top_p_, official_top_k

from tiny_models import TINY_LLM, TINY_TOK, random_prompts, randomize_, write_model


# --------------------------------------------------------------------------- diffusion
def test_respaced_timesteps_match_official_8_steps():
    # The reference README lists the original timesteps of the 8 respaced steps.
    sched = RespacedSchedule.build("8")
    assert sched.timestep_map[::-1] == [999, 856, 714, 571, 428, 285, 143, 0]
    # First sampling step: respaced alpha-bar 2.43e-9 (README), so 1/sqrt ~ 2.03e4.
    assert sched.sqrt_recip_alphas_cumprod[-1] == pytest.approx(2.03e4, rel=1e-2)


def test_space_timesteps_variants_and_errors():
    assert space_timesteps(1000, "ddim4") == {0, 250, 500, 750}
    assert len(space_timesteps(1000, "4,4")) == 8
    with pytest.raises(ValueError):
        space_timesteps(10, "20")
    with pytest.raises(ValueError):
        space_timesteps(1000, "x")


def test_cosine_betas_reproduce_alpha_bar():
    betas = cosine_betas(1000)
    ac = np.cumprod(1 - betas)
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    # Uncapped steps reproduce alpha_bar(t) / alpha_bar(0) exactly (up to float64).
    assert ac[500] == pytest.approx(f(501 / 1000) / f(0), rel=1e-9)


def test_iddpm_step_matches_float64_posterior():
    sched = RespacedSchedule.build("8")
    g = torch.Generator().manual_seed(0)
    x, eps, var, noise = (torch.randn(64, 8, generator=g) for _ in range(4))
    var = var.clamp(-1, 1)
    for s in (7, 3, 0):
        out = iddpm_step(x, eps, var, sched, s, noise, temperature=0.7)
        x64, e64, v64, n64 = (t.double() for t in (x, eps, var, noise))
        x0 = (sched.sqrt_recip_alphas_cumprod[s] * x64 - sched.sqrt_recipm1_alphas_cumprod[s] * e64).clamp(-1, 1)
        mean = sched.posterior_mean_coef1[s] * x0 + sched.posterior_mean_coef2[s] * x64
        frac = (v64 + 1) / 2
        logv = frac * sched.log_betas[s] + (1 - frac) * sched.posterior_log_variance_clipped[s]
        expect = mean + (0.0 if s == 0 else 1.0) * torch.exp(0.5 * logv) * n64 * 0.7
        # s = 7 amplifies float32 rounding by ~2e4 where x0 escapes the clip.
        torch.testing.assert_close(out.double(), expect, atol=1e-2 if s == 7 else 1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- RoPE
def test_rope_2d_matches_official_matmul_layout():
    """The official code: freqs (B, 2, L, d/4) from a matmul, cat, transpose(1, 2), reshape."""
    d, B, L = 64, 2, 9
    pos = torch.rand(B, L, 2) * 70
    inv = 1.0 / (10000 ** (torch.arange(0, d, 4, dtype=torch.int64).float() / d))
    inv_e = inv[None, :, None, None].expand(B, -1, 1, 1).repeat(1, 1, 1, 2).permute(0, 3, 1, 2)
    pos_e = pos[:, None, :].permute(0, 3, 1, 2)
    freqs = (inv_e @ pos_e).transpose(2, 3)
    emb = torch.cat((freqs, freqs), dim=-1).transpose(2, 1).reshape(B, L, -1)
    cos, sin = rope_2d(pos, d)
    assert torch.equal(cos, emb.cos()) and torch.equal(sin, emb.sin())


def test_rope_1d_relative_position_property():
    d = 16
    pos = torch.tensor([[3, 10, 7, 14]])
    cos, sin = rope_1d(pos, d)
    from hart_fast.model.transformer import apply_rope

    q, k = torch.randn(1, 1, 1, d).expand(1, 1, 4, d), torch.randn(1, 1, 1, d).expand(1, 1, 4, d)
    qr, kr = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    # <R(3) q, R(10) k> == <R(7) q, R(14) k>: only the offset matters.
    a = (qr[0, 0, 0] * kr[0, 0, 1]).sum()
    b = (qr[0, 0, 2] * kr[0, 0, 3]).sum()
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(qr.norm(dim=-1), q.norm(dim=-1))


def test_image_positions_rescaled_and_offset():
    pos = image_positions(2, 8, torch.tensor([5, 0]))
    expect = torch.tensor([[0, 0], [0, 4], [4, 0], [4, 4]], dtype=torch.float32)
    assert torch.equal(pos[0], expect + 5) and torch.equal(pos[1], expect)


# --------------------------------------------------------------------------- sampling
def test_cfg_ratio_last_stage_reuses_previous():
    assert [cfg_ratio(si, 14) for si in (0, 6, 12, 13)] == [0.0, 6 / 13, 12 / 13, 12 / 13]
    assert official_top_k(6) == 600 and official_top_k(7) == 300
    lg = torch.tensor([[[1.0, 2.0]], [[3.0, 5.0]]])
    assert torch.equal(cfg_combine(lg, 2.0), 3 * lg[:1] - 2 * lg[1:])


def test_top_k_top_p_filtering():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 50, generator=g)
    k = filter_top_k_top_p_(logits.clone(), 7, 0.0)
    assert ((k > -torch.inf).sum(-1) == 7).all()
    assert torch.equal(k.argmax(-1), logits.argmax(-1))
    p = filter_top_k_top_p_(logits.clone(), 0, 0.6)
    for row, kept in zip(logits.view(-1, 50), p.view(-1, 50)):
        probs = row.softmax(-1)
        order = probs.argsort(descending=True)
        # Smallest set of top tokens whose mass reaches 0.6, computed directly.
        n = int((probs[order].cumsum(0) < 0.6).sum()) + 1
        assert set(order[:n].tolist()) == set(torch.nonzero(kept > -torch.inf).view(-1).tolist())
    unchanged = filter_top_k_top_p_(logits.clone(), 600, 0.0)  # top_k >= V keeps everything
    assert torch.equal(unchanged, logits)


# --------------------------------------------------------------------------- tokenizer
def test_phi_index_nearest_tick():
    cfg = TokenizerConfig.from_dict({**TINY_TOK, "share_quant_resi": 4})
    # ticks linspace(1/12, 11/12, 4) = [.083, .361, .639, .917]; stage si of 14 sits at si/13
    # (2/13 = .154 -> tick 0, 3/13 = .231 -> tick 1, 7/13 = .538 -> tick 2).
    assert [phi_index(cfg, si, 14) for si in (0, 2, 3, 6, 7, 10, 13)] == [0, 0, 1, 1, 2, 2, 3]


@pytest.mark.parametrize("share", [0, 1, 4])
def test_latent_tokens_roundtrip_is_lossless_with_residual(share):
    cfg = TokenizerConfig.from_dict({**TINY_TOK, "share_quant_resi": share})
    tok = HartTokenizer(cfg).eval()
    randomize_(tok, 3)
    img = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        f = tok.img_to_latent(img)
        idx, resid = tok.latent_to_tokens(f, cfg.v_patch_nums)
        assert [i.shape[1] for i in idx] == [p * p for p in cfg.v_patch_nums]
        back = tok.tokens_to_latent(idx, cfg.v_patch_nums, resid)
    torch.testing.assert_close(back, f, atol=1e-5, rtol=1e-5)


def test_nearest_code_matches_bruteforce():
    cfg = TokenizerConfig.from_dict(TINY_TOK)
    tok = HartTokenizer(cfg, with_encoder=False)
    randomize_(tok, 4)
    z = torch.randn(100, cfg.Cvae)
    expect = torch.cdist(z.double(), tok.quantize.embedding.weight.double()).argmin(1)
    assert torch.equal(tok.nearest_code(z), expect)


# --------------------------------------------------------------------------- transformer
VARIANTS = [
    {},
    {"disable_aln": False, "sep_aln_pooling_mode": "max"},
    {"disable_aln": False, "sep_aln_pooling_mode": "avg"},
    {"disable_aln": True, "shared_aln": True},
    {"mlp_type": "llama"},
    {"use_timestep_embed": False},
    {"attn_l2_norm": True},
    {"use_context_norm": False},
]


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "base")
def test_cached_loop_equals_block_causal_full_pass(tmp_path, overrides):
    """The KV-cached stage-by-stage loop and one teacher-forced pass give the same logits."""
    d = write_model(str(tmp_path / "m"), llm_overrides=overrides)
    pipe = HartPipeline.from_pretrained(d)
    cfg = pipe.config
    ctx, mask = random_prompts(2, cfg.context_token, cfg.context_dim, seed=1)
    trace = {}
    pipe.generate(ctx, mask, guidance_scale=3.0, seed=0, diffusion_steps="4", output_type="latent", trace=trace)
    tr = pipe.transformer
    x_full = torch.cat([trace[f"stage{si:02d}/x"] for si in range(cfg.num_stages)], dim=1)
    mask2 = torch.cat((mask, torch.zeros_like(mask)))
    mask2[2:, 0] = True
    pos = torch.cumsum(mask.long(), 1) - 1
    pos2 = torch.cat((pos, torch.zeros_like(pos)))
    with torch.no_grad():
        cond = tr.condition(ctx)
        mods, head_mod = tr.modulations(cond, mask2)
        h = tr.forward_full(x_full, mods, pos2)
        for si, (s, e) in enumerate(tr.stage_slices()):
            lg = cfg_combine(tr.logits(h[:, s:e], head_mod), 3.0 * cfg_ratio(si, cfg.num_stages))
            if si == 0:
                lg = lg[:, [-1]]
            torch.testing.assert_close(lg, trace[f"stage{si:02d}/logits"], atol=1e-4, rtol=1e-4)


def test_adaln_pooling_avg_uses_mask():
    from hart_fast.model.transformer import pool_condition

    cond = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = pool_condition(cond, mask, "avg")
    torch.testing.assert_close(out[0], cond[0, :2].mean(0))
    torch.testing.assert_close(out[1], cond[1].mean(0))
    assert torch.equal(pool_condition(cond, mask, "max"), cond.max(1).values)


def test_llama_mlp_hidden_rounding():
    cfg = TransformerConfig.from_dict({**TINY_LLM, "embed_dim": 1536, "num_heads": 24, "mlp_type": "llama"})
    assert cfg.ffn_hidden == 4096  # int(1536*4*2/3 + 255)//256*256
    cfg = TransformerConfig.from_dict({**TINY_LLM, "embed_dim": 1536, "num_heads": 24})
    assert cfg.ffn_hidden == 6144


def test_real_shape_config_sizes():
    cfg = TransformerConfig.from_dict({**TINY_LLM, "embed_dim": 1536, "num_heads": 24, "depth": 24,
                                       "context_token": 300, "context_dim": 1536,
                                       "patch_nums": [1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64]})
    assert cfg.total_tokens == 9750  # keys of the last stage: 300 context + 9450 image tokens
    with torch.device("meta"):
        model = HartTransformer(cfg, 32, 4096)
    n = sum(p.numel() for n_, p in model.named_parameters() if not n_.startswith("diffloss"))
    assert 0.5e9 < n < 0.9e9  # "about 0.7B parameters"
    n_mlp = sum(p.numel() for p in model.diffloss.parameters())
    assert n_mlp < 60e6  # the "37M" diffusion MLP (defaults: width 1024, depth 6)
