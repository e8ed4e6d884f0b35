"""The recipe of the embedded demo model: a small HART trained on procedural scenes.

    python -m hart_fast.train.recipe --work runs/demo       # or: hart-fast train demo --work runs/demo

Three stages, each resumable from its folder under --work (rerun the same command
after a kill and it carries on):

1. `tokenizer/`: the hybrid tokenizer on freshly rendered scenes;
2. `transformer/`: the AR transformer and the residual-diffusion MLP together, on
   the scenes' codes (encoded once with the trained tokenizer) and the frozen text
   encoder's states of their captions;
3. `model/`: the official-layout folder (llm/, tokenizer/, text_encoder/), which
   `hart_fast.HartPipeline.from_pretrained` and the official loader read.

Every batch and every random draw comes from (seed, step), so a rerun from scratch
reproduces the same model up to floating-point reduction order.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from typing import List, Optional

import torch

from hart_fast.train.common import step_seed, train_loop

DEMO_TOKENIZER = dict(
    vocab_size=512, z_channels=16, ch=32, ch_mult=[1, 1, 2, 2], v_patch_nums=[1, 2, 3, 4, 6, 8],
    quantizer_type="var_hybrid", share_quant_resi=4, quant_resi=0.5,
)
DEMO_TRANSFORMER = dict(
    context_token=32, context_dim=64, depth=4, embed_dim=128, num_heads=4, mlp_ratio=4.0,
    patch_nums=[1, 2, 3, 4, 6, 8], attn_type="llama", mlp_type="gpt2", disable_aln=False,
    shared_aln=False, use_timestep_embed=True, sep_aln_pooling_mode="max", use_context_norm=True,
    diff_width=128, diff_depth=3, num_sampling_steps="8", vae_path=None, cond_drop_rate=0.1,
)


@dataclasses.dataclass
class Recipe:
    seed: int = 0
    image_size: int = 64
    tok_steps: int = 1500
    tok_batch: int = 16
    tok_lr: float = 1.5e-3
    tr_scenes: int = 24000
    tr_steps: int = 3000
    tr_batch: int = 64
    tr_lr: float = 1e-3
    cond_drop: float = 0.1


def scene_images_fn(seed: int, batch: int, size: int):
    """images_fn(step) -> (batch, 3, size, size) in [-1, 1]: training scenes step*batch .. +batch."""
    from hart_fast.train.scenes import SceneDataset, to_tensor_pm1

    ds = SceneDataset(n=2**62, seed=seed, size=size, split="train")

    def images(step: int) -> torch.Tensor:
        imgs, _ = ds.batch(range(step * batch, (step + 1) * batch))
        return to_tensor_pm1(imgs)

    return images


def build_tokenizer(cfg_dict: dict, seed: int):
    from hart_fast.config import TokenizerConfig
    from hart_fast.model.tokenizer import HartTokenizer

    cfg = TokenizerConfig.from_dict(dict(cfg_dict))
    torch.manual_seed(seed)
    return HartTokenizer(cfg, with_encoder=True)


def train_tokenizer_stage(work: str, r: Recipe, progress: bool = True):
    from hart_fast.train.tokenizer import TokenizerStep

    tok = build_tokenizer(DEMO_TOKENIZER, step_seed(r.seed, 0, 10))
    step = TokenizerStep(tok, scene_images_fn(step_seed(r.seed, 0, 11) % 2**31, r.tok_batch, r.image_size),
                         DEMO_TOKENIZER["v_patch_nums"])
    run_dir = os.path.join(work, "tokenizer")
    train_loop(run_dir=run_dir, modules={"tokenizer": tok}, step_fn=step, steps=r.tok_steps, lr=r.tok_lr,
               warmup=50, seed=r.seed, desc="tokenizer", ckpt_every=100, log_every=10, progress=progress)
    return tok


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="hart_fast.train.recipe", description=__doc__.split("\n")[0])
    ap.add_argument("--work", required=True, help="folder for the stages' checkpoints and logs")
    ap.add_argument("--stage", choices=["tokenizer", "transformer", "export", "all"], default="all")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    r = Recipe()
    t0 = time.time()
    if args.stage in ("tokenizer", "all"):
        train_tokenizer_stage(args.work, r)
    print(f"done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
