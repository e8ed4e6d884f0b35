"""The speed levers (hart_fast.speed, hart_fast.pruning): the exact path stays exact,
each lever really skips the work it says, both backends agree, bad values are
refused naming the option, and each preset keeps a quality floor on the demo."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hart_fast.generation import guided_stages
from hart_fast.model.transformer import KVCache
from hart_fast.pipeline import HartPipeline
from hart_fast.reference import ReferenceBackend
from hart_fast.pruning import (PrunePlan, block_forward_recording, gather_tokens, pivotal_tokens,
                               pruned_block_forward, restore)
from hart_fast.speed import LEVERS, SPEED_PRESETS, resolve_levers

from tiny_models import random_prompts, write_model

# A tiny model with enough scales to prune the last two and keep a reference scale.
PN = [1, 2, 3, 4, 6, 8]
LLM = {"patch_nums": PN}
TOK = {"v_patch_nums": PN}


def greedy(si, logits):
    return logits.argmax(-1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model(str(tmp_path_factory.mktemp("speed") / "m"), llm_overrides=LLM, tok_overrides=TOK)


@pytest.fixture(scope="module")
def aln_model_dir(tmp_path_factory):
    return write_model(str(tmp_path_factory.mktemp("speed_aln") / "m"),
                       llm_overrides={**LLM, "disable_aln": False}, tok_overrides=TOK)


def _prompts(pipe, B=2, seed=3):
    return random_prompts(B, pipe.config.context_token, pipe.config.context_dim, seed=seed)


def _run(pipe, ctx, mask, **kw):
    trace = {}
    args = dict(seed=5, more_smooth=False, diffusion_steps="4", token_sampler=greedy, output_type="latent")
    args.update(kw)
    f = pipe.generate(ctx, mask, trace=trace, **args)
    backend_work = pipe.engine.stage_work if pipe.fast else None
    return trace, f, backend_work


@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast"])
def test_exact_and_neutral_levers_are_bitwise_the_default(model_dir, fast):
    pipe = HartPipeline.from_pretrained(model_dir, fast=fast)
    ctx, mask = _prompts(pipe)
    base = pipe.generate(ctx, mask, seed=1)
    S = pipe.config.num_stages
    for kw in ({"speed": "exact"}, {"guidance_until": S}, {"prune_ratios": (0.0, 0.0)}):
        assert torch.equal(pipe.generate(ctx, mask, seed=1, **kw), base), kw


class _Recorder:
    """Wraps a backend and records the rows and tokens of every stage call."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def stage(self, si, x):
        self.calls.append((si, x.shape[0], x.shape[1]))
        return self.inner.stage(si, x)


@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast"])
@pytest.mark.parametrize("g", [0, 2, -1])
def test_guidance_until_runs_the_unconditional_rows_only_where_asked(model_dir, fast, g):
    from hart_fast.generation import generate_latent
    from hart_fast.reference import ReferenceBackend

    pipe = HartPipeline.from_pretrained(model_dir, fast=fast)
    ctx, mask = _prompts(pipe, B=3)
    S = pipe.config.num_stages
    backend = _Recorder(pipe.engine if fast else ReferenceBackend(pipe.transformer, pipe.tokenizer))
    f = generate_latent(pipe.transformer, pipe.tokenizer, backend, ctx, mask, guidance_scale=4.5, seed=0, top_k=None,
                        top_p=0.0, more_smooth=True, residual_diffusion=True, schedule=pipe.schedule("4"),
                        diffusion_temperature=1.0, residual_latents=None, token_sampler=None, guidance_until=g)
    n = guided_stages(g, S)
    assert [rows for _, rows, _ in backend.calls] == [6] * n + [3] * (S - n)
    assert [rows for _, rows, _ in backend.inner.stage_work] == [6] * n + [3] * (S - n)
    assert f.shape == (3, pipe.tokenizer.Cvae, PN[-1], PN[-1]) and torch.isfinite(f).all()


@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast"])
def test_levers_are_deterministic_and_change_the_image(model_dir, fast):
    pipe = HartPipeline.from_pretrained(model_dir, fast=fast)
    ctx, mask = _prompts(pipe)
    exact = pipe.generate(ctx, mask, seed=2)
    for kw in ({"guidance_until": -2}, {"prune_ratios": (0.5, 0.75)}, {"speed": "balanced"}, {"speed": "fastest"}):
        a = pipe.generate(ctx, mask, seed=2, **kw)
        assert a.shape == exact.shape
        assert torch.equal(a, pipe.generate(ctx, mask, seed=2, **kw)), kw
        assert not torch.equal(a, exact), kw


