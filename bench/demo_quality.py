"""The demo model's quality table (issue 11): judge validation, tokenizer PSNR,
prompt adherence on held-out and seen prompts with the residual diffusion on and
off, the prompt-shuffle control, the CPU time of one image, and a sample grid.

    python bench/demo_quality.py [--model DIR] [--prompts 32] [--images 4] [--grid docs/demo_grid.png]

Prints markdown tables (pasted into BENCHMARKS.md) and writes the grid PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hart_fast.eval.judge import ATTRIBUTES, accuracy, judge, shape_by_size  # noqa: E402
from hart_fast.eval.quality import format_row as row  # noqa: E402
from hart_fast.eval.quality import generate_images  # noqa: E402
from hart_fast.train.scenes import heldout_prompts, render, scene_at, seen_prompts, to_tensor_pm1  # noqa: E402

COLS = (*ATTRIBUTES, "all")


def header(first):
    return f"| {first} | " + " | ".join(COLS) + " |\n|---|" + "---|" * len(COLS)


def tokenizer_psnr(model_dir, n=256):
    from hart_fast.loading import load_models
    from hart_fast.train.tokenizer import psnr_uint8, reconstruct, to_uint8

    _, tok, _ = load_models(model_dir)
    scenes = heldout_prompts(n)
    imgs = np.stack([render(sc) for sc in scenes])
    outs = {"codes_only": [], "with_residual": []}
    for i in range(0, n, 64):
        rec = reconstruct(tok, to_tensor_pm1(imgs[i:i + 64]), tok.cfg.v_patch_nums)
        for k in outs:
            outs[k].append(to_uint8(rec[k]))
    return {k: psnr_uint8(np.concatenate(v), imgs) for k, v in outs.items()}


def tokenizer_judged(model_dir, n=64):
    """The judge on the tokenizer's own reconstructions of held-out renders: what the
    decoder can draw at all, whatever the transformer samples."""
    from hart_fast.loading import load_models
    from hart_fast.train.tokenizer import reconstruct, to_uint8

    _, tok, _ = load_models(model_dir)
    scenes = heldout_prompts(n)
    rec = reconstruct(tok, to_tensor_pm1(np.stack([render(sc) for sc in scenes])), tok.cfg.v_patch_nums)
    return accuracy([judge(im) for im in to_uint8(rec["with_residual"])], scenes)


def old_random_model(tmp):
    """The previous embedded default (seeded random weights), for the chance row."""
    from hart_fast.demo import build_random_demo

    return build_random_demo(tmp)


def save_grid(path, images, captions, per_row):
    from PIL import Image, ImageDraw

    scale, pad, text_h = 2, 4, 14
    h = images[0].shape[0] * scale
    rows = len(images) // per_row
    W = 260 + per_row * (h + pad)
    grid = Image.new("RGB", (W, rows * (h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r in range(rows):
        y = pad + r * (h + pad)
        cap = captions[r]
        words, lines, cur = cap.split(), [], ""
        for w in words:
            if len(cur) + len(w) + 1 > 38:
                lines.append(cur)
                cur = w
            else:
                cur = f"{cur} {w}".strip()
        lines.append(cur)
        for k, ln in enumerate(lines):
            draw.text((6, y + 4 + k * text_h), ln, fill=(0, 0, 0))
        for c in range(per_row):
            im = Image.fromarray(images[r * per_row + c]).resize((h, h), Image.NEAREST)
            grid.paste(im, (260 + c * (h + pad), y))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grid.save(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: the embedded demo)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--grid", default=None, help="write a sample grid PNG here")
    ap.add_argument("--json", default=None, help="also write the numbers as JSON here")
    args = ap.parse_args()
    from hart_fast.demo import DEMO_DIR

    model = args.model or DEMO_DIR
    torch.manual_seed(0)
    results = {}

    print("## Judge validation (renderer images, single objects)\n")
    val = [sc for sc in (scene_at(99, i, "any") for i in range(600)) if len(sc.objects) == 1]
    results["judge_renders"] = accuracy([judge(render(sc)) for sc in val], val)
    held = heldout_prompts(args.prompts)
    with tempfile.TemporaryDirectory() as tmp:
        imgs = generate_images(old_random_model(os.path.join(tmp, "m")), [s.caption for s in held], args.images)
    rep = [s for s in held for _ in range(args.images)]
    results["judge_random_model"] = accuracy([judge(im) for im in imgs], rep)
    print(header("images"))
    print(row(f"renders ({len(val)})", results["judge_renders"]))
    print(row(f"old random demo model ({len(rep)})", results["judge_random_model"]))

    print("\n## Tokenizer on held-out renders (PSNR, dB)\n")
    results["psnr"] = tokenizer_psnr(model)
    print(f"codes only {results['psnr']['codes_only']:.2f} dB, codes + residual "
          f"{results['psnr']['with_residual']:.2f} dB")
    results["tokenizer_judged"] = tokenizer_judged(model)
    print(header("images"))
    print(row("tokenizer only (64 held-out renders, codes + residual)", results["tokenizer_judged"]))

    print(f"\n## Generation ({args.prompts} prompts x {args.images} images, default settings)\n")
    print(header("prompts"))
    seen = seen_prompts(args.prompts)
    grid_imgs = None
    for name, scenes, resid in (("held-out, residual on", held, True), ("held-out, residual off", held, False),
                                ("seen, residual on", seen, True)):
        imgs = generate_images(model, [s.caption for s in scenes], args.images, residual_diffusion=resid)
        rep = [s for s in scenes for _ in range(args.images)]
        js = [judge(im) for im in imgs]
        results[name] = accuracy(js, rep)
        results.setdefault("shape_by_size", {})[name] = shape_by_size(js, rep)
        print(row(name, results[name]))
        if name.startswith("held-out, residual on"):
            grid_imgs = imgs
            shuffled = rep[args.images:] + rep[:args.images]  # every image scored against another prompt
            results["control: scored against another prompt"] = accuracy(js, shuffled)
    print(row("control: scored against another prompt", results["control: scored against another prompt"]))
    print("\nshape by the asked size (small / large, %): " + "; ".join(
        f"{k} {100 * v.get('small', float('nan')):.1f} / {100 * v.get('large', float('nan')):.1f}"
        for k, v in results["shape_by_size"].items()))

    import hart_fast

    times = []
    hart_fast.generate(held[0].caption, model=model)  # load + warm
    for i in range(7):
        t0 = time.perf_counter()
        hart_fast.generate(held[0].caption, model=model, seed=i)
        times.append(time.perf_counter() - t0)
    results["one_image_s_median"] = statistics.median(times)
    print(f"\none image (batch 1, fp32, CPU, with the text encoder): median of 7 = "
          f"{1000 * results['one_image_s_median']:.0f} ms, torch threads {torch.get_num_threads()}")
    if args.grid:
        k = min(8, len(held))
        save_grid(args.grid, grid_imgs[:k * args.images], [s.caption for s in held[:k]], args.images)
        print(f"grid: {args.grid}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
