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
    f = pipe.generate(ctx.to(pipe.device), mask.to(pipe.device), output_type="latent", trace=trace, **args)
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
    assert sorted(fast.engine.states) == [2]  # on the CPU only the latest batch size's state is kept
    fast.engine.keep_all_states = True  # the CUDA policy: one static state per batch size seen
    fast.generate(ctx, mask, seed=4)
    assert sorted(fast.engine.states) == [2, 4]


def _oom():
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (emulated)")


@pytest.fixture
def cached_two(tmp_path):
    """A fast pipeline that keeps every batch size's state, holding batch 2's,
    and a reference result for batch 1 (seeded, greedy codes)."""
    d = write_model(str(tmp_path / "m"))
    fast = HartPipeline.from_pretrained(d, fast=True)
    fast.engine.keep_all_states = True
    ctx, mask = random_prompts(2, fast.config.context_token, fast.config.context_dim, seed=7)
    fast.generate(ctx, mask, seed=1)
    assert sorted(fast.engine.states) == [4]
    fresh = HartPipeline.from_pretrained(d, fast=True).generate(ctx[:1], mask[:1], seed=2)
    return fast, ctx[:1], mask[:1], fresh


def test_state_allocation_out_of_memory_frees_other_batch_sizes(cached_two, monkeypatch):
    import hart_fast.engine as engine_mod

    fast, ctx, mask, fresh = cached_two
    real = engine_mod.StageState
    calls = []

    def tight(tr, B2, device, dtype, plan=None):  # no room while another batch size's state is held
        calls.append(sorted(fast.engine.states))
        if fast.engine.states:
            raise _oom()
        return real(tr, B2, device, dtype, plan)

    monkeypatch.setattr(engine_mod, "StageState", tight)
    out = fast.generate(ctx, mask, seed=2)
    assert calls == [[4], []] and sorted(fast.engine.states) == [2]
    torch.testing.assert_close(out, fresh, atol=0, rtol=0)


def test_generate_retries_a_run_after_freeing_other_batch_sizes(cached_two, monkeypatch):
    fast, ctx, mask, fresh = cached_two
    eng = fast.engine
    real = eng._run_stage
    seen = []

    def tight(st, si, rows=None):
        seen.append(sorted(eng.states))
        if 4 in eng.states:
            raise _oom()
        return real(st, si, rows)

    monkeypatch.setattr(eng, "_run_stage", tight)
    out = fast.generate(ctx, mask, seed=2)
    assert seen[0] == [2, 4] and all(s == [2] for s in seen[1:]) and sorted(eng.states) == [2]
    torch.testing.assert_close(out, fresh, atol=0, rtol=0)


def test_generate_retries_a_decode_after_freeing_the_engine(cached_two, monkeypatch):
    import hart_fast.model.vae_fast as vae_mod

    fast, ctx, mask, fresh = cached_two
    real = vae_mod.fhat_to_img_fast
    held = []

    def tight(*a, **k):
        held.append(bool(fast.engine.states))
        if fast.engine.states:
            raise _oom()
        return real(*a, **k)

    monkeypatch.setattr(vae_mod, "fhat_to_img_fast", tight)
    out = fast.generate(ctx, mask, seed=2)
    assert held == [True, False] and not fast.engine.states
    torch.testing.assert_close(out, fresh, atol=0, rtol=0)


def test_out_of_memory_with_nothing_to_free_is_raised_once(tmp_path, monkeypatch):
    d = write_model(str(tmp_path / "m"))
    fast = HartPipeline.from_pretrained(d, fast=True)
    ctx, mask = random_prompts(1, fast.config.context_token, fast.config.context_dim, seed=8)
    calls = []

    def boom(st, si, rows=None):
        calls.append(si)
        raise _oom()

    monkeypatch.setattr(fast.engine, "_run_stage", boom)
    with pytest.raises(torch.OutOfMemoryError, match="emulated"):
        fast.generate(ctx, mask, seed=0)
    assert calls == [0]  # only this batch size's state was held: no pointless retry


def test_release_memory(cached_two):
    fast, ctx, mask, _ = cached_two
    assert fast.release_memory() is True and not fast.engine.states
    assert fast.release_memory() is False
    ref = HartPipeline(fast.transformer, fast.tokenizer, fast=False)
    assert ref.release_memory() is False  # the reference path holds no state
    fast.generate(ctx, mask, seed=2)  # rebuilds what it needs
    assert sorted(fast.engine.states) == [2]


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
