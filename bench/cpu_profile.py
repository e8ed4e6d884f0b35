"""Where the CPU time goes: the AR loop or the VAE decode, fast path vs reference.

    python bench/cpu_profile.py ar     # real widths, depth 4, stages up to 16 x 16
    python bench/cpu_profile.py vae    # real decoder, 16 x 16 latent (256 x 256 image)
    python bench/cpu_profile.py text   # the demo's text encoder: concatenated pass vs cached system prompt

Prints the median of 3 runs of each path (fp32, batch 1, random weights) and the
torch profiler's top ops for the fast path. The figures in BENCHMARKS.md's CPU
section come from this script.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from hart_shapes import REAL_LLM, REAL_TOK, SMALL_TOK, median_ms, randomize_, random_pipeline, random_prompts  # noqa: E402


def ar_runs():
    llm = {**REAL_LLM, "depth": 4, "patch_nums": [1, 2, 3, 4, 6, 8, 12, 16]}
    runs = {}
    for path in ("reference", "fast"):
        pipe = random_pipeline(llm, SMALL_TOK, "cpu", torch.float32, fast=path == "fast")
        ctx, mask = random_prompts(pipe, 1)
        runs[path] = (lambda p=pipe, c=ctx, m=mask:
                      p.generate(c, m, residual_diffusion=False, output_type="latent", seed=0))
    return runs


def vae_runs():
    from hart_fast.config import TokenizerConfig
    from hart_fast.model.tokenizer import HartTokenizer
    from hart_fast.model.vae_fast import fhat_to_img_fast

    tok = HartTokenizer(TokenizerConfig.from_dict(dict(REAL_TOK)), with_encoder=False).eval()
    randomize_(tok, 1)
    f_hat = torch.randn(1, 32, 16, 16, generator=torch.Generator().manual_seed(0))
    return {
        "reference": lambda: tok.fhat_to_img(f_hat),
        "fast": lambda: fhat_to_img_fast(tok, f_hat),
        "fast_channels_last": lambda: fhat_to_img_fast(tok, f_hat, channels_last=True),
    }


def text_encoder_times(rounds: int = 2) -> None:
    """The embedded demo's text encoder at batch 1 and 16, the official concatenated
    pass against the system prompt's cached keys and values, interleaved rounds."""
    import warnings

    from hart_fast.demo import DEMO_DIR
    from hart_fast.text_encoder import QwenTextEncoder

    path = os.path.join(DEMO_DIR, "text_encoder")
    encs = {name: QwenTextEncoder.from_pretrained(path, max_length=24, cache_system_prompt=name == "cached")
            for name in ("concatenated", "cached")}
    prompt = ["a small red circle at the top left on a blue background"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for B in (1, 16):
            for r in range(rounds):
                for name, enc in encs.items():
                    ms = median_ms(lambda: enc(prompt * B), "cpu", 15, warmup=3)
                    print(f"text encoder batch {B} round {r} {name}: {ms:.2f} ms (median of 15)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=("ar", "vae", "text"))
    p.add_argument("--top", type=int, default=10)
    args = p.parse_args(argv)
    if args.what == "text":
        text_encoder_times()
        return 0
    runs = ar_runs() if args.what == "ar" else vae_runs()
    with torch.inference_mode():
        for name, fn in runs.items():
            print(f"{args.what} {name}: {median_ms(fn, 'cpu', 3):.0f} ms (median of 3)")
        with torch.profiler.profile() as prof:
            runs["fast"]()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
