"""The fast engine against the reference loop: same codes, same latents, static buffers reused."""

from __future__ import annotations

import pytest
import torch

from hart_fast.pipeline import HartPipeline

from tiny_models import random_prompts, write_model

NO_CUDA = "no CUDA device on this machine (CUDA graphs are tested on the GPU device machine)"

VARIANTS = [
    {},
    {"disable_aln": False, "sep_aln_pooling_mode": "avg"},
    {"disable_aln": True, "shared_aln": True},
    {"disable_aln": True, "shared_aln": False},  # no modulation: ungated residual adds
    {"mlp_type": "llama", "attn_l2_norm": True},
]


def greedy(si, logits):
    return logits.argmax(-1)


def both(pipe_dir, device="cpu", **kw):
    ref = HartPipeline.from_pretrained(pipe_dir, device=device, fast=False, **kw)
    fast = HartPipeline.from_pretrained(pipe_dir, device=device, fast=True, **kw)
    return ref, fast


def run(pipe, ctx, mask, **kw):
    trace = {}
    args = dict(guidance_scale=4.5, seed=0, top_k=None, top_p=0.0, more_smooth=False, residual_diffusion=True,
                diffusion_steps="4", diffusion_temperature=0.0, residual_latents=None, token_sampler=greedy)
    args.update(kw)
    f = (pipe.engine.run if pipe.fast else pipe._run)(ctx.to(pipe.device), mask.to(pipe.device), trace=trace, **args)
    return trace, f


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "base")
def test_fast_matches_reference(tmp_path, overrides):
    d = write_model(str(tmp_path / "m"), llm_overrides=overrides)
    ref, fast = both(d)
    ctx, mask = random_prompts(3, ref.config.context_token, ref.config.context_dim, seed=4)
    g = torch.Generator().manual_seed(9)
    latents = torch.randn(3, ref.config.patch_nums[-1] ** 2, 4, generator=g)
    tr_ref, f_ref = run(ref, ctx, mask, residual_latents=latents)
    tr_fast, f_fast = run(fast, ctx, mask, residual_latents=latents)
    for si in range(ref.config.num_stages):
        torch.testing.assert_close(tr_fast[f"stage{si:02d}/logits"], tr_ref[f"stage{si:02d}/logits"], atol=1e-4, rtol=1e-4)
        assert torch.equal(tr_fast[f"stage{si:02d}/idx"], tr_ref[f"stage{si:02d}/idx"])
    torch.testing.assert_close(f_fast, f_ref, atol=1e-3, rtol=1e-3)


def test_sampled_generation_agrees_and_buffers_are_reused(tmp_path):
    d = write_model(str(tmp_path / "m"))
    ref, fast = both(d)
    ctx, mask = random_prompts(2, ref.config.context_token, ref.config.context_dim, seed=5)
    a = ref.generate(ctx, mask, seed=3, more_smooth=True)
    b = fast.generate(ctx, mask, seed=3, more_smooth=True)
    torch.testing.assert_close(b, a, atol=2e-3, rtol=0)
    st = fast.engine.states[4]
    k0 = st.k[0].data_ptr()
    fast.generate(ctx, mask, seed=4)
    assert fast.engine.states[4].k[0].data_ptr() == k0  # the static KV cache is reused
    fast.generate(ctx[:1], mask[:1], seed=4)
    assert sorted(fast.engine.states) == [2, 4]  # one static state per batch size


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_cuda_graphs_match_eager_and_reference(tmp_path):
    d = write_model(str(tmp_path / "m"))
    ref = HartPipeline.from_pretrained(d, device="cuda", fast=False)
    fast = HartPipeline.from_pretrained(d, device="cuda", fast=True)
    assert fast.engine.use_cuda_graphs
    ctx, mask = random_prompts(2, ref.config.context_token, ref.config.context_dim, seed=6)
    _, f_ref = run(ref, ctx, mask)
    _, f1 = run(fast, ctx, mask)  # captures
    _, f2 = run(fast, ctx * 0.5, mask)  # replays with new inputs
    _, f2_ref = run(ref, ctx * 0.5, mask)
    torch.testing.assert_close(f1, f_ref, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(f2, f2_ref, atol=1e-3, rtol=1e-3)
    assert len(fast.engine.states[4].graphs) == ref.config.num_stages
