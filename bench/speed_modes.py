"""Speed modes (issue 14): every lever and preset timed against `exact` in the same
run, and its quality cost measured with the same seeds.

    python bench/speed_modes.py [--repeats 5] [--prompts 16] [--images 2] [--skip-medium] [--skip-quality]
                                [--only speed=balanced,speed=fastest]

1. Time on the CPU, the medium HART config of issue 14 (random fan-in weights,
   256 px, 10 scales) at batch 1 and 4: the median of `repeats` whole images
   (transformer loop + residual diffusion + decode), after one warm-up,
   the rows interleaved round by round.
2. Time on the trained demo (64 px, 6 scales) at batch 1 and 16.
3. Quality on the trained demo: the pixel judge's attribute accuracy on held-out
   prompts, and PSNR / SSIM of each image to the exact image of the same seed.

Prints markdown tables (pasted into BENCHMARKS.md, "Speed modes").
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hart_fast.eval.judge import ATTRIBUTES, accuracy, judge  # noqa: E402
from hart_fast.eval.quality import generate_images, ssim_uint8  # noqa: E402
from hart_fast.train.scenes import heldout_prompts  # noqa: E402
from hart_fast.train.tokenizer import psnr_uint8  # noqa: E402

MEDIUM_TOK = dict(vocab_size=4096, z_channels=32, ch=64, ch_mult=[1, 1, 2, 2, 4],
                  v_patch_nums=[1, 2, 3, 4, 5, 6, 8, 10, 13, 16], quantizer_type="var_hybrid",
                  share_quant_resi=4, quant_resi=0.5)
MEDIUM_LLM = dict(context_token=32, context_dim=256, depth=8, embed_dim=512, num_heads=8, mlp_ratio=4.0,
                  patch_nums=[1, 2, 3, 4, 5, 6, 8, 10, 13, 16], attn_type="llama", mlp_type="gpt2",
                  disable_aln=True, shared_aln=False, use_timestep_embed=True, sep_aln_pooling_mode="max",
                  use_context_norm=True, diff_width=256, diff_depth=3, num_sampling_steps="8", vae_path=None)

# Each row: a name and the generate() options that make it.
ROWS = [
    ("exact", {}),
    ("guidance_until=-1", {"guidance_until": -1}),
    ("guidance_until=-2", {"guidance_until": -2}),
    ("prune_ratios=(0.5, 0.75)", {"prune_ratios": (0.5, 0.75)}),
    ("diffusion_steps=4", {"diffusion_steps": 4}),
    ("topk_sampling", {"topk_sampling": True}),
    ("int8_weights", {"int8_weights": True}),
    ("guidance_until=-1, prune", {"guidance_until": -1, "prune_ratios": (0.5, 0.75)}),
    ("guidance_until=-2, prune, int8", {"guidance_until": -2, "prune_ratios": (0.5, 0.75), "int8_weights": True}),
    ("guidance_until=-3, prune, int8, steps 4", {"guidance_until": -3, "prune_ratios": (0.5, 0.75),
                                                 "int8_weights": True, "diffusion_steps": 4}),
    ("speed=balanced", {"speed": "balanced"}),
    ("speed=fastest", {"speed": "fastest"}),
    # What a CPU with native bfloat16 (AVX512-BF16 / AMX) adds to the presets
    # (hart_fast.speed.PRESET_EXTRAS); elsewhere torch emulates bfloat16.
    ("cpu_bf16", {"cpu_bf16": True}),
    ("speed=balanced+cpu_bf16", {"speed": "balanced", "cpu_bf16": True}),
    ("speed=fastest+cpu_bf16", {"speed": "fastest", "cpu_bf16": True}),
    # ... and the presets without it (on a native-bf16 CPU also without int8, which the
    # presets drop there; elsewhere the same as speed=...).
    ("speed=balanced-cpu_bf16", {"speed": "balanced", "cpu_bf16": False}),
    ("speed=fastest-cpu_bf16", {"speed": "fastest", "cpu_bf16": False}),
    # fastest without its pruning: what pruning costs in quality on a small model's small scales.
    ("speed=fastest-prune", {"speed": "fastest", "prune_ratios": (0.0, 0.0)}),
    # ... and without int8 projections (with cpu_bf16 the rest of the pipeline is bfloat16).
    ("speed=balanced-int8", {"speed": "balanced", "int8_weights": False}),
    ("speed=fastest-int8", {"speed": "fastest", "int8_weights": False}),
]


def time_rows(pipe, batches, repeats, seed=1):
    """{(row, batch): median ms} of whole images (latent + decode) with random prompt states.

    The rows are interleaved (one image of every row per round, `repeats` rounds),
    so a slow spell of the machine costs every row alike.
    """
    cfg = pipe.config
    out = {}
    for B in batches:
        g = torch.Generator().manual_seed(B)
        ctx = torch.randn(B, cfg.context_token, cfg.context_dim, generator=g)
        mask = torch.ones(B, cfg.context_token, dtype=torch.bool)
        ts = {name: [] for name, _ in ROWS}
        for name, kw in ROWS:
            pipe.generate(ctx, mask, seed=seed, **kw)  # warm-up (buffers, schedules)
        for _ in range(repeats):
            for name, kw in ROWS:
                t0 = time.perf_counter()
                pipe.generate(ctx, mask, seed=seed, **kw)
                ts[name].append((time.perf_counter() - t0) * 1e3)
        for name, _ in ROWS:
            out[(name, B)] = statistics.median(ts[name])
            print(f"  {name} batch {B}: {out[(name, B)]:.0f} ms", file=sys.stderr)
    return out


def time_table(title, times, batches):
    lines = [f"**{title}**", "", "| mode | " + " | ".join(f"batch {b} (ms) | x exact" for b in batches) + " |",
             "|---|" + "---|---|" * len(batches)]
    for name, _ in ROWS:
        cells = []
        for b in batches:
            t = times[(name, b)]
            cells.append(f"{t:.0f} | {times[('exact', b)] / t:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def quality_table(n_prompts, images):
    scenes = heldout_prompts(n_prompts)
    captions = [s.caption for s in scenes]
    expanded = [s for s in scenes for _ in range(images)]
    ref = None
    lines = ["| mode | " + " | ".join(ATTRIBUTES) + " | all | PSNR to exact (dB) | SSIM to exact |",
             "|---|" + "---|" * (len(ATTRIBUTES) + 3)]
    for name, kw in ROWS:
        imgs = np.stack(generate_images(None, captions, images, **kw))
        acc = accuracy([judge(im) for im in imgs], expanded)
        if ref is None:
            ref = imgs
            psnr, ssim = "-", "-"
        else:
            psnr = f"{psnr_uint8(imgs, ref):.1f}"
            ssim = f"{np.mean([ssim_uint8(a, b) for a, b in zip(imgs, ref)]):.3f}"
        lines.append(f"| {name} | " + " | ".join(f"{100 * acc[a]:.1f}" for a in (*ATTRIBUTES, "all"))
                     + f" | {psnr} | {ssim} |")
        print(f"  quality {name}: {acc}", file=sys.stderr)
    # Rows differ in their random draws (topk_sampling, fewer steps), so a row's
    # difference from exact has the sampling error of two independent proportions:
    # at most sqrt(2 * 0.25 / n).
    n = len(expanded)
    lines += ["", f"{n} images a row: one standard error of a row's difference from exact is at most "
              f"{100 * (0.5 / n) ** 0.5:.1f} points."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--skip-medium", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--only", default=None, help="comma-separated row names to run (exact is always run)")
    args = ap.parse_args()
    if args.only:
        keep = {"exact", *args.only.split(",")}
        ROWS[:] = [r for r in ROWS if r[0] in keep]

    from hart_fast.api import load_pipeline
    from hart_fast.demo import write_model_folder
    from hart_fast.pipeline import HartPipeline

    from hart_fast.speed import cpu_native_bf16

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, CPU "
          f"{torch.backends.cpu.get_cpu_capability()}, native bfloat16: {cpu_native_bf16()}")
    if not args.skip_medium:
        with tempfile.TemporaryDirectory() as tmp:
            d = write_model_folder(os.path.join(tmp, "medium"), MEDIUM_LLM, MEDIUM_TOK, with_encoder=False, seed=0)
            pipe = HartPipeline.from_pretrained(d)
            print(time_table("Medium config (random weights, 256 px), CPU fp32, median of "
                             f"{args.repeats}", time_rows(pipe, [1, 4], args.repeats), [1, 4]))
            print()
    demo = load_pipeline(None)
    print(time_table(f"Trained demo (64 px), CPU fp32, median of {args.repeats}",
                     time_rows(demo, [1, 16], args.repeats), [1, 16]))
    print()
    if not args.skip_quality:
        print(f"**Quality on the trained demo: {args.prompts} held-out prompts x {args.images} images, "
              "default settings, the same seeds**\n")
        print(quality_table(args.prompts, args.images))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
