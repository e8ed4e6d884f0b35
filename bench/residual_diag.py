"""What the residual diffusion does to a demo-architecture model's pictures (issue 11).

    python bench/residual_diag.py [--model DIR] [--prompts 32] [--images 4] [--old-judge]
    python bench/residual_diag.py --tokenizer [--model DIR] [--renders 128]

Default: the judge's per-attribute accuracy on held-out prompts with the residual
as inference draws it (guided with the last stage's scale), off, and drawn
three diagnostic ways the default path never uses -- guided at t = 2, unguided
on the conditional rows, unguided on the unconditional rows -- each with the RMS
of the residual the sampler returned, against the RMS of the true residual of
the same prompts' renders.

--tokenizer: the judge and PSNR on held-out renders reconstructed from their
codes alone, with their true residual, with that residual shuffled across
tokens, with Gaussian noise of its standard deviation and with half of it: how much of what
the judge reads the residual carries at all.

--old-judge: the judge's all-pixel colour vote of sessions before 10 (core share 0).
Prints markdown rows (pasted into BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hart_fast.eval import judge as judge_mod  # noqa: E402
from hart_fast.eval.judge import accuracy, judge  # noqa: E402
from hart_fast.eval.quality import format_row, generate_images  # noqa: E402
from hart_fast.train.scenes import heldout_prompts, render, to_tensor_pm1  # noqa: E402


def true_residual_rms(model, scenes) -> float:
    from hart_fast.loading import load_models

    _, tok, _ = load_models(model)
    with torch.no_grad():
        f = tok.img_to_latent(to_tensor_pm1(np.stack([render(s) for s in scenes])))
        _, resid = tok.latent_to_tokens(f, tok.cfg.v_patch_nums)
    return float(resid.pow(2).mean().sqrt())


def sampler_rows(model, n_prompts: int, images: int) -> None:
    from hart_fast.engine import FastEngine

    scenes = heldout_prompts(n_prompts)
    rep = [s for s in scenes for _ in range(images)]
    print(f"true residual RMS of the prompts' renders: {true_residual_rms(model, scenes):.3f}\n")
    print("| residual diffusion | background | color | shape | size | position | all | residual RMS |")
    print("|---|---|---|---|---|---|---|---|")
    orig = FastEngine.sample_residual
    rms = []

    def patched(how):
        def sample(self, net, z, t, sched, **kw):
            if how == "t2":
                t = 2.0
            elif how == "cond":
                t = 1.0            # the sampler's unguided path reads the first (conditional) half
            elif how == "uncond":
                N = z.shape[0] // 2
                z, t = torch.cat([z[N:], z[N:]]), 1.0
            r = orig(self, net, z, t, sched, **kw)
            rms.append(float(r.float().pow(2).mean().sqrt()))
            return r
        return sample

    rows = [("on (default: guided with the stage's scale)", "default", {}),
            ("off", "default", {"residual_diffusion": False}),
            ("guided with t = 2 instead (diagnostic only)", "t2", {}),
            ("unguided: the conditional rows alone (diagnostic only)", "cond", {}),
            ("unguided on the unconditional rows (diagnostic only)", "uncond", {})]
    try:
        for name, how, kw in rows:
            FastEngine.sample_residual = patched(how)
            rms.clear()
            imgs = generate_images(model, [s.caption for s in scenes], images, **kw)
            row = format_row(name, accuracy([judge(im) for im in imgs], rep))
            print(f"{row} {np.mean(rms):.3f} |" if rms else f"{row} -- |", flush=True)
    finally:
        FastEngine.sample_residual = orig


def tokenizer_rows(model, n: int) -> None:
    from hart_fast.loading import load_models
    from hart_fast.train.tokenizer import psnr_uint8, to_uint8

    _, tok, _ = load_models(model)
    scenes = heldout_prompts(n)
    imgs = np.stack([render(s) for s in scenes])
    pn = tok.cfg.v_patch_nums
    print("| held-out renders | background | color | shape | size | position | all | PSNR dB |")
    print("|---|---|---|---|---|---|---|---|")
    with torch.no_grad():
        idx, resid = tok.latent_to_tokens(tok.img_to_latent(to_tensor_pm1(imgs)), pn)
        g = torch.Generator().manual_seed(0)
        flat = resid.reshape(-1, resid.shape[-1])
        shuffled = flat[torch.randperm(flat.shape[0], generator=g)].view_as(resid)
        for name, r in [("codes only", None), ("codes + true residual", resid),
                        ("codes + the residual shuffled across tokens", shuffled),
                        ("codes + Gaussian noise of its standard deviation",
                         torch.randn(resid.shape, generator=g) * resid.std()),
                        ("codes + half the true residual", 0.5 * resid)]:
            latent = tok.tokens_to_latent(idx, pn) if r is None else tok.tokens_to_latent(idx, pn, r)
            u8 = to_uint8(tok.fhat_to_img(latent))
            print(f"{format_row(name, accuracy([judge(im) for im in u8], scenes))} {psnr_uint8(u8, imgs):.2f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: the embedded demo)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--tokenizer", action="store_true", help="the tokenizer rows instead of the sampler rows")
    ap.add_argument("--renders", type=int, default=128)
    ap.add_argument("--old-judge", action="store_true", help="colour by all of an object's pixels (core share 0)")
    args = ap.parse_args()
    from hart_fast.demo import DEMO_DIR

    if args.old_judge:
        judge_mod.CORE_SHARE = 0.0
    model = args.model or DEMO_DIR
    torch.manual_seed(0)
    if args.tokenizer:
        tokenizer_rows(model, args.renders)
    else:
        sampler_rows(model, args.prompts, args.images)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
