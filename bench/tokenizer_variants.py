"""Which tokenizer variant learns the scenes' objects fastest per step (issue 11)?

    python bench/tokenizer_variants.py [--steps 500] [--batch 2] [--device cpu] \
        [--variants c64:64:plain:0,c64obj:64:refine:4,c128:128:plain:0]

A variant is NAME:CH:STREAM:OBJECT_WEIGHT: the demo tokenizer at width CH,
trained from scratch on the captioned stream ("plain") or the half-crowded one
("refine"), with object pixels weighted 1 + OBJECT_WEIGHT. Every variant sees
the same batches. After training, the 64 held-out renders are reconstructed
(continuous latent and codes only) and scored: PSNR, the object pixels' MSE,
and the judge's per-attribute accuracy. One JSON line per variant.

    python bench/tokenizer_variants.py --checkpoint WORK/tokenizer/checkpoint.pt [...]

scores saved tokenizer checkpoints of the demo recipe (`hart-fast train demo`)
the same way, one JSON line each: the rows of a run in progress.

    python bench/tokenizer_variants.py --model MODEL_DIR [--renders 192]

scores the tokenizer of an exported model folder (the embedded demo:
hart_fast/assets/hart-demo). Every score has the shape accuracy by object size
too (shape_small, shape_large, in percent).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hart_fast.eval.judge import accuracy, judge, shape_by_size  # noqa: E402
from hart_fast.train import recipe  # noqa: E402
from hart_fast.train.common import train_loop  # noqa: E402
from hart_fast.train.scenes import heldout_prompts, render, to_tensor_pm1  # noqa: E402
from hart_fast.train.tokenizer import TokenizerStep, object_mask, reconstruct, to_uint8  # noqa: E402


def run_variant(name: str, ch: int, stream: str, object_weight: float, steps: int, batch: int, device: str,
                renders: int = 64) -> dict:
    cfg = dict(recipe.DEMO_TOKENIZER, ch=ch)
    tok = recipe.build_tokenizer(cfg, 7).to(device)
    images = {"plain": recipe.scene_images_fn, "refine": recipe.refine_images_fn}[stream](123, batch, 64, device)
    step = TokenizerStep(tok, images, cfg["v_patch_nums"], object_weight=object_weight)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as run_dir:
        train_loop(run_dir=run_dir, modules={"tokenizer": tok}, step_fn=step, steps=steps, lr=1e-3, warmup=50,
                   seed=0, desc=name, ckpt_every=10**9, log_every=25, progress=False)
    train_s = time.time() - t0
    out = {"name": name, "ch": ch, "stream": stream, "object_weight": object_weight, "steps": steps, "batch": batch,
           "train_s": round(train_s)}
    return {**out, **score(tok, cfg["v_patch_nums"], device, renders)}


def score(tok, patch_nums, device="cpu", n: int = 64) -> dict:
    """The n held-out renders reconstructed by `tok` (continuous latent and codes
    only): PSNR, the object pixels' MSE and the judge's per-attribute accuracy."""
    scenes = heldout_prompts(n)
    x = to_tensor_pm1(np.stack([render(s) for s in scenes])).to(device)
    rec = reconstruct(tok.eval(), x, patch_nums)
    m = object_mask(x)
    out = {}
    for kind in ("with_residual", "codes_only"):
        r = rec[kind].float().clamp(-1, 1)
        judged = [judge(im) for im in to_uint8(r)]
        acc = accuracy(judged, scenes)
        acc.update({f"shape_{size}": v for size, v in shape_by_size(judged, scenes).items()})
        out[kind] = {"psnr": round(float(10 * torch.log10(4 / ((r - x) ** 2).mean())), 2),
                     "object_mse": round(float(((r - x) ** 2 * m).sum() / (3 * m.sum())), 4),
                     **{a: round(100 * v, 1) for a, v in acc.items()}}
    return out


def score_checkpoint(path: str, device: str = "cpu", n: int = 64) -> dict:
    """score() of the demo tokenizer saved in a train_loop checkpoint."""
    tok = recipe.build_tokenizer(recipe.DEMO_TOKENIZER, 0)
    ck = torch.load(path, map_location="cpu", weights_only=False)
    tok.load_state_dict(ck["modules"]["tokenizer"])
    return {"checkpoint": path, "step": ck["step"],
            **score(tok.to(device), recipe.DEMO_TOKENIZER["v_patch_nums"], device, n)}


def score_model(model_dir: str, device: str = "cpu", n: int = 64) -> dict:
    """score() of the tokenizer of an exported model folder (it needs its encoder)."""
    from hart_fast.loading import load_models

    _, tok, _ = load_models(model_dir)
    if not tok.has_encoder:
        raise SystemExit(f"{model_dir}: its tokenizer has no encoder weights, so it cannot reconstruct renders")
    return {"model": model_dir, **score(tok.float().to(device), tok.cfg.v_patch_nums, device, n)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--variants", default="c64:64:plain:0,c64obj:64:refine:4,c128:128:plain:0")
    p.add_argument("--checkpoint", action="append", default=[],
                   help="score this tokenizer checkpoint of the demo recipe instead (repeatable)")
    p.add_argument("--model", action="append", default=[],
                   help="score the tokenizer of this exported model folder instead (repeatable)")
    p.add_argument("--renders", type=int, default=64, help="held-out renders to score on")
    args = p.parse_args(argv)
    if args.model:
        for path in args.model:
            print(json.dumps(score_model(path, args.device, args.renders)), flush=True)
        return 0
    if args.checkpoint:
        for path in args.checkpoint:
            print(json.dumps(score_checkpoint(path, args.device, args.renders)), flush=True)
        return 0
    for spec in args.variants.split(","):
        name, ch, stream, ow = spec.split(":")
        print(json.dumps(run_variant(name, int(ch), stream, float(ow), args.steps, args.batch, args.device,
                                      args.renders)),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
