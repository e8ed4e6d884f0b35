"""HartPipeline.generate: determinism, options, output types and input validation."""

from __future__ import annotations

import pytest
import torch

from hart_fast.pipeline import HartPipeline

from numerics import assert_close_ulps
from tiny_models import random_prompts, write_model


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return HartPipeline.from_pretrained(write_model(str(tmp_path_factory.mktemp("gen"))))


@pytest.fixture(scope="module")
def prompts(pipe):
    return random_prompts(3, pipe.config.context_token, pipe.config.context_dim, seed=7)


def greedy(si, logits):
    return logits.argmax(-1)


def test_same_seed_same_image_twice(pipe, prompts):
    ctx, mask = prompts
    a = pipe.generate(ctx, mask, seed=5, more_smooth=True)
    b = pipe.generate(ctx, mask, seed=5, more_smooth=True)
    assert torch.equal(a, b)
    c = pipe.generate(ctx, mask, seed=6, more_smooth=True)
    assert not torch.equal(a, c)


def test_top_k_1_is_greedy(pipe, prompts):
    ctx, mask = prompts
    by_argmax = pipe.generate(ctx, mask, residual_diffusion=False, token_sampler=greedy)
    topk1 = pipe.generate(ctx, mask, residual_diffusion=False, top_k=1, seed=11)
    assert torch.equal(topk1, by_argmax)


def test_token_sampler_sees_cfg_logits_before_top_k(pipe, prompts):
    ctx, mask = prompts
    seen = []

    def sampler(si, logits):
        seen.append((si, tuple(logits.shape), bool(torch.isinf(logits).any())))
        return logits.argmax(-1)

    pipe.generate(ctx, mask, top_k=2, token_sampler=sampler, residual_diffusion=False)
    V = pipe.tokenizer.V
    assert [s[0] for s in seen] == list(range(pipe.config.num_stages))
    assert [s[1] for s in seen] == [(3, 1 if si == 0 else pn * pn, V) for si, pn in enumerate(pipe.config.patch_nums)]
    assert not any(s[2] for s in seen)  # unfiltered


def test_residual_diffusion_changes_only_the_last_scale(pipe, prompts):
    """With the same codes, residual diffusion on vs off changes nothing before
    the last scale, and the final latent by exactly the residual the diffusion
    produced (added to the last scale's code embeddings, no phi): a residual
    added anywhere else, scaled, or dropped fails here."""
    ctx, mask = prompts
    S, P, C, B = pipe.config.num_stages, pipe.config.patch_nums[-1], pipe.tokenizer.Cvae, ctx.shape[0]
    off_trace = {}
    off = pipe.generate(ctx, mask, residual_diffusion=False, token_sampler=greedy, output_type="latent",
                        trace=off_trace)
    codes = [off_trace[f"stage{si:02d}/idx"] for si in range(S)]
    g = torch.Generator().manual_seed(3)
    for steps in (None, 2):
        on_trace = {}
        on = pipe.generate(ctx, mask, residual_diffusion=True, token_sampler=lambda si, lg: codes[si].clone(),
                           output_type="latent", diffusion_temperature=0.0, diffusion_steps=steps,
                           residual_latents=torch.randn(B, P * P, C, generator=g), trace=on_trace)
        for si in range(S):
            names = ("logits", "idx") + (("f_hat", "next_input_latent") if si < S - 1 else ())
            for name in names:
                key = f"stage{si:02d}/{name}"
                assert torch.equal(on_trace[key], off_trace[key]), f"{key} changed with the residual diffusion"
        residual = on_trace["residual"]  # (B, L, C)
        assert residual.shape == (B, P * P, C) and residual.abs().max() > 1e-2
        # on = f + (h + r) and off = f + h, each rounded once: |(on - off) - r| is
        # at most half an ulp of each of |h + r|, |on| and |off| (the difference
        # itself is taken in float64), so 2 ulps of the largest of them.
        scale = max(t.abs().max().item() for t in (on, off, on_trace["final_tokens"]))
        assert_close_ulps(on.double() - off.double(), residual.transpose(1, 2).reshape(B, C, P, P), 2,
                          dtype=torch.float32, scale=scale, msg=f"diffusion_steps={steps}")


