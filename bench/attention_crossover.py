"""Per-stage CUDA timing of ms_attention vs SDPA for filling CUDA_CROSSOVER.

    python bench/attention_crossover.py [--batch 2] [--dtype bf16]

Runs HART 1024px's stage sequence (context 300, patch_nums 1..64, H=24, d=64)
and prints, per stage, the kernel time of both backends measured with CUDA
events over many back-to-back calls (so Python / launch overhead is
amortised the same way for both).
"""

from __future__ import annotations

import argparse

import torch

import hart_fast.ops as ops

PATCH_NUMS = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)


def time_us(fn, iters=50):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / iters


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=2, help="batch including the CFG doubling")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--block-causal", action="store_true", help="also time the full block-causal pass")
    args = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    B, H, d = args.batch, 24, 64
    lens = [300] + [pn * pn for pn in PATCH_NUMS[1:]]
    total = sum(lens)
    g = torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn(B, H, total, d, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(B, H, total, d, device="cuda", dtype=dtype, generator=g)
    print(f"device {torch.cuda.get_device_name()}  B={B} H={H} d={d} {args.dtype}")
    print(f"{'lq':>6} {'kv':>6} {'ours_us':>9} {'sdpa_us':>9} {'faster':>6}")
    kv = 0
    for lq in lens:
        kv += lq
        q = torch.randn(B, H, lq, d, device="cuda", dtype=dtype, generator=g)
        t_ours = time_us(lambda: torch.ops.hart_fast.ms_attention(q, k, v, kv, 0.125))
        t_sdpa = time_us(lambda: ops.ms_attention_reference(q, k, v, kv, 0.125))
        err = (torch.ops.hart_fast.ms_attention(q, k, v, kv, 0.125).float()
               - ops.ms_attention_reference(q.float(), k.float(), v.float(), kv, 0.125)).abs().max().item()
        print(f"{lq:>6} {kv:>6} {t_ours:>9.1f} {t_sdpa:>9.1f} {'ours' if t_ours < t_sdpa else 'sdpa':>6}  err={err:.2e}")
    if args.block_causal:
        block_causal(B, dtype)


def block_causal(B, dtype):
    """The teacher-forced full pass (forward_full): one block-causal call over L tokens."""
    H, d = 24, 64
    g = torch.Generator(device="cuda").manual_seed(1)
    for patch_nums in (PATCH_NUMS[:10], PATCH_NUMS):
        lvl = [0] * 300
        for si, pn in enumerate(patch_nums[1:], start=1):
            lvl += [si] * (pn * pn)
        level = torch.tensor(lvl, device="cuda")
        L = level.numel()
        q, k, v = (torch.randn(B, H, L, d, device="cuda", dtype=dtype, generator=g) for _ in range(3))
        t_ours = time_us(lambda: torch.ops.hart_fast.ms_attention_block_causal(q, k, v, level, 0.125), iters=5)
        t_sdpa = time_us(lambda: ops.ms_attention_block_causal_reference(q, k, v, level, 0.125), iters=5)
        print(f"block-causal L={L}: ours {t_ours:.1f} us, sdpa+mask {t_sdpa:.1f} us")


if __name__ == "__main__":
    main()