@pytest.mark.parametrize("ratios", [(0.5, 0.75), (0.9,), (0.25, 0.5, 0.75)])
def test_pruning_forwards_only_the_kept_tokens(model_dir, ratios):
    """Tokens per block of every stage, as both backends record them, and the
    packed KV cache: later stages attend to exactly what was written."""
    plan = PrunePlan.build(PN, ratios)
    expect = []
    for si, pn in enumerate(PN):
        n = pn * pn if si else None
        if si in plan.keep:
            n = pn * pn - int(pn * pn * ratios[si - (len(PN) - len(ratios))])
        expect.append(n)
    for fast in (False, True):
        pipe = HartPipeline.from_pretrained(model_dir, fast=fast)
        ctx, mask = _prompts(pipe)
        if fast:
            _run(pipe, ctx, mask, prune_ratios=ratios)
            work = pipe.engine.stage_work
        else:
            from hart_fast.generation import generate_latent
            from hart_fast.reference import ReferenceBackend

            backend = ReferenceBackend(pipe.transformer, pipe.tokenizer)
            generate_latent(pipe.transformer, pipe.tokenizer, backend, ctx, mask, guidance_scale=4.5, seed=0,
                            top_k=None, top_p=0.0, more_smooth=False, residual_diffusion=True,
                            schedule=pipe.schedule("4"), diffusion_temperature=1.0, residual_latents=None,
                            token_sampler=greedy, prune_ratios=ratios)
            work = backend.stage_work
            assert backend.offset == sum(t for _, _, t in work)
        tokens = [t for _, _, t in work]
        assert tokens[1:] == expect[1:], (fast, tokens)
        assert tokens[0] == pipe.config.context_token


@pytest.mark.parametrize("which", ["base", "aln"])
def test_pruned_generation_fast_matches_reference(model_dir, aln_model_dir, which):
    d = model_dir if which == "base" else aln_model_dir
    ref = HartPipeline.from_pretrained(d, fast=False)
    fast = HartPipeline.from_pretrained(d, fast=True)
    ctx, mask = _prompts(ref, B=3)
    latents = torch.randn(3, PN[-1] ** 2, ref.tokenizer.Cvae, generator=torch.Generator().manual_seed(1))
    for kw in ({"prune_ratios": (0.5, 0.75)}, {"prune_ratios": (0.5, 0.75), "guidance_until": -1}):
        tr_ref, f_ref, _ = _run(ref, ctx, mask, residual_latents=latents, **kw)
        tr_fast, f_fast, _ = _run(fast, ctx, mask, residual_latents=latents, **kw)
        for si in range(len(PN)):
            torch.testing.assert_close(tr_fast[f"stage{si:02d}/logits"], tr_ref[f"stage{si:02d}/logits"],
                                       rtol=1e-4, atol=1e-5)
            assert torch.equal(tr_fast[f"stage{si:02d}/idx"], tr_ref[f"stage{si:02d}/idx"])
        torch.testing.assert_close(f_fast, f_ref, rtol=1e-3, atol=1e-5)


def test_pruned_block_keeping_every_token_is_the_block(aln_model_dir):
    """With n_keep = all tokens the pruned block is the block itself: the pivotal
    set is every position, so nothing is refilled and the cache gets every key."""
    pipe = HartPipeline.from_pretrained(aln_model_dir, fast=False)
    tr = pipe.transformer
    cfg = tr.cfg
    ctx, mask = _prompts(pipe, B=2)
    from hart_fast.generation import cfg_doubled_mask_and_positions

    mask2, pos2 = cfg_doubled_mask_and_positions(mask, 2, cfg.context_token, "cpu")
    mods, _ = tr.modulations(tr.condition(ctx), mask2)
    si, l = 3, PN[3] ** 2
    x = torch.randn(4, l, cfg.embed_dim, generator=torch.Generator().manual_seed(0))
    rope = tr.stage_rope(si, pos2)
    caches = [KVCache(cfg.depth, 4, cfg.num_heads, cfg.total_tokens, cfg.head_dim, "cpu", torch.float32)
              for _ in range(3)]
    blk = tr.blocks[0]
    want = blk(x, mods[0], rope, caches[0], 0, 7)
    got_rec, (a, f) = block_forward_recording(blk, x, mods[0], rope, caches[1], 0, 7)
    got = pruned_block_forward(blk, x, mods[0], rope, caches[2], 0, 7, l, (torch.zeros_like(a), torch.zeros_like(f)),
                               PN[si])
    assert torch.equal(got_rec, want)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(caches[2].k[0][:, :, 7:7 + l], caches[0].k[0][:, :, 7:7 + l], rtol=1e-5, atol=1e-6)


