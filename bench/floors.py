"""Arithmetic floors of the issues' GPU targets, from counted FLOPs.

    python bench/floors.py [--batch 1 8]

The FLOPs of every piece are counted by torch's FlopCounterMode while the
real 0.7B / 1024px model runs on the meta device (shapes only, nothing is
allocated or computed): each AR stage's transformer pass (linears + head vs
attention), the fast residual-diffusion sampler (8 steps, CFG) and the VAE
decode.  Dividing by the throughput ceilings the issues measured on the H200
gives the time an exact fp16 implementation cannot beat unless it runs
faster than those ceilings; "needs" is the throughput the target would demand.
This is the prediction written down before the GPU measures; it does not
replace the measurement (kernels have latencies, memory passes, occupancy
tails that these floors ignore, so real times sit above them).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(__file__))
from hart_shapes import REAL_LLM, REAL_TOK, table  # noqa: E402

# Throughput ceilings, TFLOP/s (fp16/bf16 tensor cores), as measured on one H200
# and quoted in the issues; PEAK is the H100/H200 SXM dense fp16 datasheet figure.
GEMM_TFLOPS = 710.0  # issue 4: one block's linears at the last stage, cuBLAS bf16
ATTENTION_TFLOPS = 415.0  # issue 4: SDPA (flash) over the last stage, 4,096 x 9,750 keys
DIFFUSION_GEMM_TFLOPS = 330.0  # issue 5: one diffusion-MLP GEMM, 8,192 x 1,024 x 1,024 bf16
PEAK_TFLOPS = 989.0
HBM_TBPS = 4.8  # H200 HBM3e datasheet: every stage streams all the weights once

# The issues' targets, ms (None: not set for that batch).
AR_BEFORE_LAST_TARGET = {1: 40.0, 8: 250.0}
AR_LAST_TARGET = {1: 35.0}
DIFFUSION_TARGET = {1: 8.0, 8: 45.0}
VAE_TARGET = {1: 30.0}

_ATTENTION_OPS = ("bmm", "scaled_dot_product")  # the math SDPA on meta is two bmm


def count_flops(fn: Callable[[], object]) -> Dict[str, float]:
    """FLOPs of one call of fn by aten op name (e.g. 'addmm', 'bmm', 'convolution')."""
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        fn()
    return {str(op).split(".")[-1]: float(n) for op, n in counter.get_flop_counts()["Global"].items()}


def _split(flops: Dict[str, float]):
    attn = sum(n for op, n in flops.items() if op.startswith(_ATTENTION_OPS))
    return sum(flops.values()) - attn, attn


def meta_model(llm: dict = REAL_LLM, tok: dict = REAL_TOK, dtype=torch.float16):
    """(transformer, tokenizer) of a configuration (config dicts) on the meta device."""
    from hart_fast.config import TokenizerConfig, TransformerConfig
    from hart_fast.model.tokenizer import HartTokenizer
    from hart_fast.model.transformer import HartTransformer

    tcfg, kcfg = TransformerConfig.from_dict(dict(llm)), TokenizerConfig.from_dict(dict(tok))
    with torch.device("meta"):
        tr = HartTransformer(tcfg, kcfg.Cvae, kcfg.vocab_size).to(dtype)
        tk = HartTokenizer(kcfg, with_encoder=False).to(dtype)
    return tr, tk


def meta_twin(tr, depth=None):
    """A meta-device HartTransformer of tr's configuration and dtype (tr on any device),
    optionally with another depth."""
    import dataclasses

    from hart_fast.model.transformer import HartTransformer

    cfg = tr.cfg if depth is None else dataclasses.replace(tr.cfg, depth=depth)
    with torch.device("meta"):
        return HartTransformer(cfg, tr.Cvae, tr.V).to(tr.head.weight.dtype)


def _ar_stage_counts(tr, B: int) -> List[tuple]:
    """(linear, attention) FLOPs of every stage's pass + head for a meta model tr."""
    from hart_fast.model.transformer import KVCache

    cfg, dev, dt = tr.cfg, "meta", tr.head.weight.dtype
    ctx = torch.empty(B, cfg.context_token, cfg.context_dim, device=dev, dtype=dt)
    mask2 = torch.ones(2 * B, cfg.context_token, dtype=torch.bool, device=dev)
    pos2 = torch.arange(cfg.context_token, device=dev)[None].expand(2 * B, -1)
    with torch.inference_mode():
        mods, head_mod = tr.modulations(tr.condition(ctx), mask2)
    cache = KVCache(cfg.depth, 2 * B, cfg.num_heads, cfg.total_tokens, cfg.head_dim, dev, dt)
    out = []
    for si, (s, e) in enumerate(tr.stage_slices()):
        x = torch.empty(2 * B, e - s, cfg.embed_dim, device=dev, dtype=dt)
        out.append(_split(count_flops(
            lambda: tr.logits(tr.forward_stage(x, si, mods, tr.stage_rope(si, pos2), cache, s), head_mod))))
    return out


def ar_stage_flops(tr, B: int) -> List[Dict[str, float]]:
    """Counted linear (blocks + head) and attention FLOPs of every stage's transformer
    pass at batch B (CFG-doubled rows), for tr's configuration (tr on any device).

    The blocks all have the same shapes, so the counter runs models of depth 1
    and 2 (their difference is one block) instead of all 24 blocks: the Python
    dispatch of the counter costs ~10 s for the full depth.
    """
    depth = tr.cfg.depth
    one = _ar_stage_counts(meta_twin(tr, 1), B)
    two = _ar_stage_counts(meta_twin(tr, 2), B) if depth > 1 else one
    rows = []
    for si, ((s, e), c1, c2) in enumerate(zip(tr.stage_slices(), one, two)):
        lin, attn = (a + (depth - 1) * (b - a) for a, b in zip(c1, c2))
        rows.append({"stage": si, "rows": 2 * B * (e - s), "kv_len": e, "linear_GFLOP": lin / 1e9,
                     "attention_GFLOP": attn / 1e9})
    return rows


