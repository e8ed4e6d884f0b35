"""Quick GPU timing of the fast path at the real 0.7B / 1024px shape (random weights).

    python bench/gpu_e2e.py [--batch 1] [--dtype float16]

Prints end-to-end ms per image and the AR transformer split (stages before the
last / last stage), medians of 3, device-synchronised.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from hart_shapes import REAL_LLM, REAL_TOK, ar_stage_times, median_ms, random_pipeline, random_prompts  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--batch", type=int, default=1)
p.add_argument("--dtype", default="float16")
p.add_argument("--reference", action="store_true", help="time the reference loop instead of the fast path")
a = p.parse_args()
dtype = getattr(torch, a.dtype)
pipe = random_pipeline(REAL_LLM, REAL_TOK, "cuda", dtype, fast=not a.reference)
ctx, mask = random_prompts(pipe, a.batch)
with torch.inference_mode():
    e2e = median_ms(lambda: pipe.generate(ctx, mask, seed=0), "cuda", repeats=3)
split = ar_stage_times(pipe, a.batch, repeats=3)
print(f"card {torch.cuda.get_device_name()} torch {torch.__version__} path {'reference' if a.reference else 'fast'} "
      f"dtype {a.dtype} batch {a.batch}: end-to-end {e2e:.1f} ms ({e2e / a.batch:.1f} ms/image), "
      f"AR stages before last {split['stages_before_last_ms']:.1f} ms, last stage {split['last_stage_ms']:.1f} ms")
