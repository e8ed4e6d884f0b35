"""Prompt adherence of a model on scene prompts, measured by the pixel judge.

    python -m hart_fast.eval.quality [--model DIR] [--prompts 32] [--images 4]

For every prompt (single objects with all attributes in the caption; held-out
triples by default) it generates `images` images with the default settings and
seeds 0.. per prompt, judges each, and reports per-attribute accuracy.
"""

from __future__ import annotations

import argparse
import json
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from hart_fast.eval.judge import ATTRIBUTES, accuracy, judge
from hart_fast.train.scenes import Scene, heldout_prompts, seen_prompts


def generate_images(model, captions: Sequence[str], images_per_prompt: int, seed: int = 0, batch_size: int = 16,
                    **settings) -> List[np.ndarray]:
    """uint8 (H, W, 3) images, prompt-major (all images of prompt 0 first)."""
    import hart_fast

    x = hart_fast.generate(list(captions), model=model, seed=seed, images_per_prompt=images_per_prompt,
                           batch_size=batch_size, output_type="pt", **settings)
    x = x.reshape(-1, *x.shape[-3:])
    u8 = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return list(u8)


def adherence(model, scenes: Sequence[Scene], images_per_prompt: int = 4, seed: int = 0,
              **settings) -> Dict[str, float]:
    """Per-attribute accuracy (fractions) of a model on single-object scene prompts."""
    images = generate_images(model, [s.caption for s in scenes], images_per_prompt, seed, **settings)
    expanded = [s for s in scenes for _ in range(images_per_prompt)]
    return accuracy([judge(im) for im in images], expanded)


def ssim_uint8(a_HW3: np.ndarray, b_HW3: np.ndarray) -> float:
    """Mean SSIM of two uint8 RGB images (Wang et al. 2004: an 11x11 Gaussian
    window of sigma 1.5, K1 0.01, K2 0.03, peak 255), averaged over the channels."""
    x = torch.from_numpy(np.ascontiguousarray(a_HW3)).double().permute(2, 0, 1)[:, None]   # (3, 1, H, W)
    y = torch.from_numpy(np.ascontiguousarray(b_HW3)).double().permute(2, 0, 1)[:, None]
    ax = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(ax ** 2) / (2 * 1.5 ** 2))
    w = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None]
    conv = lambda t: torch.nn.functional.conv2d(t, w)  # noqa: E731  ('valid': no padding artefacts)
    mx, my = conv(x), conv(y)
    sxx, syy, sxy = conv(x * x) - mx ** 2, conv(y * y) - my ** 2, conv(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
    return float(s.mean())


def prompt_set(kind: str, n: int) -> List[Scene]:
    if kind == "heldout":
        return heldout_prompts(n)
    if kind == "seen":
        return seen_prompts(n)
    raise ValueError(f"prompt set must be 'heldout' or 'seen', got {kind!r}")


def format_row(name: str, acc: Dict[str, float]) -> str:
    return f"| {name} | " + " | ".join(f"{100 * acc[a]:.1f}" for a in (*ATTRIBUTES, "all")) + " |"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="hart_fast.eval.quality", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: the embedded demo)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--set", choices=["heldout", "seen"], default="heldout")
    ap.add_argument("--no-residual", action="store_true", help="residual diffusion off")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    acc = adherence(args.model, prompt_set(args.set, args.prompts), args.images,
                    residual_diffusion=not args.no_residual)
    if args.json:
        print(json.dumps(acc))
    else:
        print("| prompts | " + " | ".join((*ATTRIBUTES, "all")) + " |")
        print(format_row(f"{args.set} x{args.images}", acc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["generate_images", "adherence", "prompt_set", "format_row"]