def diffusion_flops(tr, B: int, steps: str = "8") -> float:
    """Counted FLOPs of the fast residual-diffusion sampler for batch B (CFG, all last-stage tokens)."""
    from hart_fast.model.diffusion import RespacedSchedule
    from hart_fast.model.diffusion_fast import sample_residual_fast

    net, cfg = tr.diffloss.net, tr.cfg
    N = B * cfg.patch_nums[-1] ** 2
    z = torch.empty(2 * N, cfg.embed_dim, device="meta", dtype=tr.head.weight.dtype)
    sched = RespacedSchedule.build(steps)
    noise = lambda shape: torch.empty(*shape, device="meta")  # noqa: E731
    return sum(count_flops(lambda: sample_residual_fast(net, z, 4.5, sched, 1.0, None, noise)).values())


def vae_flops(tk, B: int, latent: int = 64) -> float:
    """Counted FLOPs of the VAE decode of a (B, Cvae, latent, latent) f_hat."""
    f = torch.empty(B, tk.Cvae, latent, latent, device="meta", dtype=tk.post_quant_conv.weight.dtype)
    return sum(count_flops(lambda: tk.fhat_to_img(f)).values())


def _ms(gflop: float, tflops: float) -> float:
    return gflop / tflops  # GFLOP / (TFLOP/s) = ms


def floors(batches=(1, 8), llm: dict = REAL_LLM, tok: dict = REAL_TOK) -> List[Dict[str, object]]:
    """One row per (piece, batch): counted GFLOP, floor at the ceilings, target, and what the target needs.
    (The targets are the issues' figures for the real configuration.)"""
    tr, tk = meta_model(llm, tok)
    latent = tok["v_patch_nums"][-1]
    pixels = latent * 2 ** (len(tok["ch_mult"]) - 1)
    weight_bytes = sum(p.numel() * p.element_size() for n, p in tr.named_parameters()
                       if n.startswith(("blocks.", "head.")) and ".ada_lin." not in n)
    out = []
    for B in batches:
        stages = ar_stage_flops(tr, B)
        for name, part, target in ((f"AR, {len(stages) - 1} stages before the last", stages[:-1],
                                    AR_BEFORE_LAST_TARGET.get(B)),
                                   ("AR, last stage", stages[-1:], AR_LAST_TARGET.get(B))):
            lin = sum(r["linear_GFLOP"] for r in part)
            attn = sum(r["attention_GFLOP"] for r in part)
            # Small stages cannot beat streaming every weight once from HBM.
            lin_ms = sum(max(_ms(r["linear_GFLOP"], GEMM_TFLOPS), weight_bytes / HBM_TBPS / 1e9) for r in part)
            attn_ms = _ms(attn, ATTENTION_TFLOPS)
            row = {"piece": name, "batch": B, "GFLOP": lin + attn, "floor_ms": lin_ms + attn_ms,
                   "floor_basis": f"linears {lin_ms:.1f} ms at {GEMM_TFLOPS:.0f} + attention {attn_ms:.1f} ms "
                                  f"at {ATTENTION_TFLOPS:.0f} TFLOP/s"}
            if target is not None:
                row["target_ms"] = target
                spare = target - lin_ms
                row["needs"] = (f"attention at {attn / spare:.0f} TFLOP/s ({100 * attn / spare / PEAK_TFLOPS:.0f}% "
                                f"of peak) with the linears at the ceiling" if spare > 0 else
                                "impossible: the linears alone exceed it")
            out.append(row)
        d = diffusion_flops(tr, B) / 1e9
        row = {"piece": "residual diffusion, 8 steps", "batch": B, "GFLOP": d,
               "floor_ms": _ms(d, DIFFUSION_GEMM_TFLOPS),
               "floor_basis": f"GEMMs at {DIFFUSION_GEMM_TFLOPS:.0f} TFLOP/s ({_ms(d, GEMM_TFLOPS):.1f} ms at "
                              f"{GEMM_TFLOPS:.0f})"}
        if B in DIFFUSION_TARGET:
            t = DIFFUSION_TARGET[B]
            row["target_ms"] = t
            row["needs"] = f"GEMMs at {d / t:.0f} TFLOP/s ({100 * d / t / PEAK_TFLOPS:.0f}% of peak)"
        out.append(row)
        v = vae_flops(tk, B, latent) / 1e9
        row = {"piece": f"VAE decode, {pixels} x {pixels}", "batch": B, "GFLOP": v, "floor_ms": _ms(v, GEMM_TFLOPS),
               "floor_basis": f"convolutions at {GEMM_TFLOPS:.0f} TFLOP/s (no memory passes counted)"}
        if B in VAE_TARGET:
            t = VAE_TARGET[B]
            row["target_ms"] = t
            row["needs"] = f"convolutions at {v / t:.0f} TFLOP/s ({100 * v / t / PEAK_TFLOPS:.0f}% of peak)"
        out.append(row)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    args = p.parse_args(argv)
    rows = floors(args.batch)
    print(f"# floors: FLOPs counted at the real shapes; ceilings GEMM {GEMM_TFLOPS:.0f}, attention "
          f"{ATTENTION_TFLOPS:.0f}, diffusion GEMM {DIFFUSION_GEMM_TFLOPS:.0f} TFLOP/s, HBM {HBM_TBPS} TB/s "
          f"(H200, from the issues); peak {PEAK_TFLOPS:.0f}")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