def test_pivotal_tokens_and_restore():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 5, generator=g)
    x[0, 3] += 10.0   # far from the mean: must be kept
    x[1, 11] -= 10.0
    idx = pivotal_tokens(x, 4)
    assert idx.shape == (2, 4) and idx.dtype == torch.int64
    assert 3 in idx[0].tolist() and 11 in idx[1].tolist()
    assert torch.equal(idx, idx.sort(dim=1).values)
    # The kept set is the top of an independently computed score.
    score = ((x - x.mean(1, keepdim=True)) ** 2).sum(-1)
    for b in range(2):
        assert set(idx[b].tolist()) == set(score[b].argsort(descending=True)[:4].tolist())
    kept = gather_tokens(x, idx)
    assert torch.equal(kept[0, 0], x[0, idx[0, 0]])
    # Restore at the same scale: kept rows are the kept outputs, the others the reference's.
    ref = torch.randn(2, 16, 5, generator=g)
    out = restore(ref, kept, idx, 4)
    for b in range(2):
        for t in range(16):
            want = x[b, t] if t in idx[b].tolist() else ref[b, t]
            assert torch.equal(out[b, t], want)
    # Restore from a coarser scale: a constant reference map stays constant.
    out = restore(torch.full((1, 4, 3), 2.5), torch.zeros(1, 1, 3), torch.tensor([[5]]), 4)
    assert out[0, 5].abs().sum() == 0 and torch.all(out[0, [0, 4, 15]] == 2.5)


@pytest.mark.parametrize("r, pn", [(10, 13), (10, 16), (3, 8), (5, 7), (4, 4), (7, 3)])
def test_area_resize_tokens_is_the_area_interpolation(r, pn):
    import torch.nn.functional as F

    from hart_fast.pruning import area_resize_tokens

    B, C = 2, 9
    ref = torch.randn(B, r * r, C, generator=torch.Generator().manual_seed(r * 31 + pn), dtype=torch.float64)
    want = F.interpolate(ref.transpose(1, 2).reshape(B, C, r, r), size=(pn, pn), mode="area")
    want = want.reshape(B, C, pn * pn).transpose(1, 2)
    got = area_resize_tokens(ref.float(), pn)
    assert got.dtype == torch.float32 and got.shape == (B, pn * pn, C)
    # float32 rounding of a short average (<= 4 x 4 inputs): a few ulps of the largest input.
    ulp = torch.finfo(torch.float32).eps * ref.abs().max().item()
    torch.testing.assert_close(got.double(), want, rtol=0, atol=8 * ulp)
    before = ref.float()
    restore(before, torch.zeros(B, 1, C), torch.zeros(B, 1, dtype=torch.int64), pn)
    assert torch.equal(before, ref.float())  # the reference outputs are not written to


