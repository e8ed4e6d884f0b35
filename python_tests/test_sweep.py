"""Every model the reference runs, the fast path runs, with the same outputs.

Seeded random configurations (python_tests/model_sweep.py) are written in the
official on-disk layout and go through the public API on both paths
(`HartPipeline.from_pretrained(..., fast=True / False)`) with forced codes, so
every position of every stage matters:

* per-stage logits (what the token sampler sees: CFG-combined, before top-k),
  the decoder's input latent and the image, without residual diffusion;
* with residual diffusion at temperature 0 from given initial noise: the latent
  (two-level check, see below) and the image.

Tolerances (float32 on the CPU): the two paths differ only in floating-point
association (fused norms, a different attention kernel, GEMM shapes), so
logits agree to float32 ulps of the stage's logit scale: 160 ulps (~2e-5) of
max|logits| covers the CFG amplification of (1 + 2t) ~ 8 on ~1e-6 relative
head differences.  Latents before diffusion are sums of O(1) code embeddings
and agree to 80 ulps (~1e-5) of their scale; images are in [0, 1] (5e-5 absolute, as the
conformance set).  The residual diffusion's first IDDPM step multiplies float32
noise by ~2e4 where an x0 prediction lands inside the clip range, so the
residual uses the conformance set's two-level rule: >= 99% of elements within
1e-4 of the latent scale, all within 2e-2 of it.

Half precision (bf16 on the CPU here; fp16 and bf16 on CUDA, and fp32 there, in
the device check): the fast path's error against the float32 reference may be
at most twice the half-precision reference's own error (the flash-attention
rule, python_tests/numerics.py), per stage and for the latent and the image.
"""

from __future__ import annotations

import pytest
import torch

from hart_fast.pipeline import HartPipeline

from hart_fast.demo import write_model_folder

from model_sweep import NUM_CONFIGS, forced_codes, sweep_config, sweep_prompts
from numerics import assert_close_ulps, assert_mostly_close, assert_within_2x_error

NO_CUDA = "no CUDA device on this machine (the sweep runs on CUDA in the device check)"

CONFIGS = [sweep_config(i) for i in range(NUM_CONFIGS)]


def _scale(t: torch.Tensor) -> float:
    return max(float(t.abs().max()), 1e-30)


class Recorder:
    """A token sampler that returns the forced codes and keeps the logits it was shown."""

    def __init__(self, codes):
        self.codes, self.logits = codes, {}

    def __call__(self, si, logits):
        self.logits[si] = logits.clone()
        return self.codes[si][:, : logits.shape[1]].clone()


def _run(pipe, ctx, mask, codes, **kw):
    rec = Recorder(codes)
    latent = pipe.generate(ctx, mask, token_sampler=rec, output_type="latent", **kw)
    return rec.logits, latent, pipe.decode(latent)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    made = {}

    def get(cfg):
        if cfg["name"] not in made:
            made[cfg["name"]] = write_model_folder(str(root / cfg["name"]), cfg["llm"], cfg["tok"],
                                                   with_encoder=False, seed=cfg["seed"])
        return made[cfg["name"]]

    return get


FP32_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA))]


@pytest.mark.parametrize("device", FP32_DEVICES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=[c["name"] for c in CONFIGS])
def test_fast_path_matches_reference(cfg, folders, device):
    path = folders(cfg)
    ref = HartPipeline.from_pretrained(path, device=device, fast=False)
    fast = HartPipeline.from_pretrained(path, device=device)  # the default path
    assert fast.fast, "the default path must be the fast one when the extension is built"
    ctx, mask = sweep_prompts(cfg)
    codes = forced_codes(cfg, ref.tokenizer.V)

    ctx, mask, codes = ctx.to(device), mask.to(device), [c.to(device) for c in codes]
    logits_r, latent_r, image_r = _run(ref, ctx, mask, codes, residual_diffusion=False)
    logits_f, latent_f, image_f = _run(fast, ctx, mask, codes, residual_diffusion=False)
    assert sorted(logits_f) == sorted(logits_r) == list(range(len(cfg["llm"]["patch_nums"])))
    for si in logits_r:
        assert logits_f[si].shape == logits_r[si].shape
        assert_close_ulps(logits_f[si], logits_r[si], 160, dtype=torch.float32, scale="max",
                          msg=f"stage {si} logits")
    assert_close_ulps(latent_f, latent_r, 80, dtype=torch.float32, scale="max", msg="latent (no diffusion)")
    torch.testing.assert_close(image_f, image_r, atol=5e-5, rtol=0)  # images lie in [0, 1]

    L, Cvae = cfg["llm"]["patch_nums"][-1] ** 2, ref.tokenizer.Cvae
    noise = torch.randn(cfg["batch"], L, Cvae, generator=torch.Generator().manual_seed(cfg["seed"])).to(device)
    diff = dict(residual_diffusion=True, diffusion_temperature=0.0, residual_latents=noise)
    _, dlatent_r, dimage_r = _run(ref, ctx, mask, codes, **diff)
    _, dlatent_f, dimage_f = _run(fast, ctx, mask, codes, **diff)
    assert_mostly_close(dlatent_f, dlatent_r, tight=1e-4, cap=2e-2, scale="max", msg="latent (residual diffusion)")
    # The residual really is there (not a no-op on either path).
    assert float((dlatent_r - latent_r).abs().max()) > 1e-3 * _scale(latent_r)
    assert_mostly_close(dimage_f, dimage_r, tight=5e-4, cap=5e-2, msg="image (residual diffusion)")  # in [0, 1]


def _half_cases():
    """bf16 on the CPU for every third configuration (CI time: bf16 GEMMs are slow on
    CPUs without AMX); fp16 and bf16 on CUDA for all of them."""
    cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
    cases = [pytest.param(c, "cpu", torch.bfloat16, id=f"{c['name']}-cpu-bf16") for c in CONFIGS[::3]]
    for dt, tag in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
        cases += [pytest.param(c, "cuda", dt, id=f"{c['name']}-cuda-{tag}", marks=cuda) for c in CONFIGS]
    return cases


@pytest.mark.parametrize("cfg,device,dtype", _half_cases())
def test_fast_path_half_precision_within_2x_of_reference(cfg, folders, device, dtype):
    path = folders(cfg)
    truth = HartPipeline.from_pretrained(path, device=device, fast=False)  # float32
    ref = HartPipeline.from_pretrained(path, device=device, dtype=dtype, fast=False)
    fast = HartPipeline.from_pretrained(path, device=device, dtype=dtype)
    ctx, mask = (t.to(device) for t in sweep_prompts(cfg))
    codes = [c.to(device) for c in forced_codes(cfg, ref.tokenizer.V)]
    got = {name: _run(p, ctx, mask, codes, residual_diffusion=False)
           for name, p in (("truth", truth), ("ref", ref), ("fast", fast))}
    for si in got["truth"][0]:
        assert_within_2x_error(got["fast"][0][si], got["ref"][0][si], got["truth"][0][si], ulps=2,
                               ulp_dtype=dtype, msg=f"stage {si} logits")
    for k, what in ((1, "latent"), (2, "image")):
        assert_within_2x_error(got["fast"][k], got["ref"][k], got["truth"][k], ulps=2, ulp_dtype=dtype, msg=what)