def test_output_types(pipe, prompts):
    ctx, mask = prompts
    pt = pipe.generate(ctx, mask, seed=1)
    assert pt.dtype == torch.float32 and pt.shape == (3, 3, 8, 8) and 0 <= pt.min() and pt.max() <= 1
    pil = pipe.generate(ctx, mask, seed=1, output_type="pil")
    assert len(pil) == 3 and pil[0].size == (8, 8) and pil[0].mode == "RGB"
    # PIL pixels are the tensor truncated to uint8, as the official sampler saves them.
    import numpy as np

    assert np.array_equal(np.asarray(pil[0]), (pt[0].permute(1, 2, 0) * 255).to(torch.uint8).numpy())


def test_bfloat16_close_to_float32(tmp_path, prompts):
    d = write_model(str(tmp_path / "m"))
    ctx, mask = prompts
    f32_trace = {}
    f32 = HartPipeline.from_pretrained(d).generate(ctx, mask, token_sampler=greedy, residual_diffusion=False,
                                                   trace=f32_trace)
    bf = HartPipeline.from_pretrained(d, dtype=torch.bfloat16)
    S = bf.config.num_stages
    codes = [f32_trace[f"stage{si:02d}/idx"] for si in range(S)]
    # Forced to float32's codes, the bfloat16 run differs by its arithmetic only.
    bf_trace = {}
    out = bf.generate(ctx, mask, token_sampler=lambda si, lg: codes[si].clone(), residual_diffusion=False,
                      trace=bf_trace)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    chosen, total = 0, 0
    for si in range(S):
        lg32, lgbf = f32_trace[f"stage{si:02d}/logits"], bf_trace[f"stage{si:02d}/logits"]
        # bf16 weights and activations (eps 2^-7): ~1 ulp of the logits' scale
        # measured (<= 1.35 ulps of max|logits|); 4 leaves a 3x margin.
        assert_close_ulps(lgbf, lg32, 4, dtype=torch.bfloat16, scale="max", msg=f"stage {si} logits")
        chosen += (lgbf.argmax(-1) == codes[si]).sum().item()
        total += codes[si].numel()
    # bf16's own greedy choice is float32's but for near ties (measured: 1 of 90 tokens flips).
    assert chosen >= 0.9 * total, f"bf16 picks float32's code for only {chosen} of {total} tokens"
    # Images in [0, 1]: measured max 0.021, mean 0.003.
    diff = (out - f32).abs()
    assert diff.max() < 0.05 and diff.mean() < 0.01, (diff.max().item(), diff.mean().item())
    # Free-running, bf16 may flip those near ties, and later stages then follow other codes.
    free_trace = {}
    free = bf.generate(ctx, mask, token_sampler=greedy, residual_diffusion=False, trace=free_trace)
    assert torch.isfinite(free).all() and 0 <= free.min() and free.max() <= 1
    first = free_trace["stage00/idx"]  # stage 0 sees the same input on both runs
    assert torch.equal(first, bf_trace["stage00/logits"].argmax(-1))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(guidance_scale=float("nan")), "guidance_scale"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(top_p=1.0), "top_p"),
        (dict(diffusion_steps=0), "diffusion_steps"),
        (dict(diffusion_steps=2000), "diffusion_steps"),
        (dict(diffusion_temperature=-1), "diffusion_temperature"),
        (dict(seed=-3), "seed"),
        (dict(output_type="png"), "output_type"),
        (dict(residual_latents=torch.zeros(3, 5, 4)), "residual_latents"),
    ],
)
def test_bad_options_are_clear_errors(pipe, prompts, kwargs, match):
    ctx, mask = prompts
    with pytest.raises(ValueError, match=match):
        pipe.generate(ctx, mask, **kwargs)


def test_bad_prompt_tensors(pipe, prompts):
    ctx, mask = prompts
    with pytest.raises(ValueError, match="expected \\(B, 6, 24\\)"):
        pipe.generate(ctx[:, :, :5])
    with pytest.raises(ValueError, match="prompt_mask"):
        pipe.generate(ctx, mask[:, :3])
    with pytest.raises(ValueError, match="batch size 0"):
        pipe.generate(ctx[:0])
    with pytest.raises(ValueError, match="token_sampler must return"):
        pipe.generate(ctx, mask, token_sampler=lambda si, lg: lg.argmax(-1).int())