def test_prune_plan_follows_the_schedule():
    plan = PrunePlan.build([1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 21, 27, 36, 48, 64], (0.5, 0.75))
    assert plan.keep == {13: 48 * 48 // 2, 14: 64 * 64 // 4} and plan.reference_stage == 12
    assert PrunePlan.build(PN, None) is None and PrunePlan.build(PN, (0.0,)) is None


def _exponentials_drawn(g: torch.Generator, seed: int, limit: int = 1 << 16) -> int:
    """How many exponential_ draws take a fresh generator of `seed` to g's state."""
    fresh = torch.Generator().manual_seed(seed)
    for n in range(limit):
        if torch.equal(fresh.get_state(), g.get_state()):
            return n
        torch.empty(1).exponential_(generator=fresh)
    raise AssertionError("state not reached")


@pytest.mark.parametrize("B, l, V, k", [(1, 5, 64, 7), (3, 4, 50, 13), (2, 9, 33, 1)])
def test_topk_sampling_draws_k_random_numbers_per_token(B, l, V, k):
    from hart_fast.sampling import (filter_top_k_top_p_, gumbel_mix, gumbel_mix_topk, kept_candidates,
                                    multinomial_sample_topk)

    logits = filter_top_k_top_p_(torch.randn(B, l, V, generator=torch.Generator().manual_seed(V)), k, 0.0)
    vals, idx = kept_candidates(logits, k)
    gens = [torch.Generator().manual_seed(10 + b) for b in range(B)]
    codes = multinomial_sample_topk(vals, idx, gens)
    assert codes.shape == (B, l) and codes.dtype == torch.int64
    assert torch.isfinite(logits.gather(-1, codes[..., None])).all()  # only kept candidates are drawn
    assert [_exponentials_drawn(g, 10 + b) for b, g in enumerate(gens)] == [l * k] * B
    # Row b's codes come from its own stream alone.
    again = multinomial_sample_topk(vals[1:], idx[1:], [torch.Generator().manual_seed(10 + b) for b in range(1, B)])
    assert torch.equal(again, codes[1:])
    # The Gumbel mixture: k noises per token, weights only on the kept codes.
    codebook = torch.randn(V, 6, dtype=torch.float64).float()
    gens = [torch.Generator().manual_seed(20 + b) for b in range(B)]
    h = gumbel_mix_topk(vals, idx, V, 0.4, codebook, gens)
    assert h.shape == (B, l, 6) and [_exponentials_drawn(g, 20 + b) for b, g in enumerate(gens)] == [l * k] * B
    if k == 1:  # one candidate: the mixture is that code's embedding, as in the dense mixture
        dense = gumbel_mix(logits, 0.4, codebook, [torch.Generator().manual_seed(0) for _ in range(B)])
        torch.testing.assert_close(h, codebook[idx[..., 0]], rtol=1e-6, atol=0)
        torch.testing.assert_close(dense, h, rtol=1e-6, atol=0)


def test_topk_sampling_has_the_multinomial_law():
    """The draw over the kept candidates has the filtered softmax's distribution:
    frequencies of 200,000 draws within 5 standard errors of the probabilities."""
    from hart_fast.sampling import filter_top_k_top_p_, kept_candidates, multinomial_sample_topk

    V, k, n = 40, 6, 200_000
    logits = filter_top_k_top_p_(torch.randn(1, 1, V, generator=torch.Generator().manual_seed(1)) * 1.5, k, 0.0)
    p = logits.softmax(-1).double().view(V)
    vals, idx = kept_candidates(logits.expand(1, n, V).contiguous(), k)
    codes = multinomial_sample_topk(vals, idx, torch.Generator().manual_seed(2)).view(-1)
    freq = torch.bincount(codes, minlength=V).double() / n
    se = (p * (1 - p) / n).sqrt()
    assert (freq[p == 0] == 0).all()
    assert ((freq - p).abs() <= 5 * se + 1e-12).all(), (freq, p)


def test_topk_sampling_in_the_loop(model_dir):
    """Deterministic for a seed on both backends, another image than the dense draw,
    and a no-op when top-k keeps everything (the tiny model's V is below the
    official schedule's 300-600, so top_k is set here)."""
    kw = dict(seed=4, more_smooth=True, output_type="latent", topk_sampling=True, diffusion_steps="4", top_k=5)
    for fast in (False, True):
        pipe = HartPipeline.from_pretrained(model_dir, fast=fast)
        ctx, mask = _prompts(pipe)
        a = pipe.generate(ctx, mask, **kw)
        assert torch.isfinite(a).all() and torch.equal(pipe.generate(ctx, mask, **kw), a)
        assert not torch.equal(pipe.generate(ctx, mask, **dict(kw, topk_sampling=False)), a)
        V = pipe.tokenizer.quantize.embedding.weight.shape[0]
        everything = pipe.generate(ctx, mask, **dict(kw, top_k=V))
        assert torch.equal(everything, pipe.generate(ctx, mask, **dict(kw, top_k=V, topk_sampling=False)))


@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast"])
def test_topk_sampling_skips_the_filter_of_unguided_stages(model_dir, fast, monkeypatch):
    """With topk_sampling and no top-p, an unguided stage takes its kept candidates
    from the raw logits: the backend's top-k filter runs only for guided stages
    (and for every stage once top-p or the dense draw needs filtered logits)."""
    pipe = HartPipeline.from_pretrained(model_dir, fast=fast)
    backend = type(pipe.engine) if fast else ReferenceBackend
    calls = []
    original = backend.guide

    def counting(logits, t, top_k, top_p):
        calls.append(t is None)
        return original(logits, t, top_k, top_p)

    monkeypatch.setattr(backend, "guide", staticmethod(counting))
    ctx, mask = _prompts(pipe)
    kw = dict(seed=4, output_type="latent", diffusion_steps="4", top_k=5, guidance_until=-2)
    n_guided = guided_stages(-2, len(PN))
    for extra, unguided_filters in [({"topk_sampling": True}, 0), ({"topk_sampling": False}, len(PN) - n_guided),
                                    ({"topk_sampling": True, "top_p": 0.9}, len(PN) - n_guided)]:
        calls.clear()
        pipe.generate(ctx, mask, **kw, **extra)
        assert calls.count(False) == n_guided and calls.count(True) == unguided_filters, (extra, calls)


def test_presets_fill_only_unset_levers():
    assert resolve_levers("exact") == {k: None for k in LEVERS}
    assert set(LEVERS) == {"guidance_until", "prune_ratios", "diffusion_steps", "topk_sampling", "int8_weights",
                           "fp8_weights", "cpu_bf16"}
    fastest = resolve_levers("fastest")
    assert {k: fastest[k] for k in SPEED_PRESETS["fastest"]} == SPEED_PRESETS["fastest"]
    assert resolve_levers("fastest", guidance_until=3, diffusion_steps=8)["guidance_until"] == 3
    assert resolve_levers("fastest", diffusion_steps=8)["diffusion_steps"] == 8


@pytest.mark.parametrize("kw, match", [
    ({"speed": "ludicrous"}, "speed must be one of"),
    ({"speed": None}, "speed must be one of"),
    ({"prune_ratios": (1.0,)}, r"prune_ratios\[0\] must be a fraction"),
    ({"prune_ratios": (0.5, -0.1)}, r"prune_ratios\[1\] must be a fraction"),
    ({"prune_ratios": 0.5}, "prune_ratios must be a sequence"),
    ({"prune_ratios": ()}, "prune_ratios: an empty sequence"),
    ({"prune_ratios": (0.1,) * 5}, "between 1 and 4 of the last ones"),
    ({"guidance_until": 7}, "guidance_until must be None or an integer in"),
    ({"guidance_until": -7}, "guidance_until must be None or an integer in"),
    ({"guidance_until": 1.5}, "guidance_until must be an integer"),
])
def test_bad_lever_values_name_the_option(model_dir, kw, match):
    pipe = HartPipeline.from_pretrained(model_dir, fast=False)
    ctx, mask = _prompts(pipe)
    with pytest.raises(ValueError, match=match):
        pipe.generate(ctx, mask, **kw)


def test_ssim_against_closed_forms():
    from hart_fast.eval.quality import ssim_uint8

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert ssim_uint8(img, img) == pytest.approx(1.0, rel=1e-12)
    # Flat images: only the luminance term is left, (2 m1 m2 + c1) / (m1^2 + m2^2 + c1).
    a, b = np.full((20, 20, 3), 100, np.uint8), np.full((20, 20, 3), 160, np.uint8)
    c1 = (0.01 * 255) ** 2
    assert ssim_uint8(a, b) == pytest.approx((2 * 100 * 160 + c1) / (100 ** 2 + 160 ** 2 + c1), rel=1e-9)
    noisy = [np.clip(img + rng.normal(0, s, img.shape), 0, 255).astype(np.uint8) for s in (5, 20, 60)]
    scores = [ssim_uint8(img, n) for n in noisy]
    assert 1 > scores[0] > scores[1] > scores[2] > 0


def test_cli_speed_mode_is_recorded_and_reproducible(tmp_path):
    import json

    from PIL import Image

    import hart_fast
    from hart_fast import cli

    out = tmp_path / "fast.png"
    prompt = "a yellow star on a blue background"
    assert cli.main(["generate", prompt, "--speed", "fastest", "--prune-ratios", "0.5,0.75", "--device", "cpu",
                     "--out", str(out), "-q"]) == 0
    im = Image.open(out)
    meta = json.loads(im.text["hart_fast"])
    assert meta["speed"] == "fastest" and meta["prune_ratios"] == [0.5, 0.75]
    # What the preset resolved to on this machine (its extras depend on the CPU).
    assert meta["levers"]["guidance_until"] == -3 and meta["levers"]["diffusion_steps"] == 4
    from hart_fast.speed import cpu_native_bf16

    # int8 projections on the CPU fast path, or bfloat16 ones where the CPU has native bfloat16.
    assert meta["levers"]["int8_weights"] is (not cpu_native_bf16())
    again = hart_fast.generate(prompt, seed=meta["seed"], speed="fastest", prune_ratios=(0.5, 0.75))
    exact = hart_fast.generate(prompt, seed=meta["seed"])
    assert np.array_equal(np.asarray(again), np.asarray(im.convert("RGB")))
    assert not np.array_equal(np.asarray(exact), np.asarray(again))


def test_int8_linear_is_close_to_the_float_one():
    from hart_fast.quantize import Int8Linear

    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    x = torch.randn(3, 10, 64, generator=g)
    want = lin(x).detach()
    got = Int8Linear(lin.weight, lin.bias)(x)
    assert got.shape == want.shape and got.dtype == want.dtype
    # 8-bit weights and 7-bit activations: a few percent of the output's norm.
    assert float((got - want).norm() / want.norm()) < 0.05
    assert torch.equal(got, Int8Linear(lin.weight, lin.bias)(x))


def test_int8_weights_run_the_quantized_engine(model_dir):
    from hart_fast.quantize import Int8Linear

    pipe = HartPipeline.from_pretrained(model_dir, fast=True)
    ctx, mask = _prompts(pipe)
    tr_f, f_float, _ = _run(pipe, ctx, mask)
    tr_q, f_q, _ = _run(pipe, ctx, mask, int8_weights=True)
    assert all(isinstance(bw.qkv, Int8Linear) and isinstance(bw.proj, Int8Linear)
               for bw in pipe.quantized_engine("int8").blocks)
    assert not any(isinstance(bw.qkv, Int8Linear) for bw in pipe.engine.blocks)
    # Stage 0 reads only the context (later stages follow codes that may differ).
    a, b = tr_q["stage00/logits"], tr_f["stage00/logits"]
    assert 0 < float((a - b).norm() / b.norm()) < 0.1
    assert torch.isfinite(f_q).all()
    assert torch.equal(f_q, _run(pipe, ctx, mask, int8_weights=True)[1])
    # The float engine is untouched by the int8 one, whose KV cache and buffers it shares.
    assert pipe.quantized_engine("int8").states is pipe.engine.states
    assert torch.equal(f_float, _run(pipe, ctx, mask)[1])
    _run(pipe, ctx[:1], mask[:1])  # another batch size through the shared state, then back
    assert torch.equal(f_q, _run(pipe, ctx, mask, int8_weights=True)[1])


def test_lever_types_are_checked_before_any_model():
    from hart_fast.options import validate_options

    for kw, match in (({"int8_weights": "yes"}, "int8_weights must be True or False"),
                      ({"fp8_weights": 1}, "fp8_weights must be True or False"),
                      ({"cpu_bf16": "on"}, "cpu_bf16 must be True or False"),
                      ({"speed": "warp"}, "speed must be one of"),
                      ({"prune_ratios": (2.0,)}, r"prune_ratios\[0\]"),
                      ({"guidance_until": "last"}, "guidance_until must be an integer")):
        with pytest.raises(ValueError, match=match):
            validate_options(**kw)


def test_int8_weights_where_they_cannot_run(model_dir):
    ref = HartPipeline.from_pretrained(model_dir, fast=False)
    ctx, mask = _prompts(ref)
    with pytest.raises(ValueError, match="int8_weights runs on the fast path only"):
        ref.generate(ctx, mask, int8_weights=True)
    # A preset only uses the levers the pipeline runs: no int8 on the reference path,
    # no error, and the same image as those levers given by hand. (The levers come
    # from ref.levers: on a CPU with native bfloat16 the preset adds cpu_bf16.)
    from hart_fast.speed import cpu_native_bf16

    levers = ref.levers("fastest")
    on = {k: v for k, v in levers.items() if v is not None}
    extras = {"cpu_bf16": True, "int8_weights": False} if cpu_native_bf16() else {}
    assert on == {**SPEED_PRESETS["fastest"], **extras}
    assert torch.equal(ref.generate(ctx, mask, seed=1, speed="fastest"), ref.generate(ctx, mask, seed=1, **levers))
    fast = HartPipeline.from_pretrained(model_dir, fast=True)
    fast.device = torch.device("cuda")  # validation only: nothing runs
    with pytest.raises(ValueError, match="int8_weights runs on the CPU only"):
        fast.validate_options(int8_weights=True)
    with pytest.raises(ValueError, match="int8_weights must be True or False"):
        HartPipeline.from_pretrained(model_dir, fast=True).generate(ctx, mask, int8_weights="yes")


def test_hardware_extras_follow_the_pipeline(monkeypatch):
    from hart_fast import speed

    for native in (False, True):
        monkeypatch.setattr(speed, "cpu_native_bf16", lambda native=native: native)
        traits = speed.pipeline_traits(torch.device("cpu"), torch.float32, True)
        assert ("cpu_native_bf16" in traits) == native and "cpu_fast_path" in traits
        fastest = resolve_levers("fastest", traits=traits)
        # Native bfloat16 replaces the int8 projections with bfloat16 ones.
        assert fastest["int8_weights"] is (not native) and fastest["cpu_bf16"] is (True if native else None)
        assert resolve_levers("exact", traits=traits) == {k: None for k in LEVERS}
        # An explicit False wins over the preset's extra.
        assert resolve_levers("fastest", traits=traits, cpu_bf16=False)["cpu_bf16"] is False
    # bfloat16 only for a float32 CPU pipeline; int8 only on the CPU fast path.
    assert speed.pipeline_traits(torch.device("cpu"), torch.bfloat16, True) == {"cpu_fast_path"}
    assert speed.pipeline_traits(torch.device("cuda"), torch.float32, True) == frozenset()
    assert speed.pipeline_traits(torch.device("cpu"), torch.float32, False) == {"cpu_native_bf16"}
    # fastest prunes models with large last scales only (HART's 64, the medium 16; not the demo's 8).
    for last, pruned in ((8, False), (speed.MIN_PRUNED_LAST_SCALE, True), (64, True)):
        traits = speed.pipeline_traits(torch.device("cuda"), torch.float16, True, last_scale=last)
        assert resolve_levers("fastest", traits=traits)["prune_ratios"] == ((0.5, 0.75) if pruned else None)
        assert resolve_levers("balanced", traits=traits)["prune_ratios"] is None
    with pytest.raises(TypeError, match="unknown speed lever"):
        resolve_levers("fastest", warp_drive=True)


def test_fp8_linear_is_its_quantized_arithmetic():
    """Fp8Linear on the CPU (torch._scaled_mm runs there too): the product of its fp8
    operands with their scales, close to the float linear, rows scaled one by one."""
    from hart_fast.quantize import FP8_MAX, Fp8Linear, fp8_quantize_rows

    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    x = torch.randn(3, 10, 64, generator=g) * torch.logspace(-2, 2, 10).reshape(1, 10, 1)  # rows of any size
    q = Fp8Linear(lin.weight, lin.bias)
    got = q(x)
    assert got.shape == (3, 10, 48) and got.dtype == x.dtype
    x_q, sx = fp8_quantize_rows(x.reshape(-1, 64))
    assert x_q.dtype == torch.float8_e4m3fn and float(x_q.float().abs().max()) <= FP8_MAX
    # Every fp8 product is exact in float32; only the order of the sums differs.
    want = (x_q.float() * sx[:, None]) @ (q.w_NK.float() * q.w_scale_N[:, None]).T + lin.bias.detach()
    bound = (x_q.float().abs() * sx[:, None]) @ (q.w_NK.float().abs() * q.w_scale_N[:, None]).T
    assert torch.all((got.reshape(-1, 48) - want).abs() <= 1e-5 * bound + 1e-6 * want.abs())
    # 3 mantissa bits per operand: a few percent of the output's norm.
    ref = lin(x).detach()
    assert 0 < float((got - ref).norm() / ref.norm()) < 0.08
    # A row's scale is its own: scaling one row leaves the others' quantisation alone.
    x2 = x.clone()
    x2[0, 0] *= 1000
    x2_q, _ = fp8_quantize_rows(x2.reshape(-1, 64))
    assert torch.equal(x2_q[1:].view(torch.uint8), x_q[1:].view(torch.uint8))
    # Sizes the fp8 GEMM cannot take keep the float weight.
    odd = torch.nn.Linear(40, 24)
    assert torch.equal(Fp8Linear(odd.weight, odd.bias)(x[..., :40]), odd(x[..., :40]).detach())


def test_fp8_engine_runs_the_loop(model_dir):
    """The fp8 engine's arithmetic through the whole loop, on the CPU (where the lever
    itself is refused: there is nothing to win there)."""
    from hart_fast.engine import FastEngine
    from hart_fast.generation import generate_latent
    from hart_fast.quantize import Fp8Linear

    pipe = HartPipeline.from_pretrained(model_dir, fast=True)
    ctx, mask = _prompts(pipe)
    eng = FastEngine(pipe.transformer, pipe.tokenizer, weights="fp8")
    assert all(isinstance(bw.qkv, Fp8Linear) and isinstance(bw.proj, Fp8Linear) for bw in eng.blocks)

    def run(backend):
        trace = {}
        f = generate_latent(pipe.transformer, pipe.tokenizer, backend, ctx, mask, guidance_scale=4.5, seed=5,
                            top_k=None, top_p=0.0, more_smooth=False, residual_diffusion=True,
                            schedule=pipe.schedule("4"), diffusion_temperature=1.0, residual_latents=None,
                            token_sampler=greedy, trace=trace)
        return trace, f

    tr_q, f_q = run(eng)
    tr_f, _ = run(pipe.engine)
    a, b = tr_q["stage00/logits"], tr_f["stage00/logits"]
    assert 0 < float((a - b).norm() / b.norm()) < 0.1
    assert torch.isfinite(f_q).all() and torch.equal(f_q, run(eng)[1])
    with pytest.raises(ValueError, match="weights must be 'float', 'int8' or 'fp8'"):
        FastEngine(pipe.transformer, pipe.tokenizer, weights="int4")


def test_fp8_weights_where_they_cannot_run(model_dir, monkeypatch):
    ctx, mask = _prompts(HartPipeline.from_pretrained(model_dir, fast=False))
    with pytest.raises(ValueError, match="fp8_weights runs on the fast path only"):
        HartPipeline.from_pretrained(model_dir, fast=False).generate(ctx, mask, fp8_weights=True)
    fast = HartPipeline.from_pretrained(model_dir, fast=True)
    with pytest.raises(ValueError, match=r"fp8_weights needs a CUDA GPU of compute capability 8.9 .*runs on cpu; "
                                         "on the CPU use int8_weights"):
        fast.generate(ctx, mask, fp8_weights=True)
    # Validation only (nothing runs): a Hopper pipeline refuses int8 with fp8.
    from hart_fast import quantize

    monkeypatch.setattr(quantize, "fp8_supported", lambda device: True)
    fast.device = torch.device("cuda")
    fast.validate_options(fp8_weights=True)
    with pytest.raises(ValueError, match="int8_weights and fp8_weights exclude each other"):
        fast.validate_options(fp8_weights=True, int8_weights=True)
    with pytest.raises(ValueError, match="int8_weights runs on the CPU only"):
        fast.validate_options(int8_weights=True)
    with pytest.raises(ValueError, match="cpu_bf16 is a CPU lever"):
        fast.validate_options(cpu_bf16=True)


def test_cpu_bf16_runs_a_bfloat16_copy(model_dir):
    pipe = HartPipeline.from_pretrained(model_dir, fast=True)
    ctx, mask = _prompts(pipe)
    f_float = _run(pipe, ctx, mask)[1]
    trace, f_bf, _ = _run(pipe, ctx, mask, cpu_bf16=True)
    assert pipe.bf16_pipeline.dtype == torch.bfloat16 and pipe.dtype == torch.float32
    assert pipe.bf16_pipeline.transformer.word_embed.weight.dtype == torch.bfloat16
    assert pipe.transformer.word_embed.weight.dtype == torch.float32  # the float32 modules untouched
    assert f_bf.dtype == torch.float32 and f_bf.shape == f_float.shape and torch.isfinite(f_bf).all()
    # bfloat16 (8 mantissa bits): stage 0's logits within a few percent of float32's.
    a, b = trace["stage00/logits"], _run(pipe, ctx, mask)[0]["stage00/logits"]
    assert 0 < float((a - b).norm() / b.norm()) < 0.05
    assert torch.equal(f_bf, _run(pipe, ctx, mask, cpu_bf16=True)[1])
    assert torch.equal(f_float, _run(pipe, ctx, mask)[1])
    img = pipe.generate(ctx, mask, seed=2, cpu_bf16=True, speed="fastest")
    assert img.dtype == torch.float32 and img.shape[0] == 2 and float(img.min()) >= 0 and float(img.max()) <= 1
    bf = HartPipeline.from_pretrained(model_dir, fast=True, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="cpu_bf16 runs a float32 pipeline in bfloat16; this one is already"):
        bf.generate(ctx, mask, cpu_bf16=True)


def test_cli_levers_reach_the_pipeline(tmp_path, capsys):
    import json

    from PIL import Image

    import hart_fast
    from hart_fast import cli

    out = tmp_path / "bf16.png"
    assert cli.main(["generate", "a red circle on a blue background", "--cpu-bf16", "--device", "cpu",
                     "--out", str(out), "-q"]) == 0
    im = Image.open(out)
    meta = json.loads(im.text["hart_fast"])
    assert meta["cpu_bf16"] is True and meta["fp8_weights"] is None and meta["levers"]["cpu_bf16"] is True
    # The lever reached the pipeline: the PNG is the bfloat16 image, not the float32 one.
    pixels = np.asarray(im.convert("RGB"))
    prompt = "a red circle on a blue background"
    assert np.array_equal(pixels, np.asarray(hart_fast.generate(prompt, seed=meta["seed"], cpu_bf16=True)))
    assert not np.array_equal(pixels, np.asarray(hart_fast.generate(prompt, seed=meta["seed"])))
    # --no-X turns off a lever the preset adds.
    off = tmp_path / "off.png"
    assert cli.main(["generate", prompt, "--speed", "fastest", "--no-int8-weights", "--device", "cpu",
                     "--out", str(off), "-q"]) == 0
    meta_off = json.loads(Image.open(off).text["hart_fast"])
    assert meta_off["int8_weights"] is False and meta_off["levers"]["int8_weights"] is False
    # fp8 on the CPU: refused before anything is written.
    assert cli.main(["generate", "a red circle on a blue background", "--fp8-weights", "--device", "cpu",
                     "--out", str(tmp_path / "fp8.png"), "-q"]) != 0
    assert not (tmp_path / "fp8.png").exists()
    assert "fp8_weights needs a CUDA GPU" in capsys.readouterr().err


def test_batch_refuses_a_lever_the_cpu_cannot_run_before_any_work(tmp_path):
    from hart_fast.api import GenerationSettings
    from hart_fast.batch import PromptFileError, run_batch

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle on a blue background\n")
    out = tmp_path / "out"
    with pytest.raises(PromptFileError, match="fp8_weights needs a CUDA GPU"):
        run_batch(str(prompts), str(out), device="cpu", settings=GenerationSettings(fp8_weights=True))
    assert not out.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp8 GEMMs on the tensor cores need a CUDA GPU")
def test_fp8_engine_on_the_gpu_graphed_and_eager(model_dir):
    """On a GPU with fp8 (compute capability 8.9+): the fp8 engine captured in CUDA
    graphs gives what it gives eagerly, and stays near the float engine."""
    from hart_fast.engine import FastEngine
    from hart_fast.quantize import fp8_supported

    if not fp8_supported("cuda"):
        pytest.skip("this GPU has no fp8 tensor cores (compute capability < 8.9)")
    pipe = HartPipeline.from_pretrained(model_dir, device="cuda", dtype=torch.float16, fast=True)
    ctx, mask = (t.cuda() for t in _prompts(pipe))
    graphed = _run(pipe, ctx, mask, fp8_weights=True)
    assert pipe.quantized_engine("fp8").use_cuda_graphs
    pipe._quantized_engines["fp8"] = FastEngine(pipe.transformer, pipe.tokenizer, use_cuda_graphs=False,
                                                weights="fp8")
    eager = _run(pipe, ctx, mask, fp8_weights=True)
    torch.testing.assert_close(graphed[1], eager[1], rtol=1e-3, atol=1e-3 * float(eager[1].abs().max()))
    a, b = graphed[0]["stage00/logits"].float(), _run(pipe, ctx, mask)[0]["stage00/logits"].float()
    assert 0 < float((a - b).norm() / b.norm()) < 0.1