def test_missing_mask_means_all_tokens_real(pipe, prompts):
    ctx, _ = prompts
    a = pipe.generate(ctx, None, seed=2)
    b = pipe.generate(ctx, torch.ones(ctx.shape[:2], dtype=torch.bool), seed=2)
    assert torch.equal(a, b)


def test_encode_reconstruct_roundtrip(pipe):
    """Image -> codes + residual -> latent is lossless against the encoder's latent."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 8, 8, generator=g)
    codes, residual = pipe.encode(images)
    assert [c.shape for c in codes] == [(2, p * p) for p in pipe.config.patch_nums]
    with torch.inference_mode():
        f = pipe.tokenizer.img_to_latent(images * 2 - 1)
    torch.testing.assert_close(pipe.latent_from_tokens(codes, residual), f, atol=1e-5, rtol=1e-5)
    rec = pipe.reconstruct(images)
    torch.testing.assert_close(rec, pipe.decode(f), atol=1e-5, rtol=0)
    coarse = pipe.reconstruct(images, with_residual=False)
    assert torch.equal(coarse, pipe.decode(pipe.latent_from_tokens(codes)))  # the codes alone
    assert not torch.allclose(coarse, rec)  # and the residual matters
    with pytest.raises(ValueError, match="must be 8x8"):
        pipe.encode(torch.rand(1, 3, 16, 16))


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
def test_an_image_depends_only_on_its_prompt_seed_and_settings(tmp_path, fast):
    """Alone, in a batch of 8 and at another position in the batch: the same codes at
    every stage and the same image up to float rounding (codes, Gumbel smoothing and
    residual-diffusion noise are drawn per row).  Bitwise equality is not promised:
    a GEMM over 2 rows and one over 16 may round a row differently (measured here:
    up to 1.3e-5 of the latent's scale), and the residual diffusion amplifies rare
    float32 differences (the two-level rule of the conformance set)."""
    from numerics import assert_mostly_close

    d = write_model(str(tmp_path / "m"))
    pipe = HartPipeline.from_pretrained(d, fast=fast)
    ctx, mask = random_prompts(8, pipe.config.context_token, pipe.config.context_dim, seed=11)
    seeds = [100 + 7 * i for i in range(8)]
    S = pipe.config.num_stages

    def run(rows, seed):
        trace = {}
        latent = pipe.generate(ctx[rows], mask[rows], seed=seed, more_smooth=True, output_type="latent", trace=trace)
        return latent, [trace[f"stage{si:02d}/idx"] for si in range(S)]

    batch, codes = run(list(range(8)), seeds)
    perm = [5, 2, 7, 0, 1, 6, 3, 4]
    moved, moved_codes = run(perm, [seeds[i] for i in perm])
    cases = [(k, run([k], [seeds[k]])) for k in (0, 3, 7)] + [(i, ((moved[j:j + 1]), [c[j:j + 1] for c in moved_codes]))
                                                              for j, i in enumerate(perm)]
    for k, (latent, row_codes) in cases:
        for si in range(S):
            assert torch.equal(row_codes[si][0], codes[si][k]), f"row {k}: stage {si} codes depend on the batch"
        assert_mostly_close(latent[0], batch[k], tight=1e-4, cap=2e-2, scale="max", msg=f"row {k} latent")
    # An int seed s gives row b the seed s + b; another seed gives another image.
    assert torch.equal(pipe.generate(ctx[2:4], mask[2:4], seed=5, output_type="latent"),
                       pipe.generate(ctx[2:4], mask[2:4], seed=[5, 6], output_type="latent"))
    other, other_codes = run([0], [seeds[0] + 1])
    assert not torch.equal(other_codes[-1][0], codes[-1][0])
    with pytest.raises(ValueError, match="seed: got 2 seeds for a batch of 3"):
        pipe.generate(ctx[:3], mask[:3], seed=[1, 2])
    with pytest.raises(ValueError, match=r"seed\[1\]"):
        pipe.generate(ctx[:2], mask[:2], seed=[1, -2])
