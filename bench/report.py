"""One-shot benchmark report for a GPU session: prints a table, writes JSON.

    python bench/report.py --out $OUT/report.json [--quick]
    python bench/report.py --device cpu --small --quick   # smoke test of every section, no GPU

Every figure is the median of repeats (default 5) with device synchronisation,
random weights at the real HART 0.7B / 1024px shapes, fp16 unless stated. Each
section runs on its own; a failing section is reported and the rest still run.
Copy the printed table into BENCHMARKS.md with the card name it prints.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from hart_shapes import (  # noqa: E402
    REAL_LLM, REAL_TOK, SMALL_LLM, SMALL_TOK, ar_stage_times, kernel_profile, median_ms, random_pipeline,
    random_prompts, stage_times, table,
)

# The configuration every section runs at: the real 0.7B / 1024px shapes, or
# with --small the CPU-sized stand-in (a smoke test of the report itself, so a
# broken section is found before it costs device time).
LLM, TOK = REAL_LLM, REAL_TOK


def _free():
    if torch.cuda.is_available():
        _free()


def _last_tokens() -> int:
    return LLM["patch_nums"][-1] ** 2


def _latent(B: int, dev, dtype) -> torch.Tensor:
    P = TOK["v_patch_nums"][-1]
    return torch.randn(B, TOK["z_channels"], P, P, device=dev, dtype=dtype)


@contextlib.contextmanager
def triton_for_large_stages():
    """The candidate policy to time: our kernel for the tiny stages as today,
    the Triton kernel instead of SDPA for every other stage."""
    import importlib

    attn_mod = importlib.import_module("hart_fast.ops.attention")  # the module, not the re-exported function
    saved = attn_mod.CUDA_CROSSOVER
    inf = float("inf")
    attn_mod.CUDA_CROSSOVER = saved + ((inf, inf, inf, "triton"),)
    try:
        yield
    finally:
        attn_mod.CUDA_CROSSOVER = saved


def section_ar(dev, dtype, batches, repeats):
    rows = []
    for B in batches:
        for path in ("reference", "fast", "fast+triton"):
            pipe = random_pipeline(LLM, TOK, dev, dtype, fast=path != "reference")
            with triton_for_large_stages() if path == "fast+triton" else contextlib.nullcontext():
                t = ar_stage_times(pipe, B, repeats)
            rows.append({"section": "AR transformer", "path": path, "batch": B, **t})
            pipe = None  # free its engine (static buffers, CUDA graphs); the weights are shared
            _free()
    return rows


def section_stages(dev, dtype, batches, repeats):
    """Every stage's transformer pass on the fast path: graph replay vs eager
    launch, counted GFLOP and achieved TFLOP/s (where the AR time goes)."""
    rows = []
    for B in batches:
        pipe = random_pipeline(LLM, TOK, dev, dtype, fast=True)
        rows += [{"section": "AR stage", "batch": B, **r} for r in stage_times(pipe, B, repeats)]
        pipe = None  # free its engine (static buffers, CUDA graphs)
        _free()
    return rows


def section_profile(dev, dtype):
    """Top kernels by device time of one eager run of: a small AR stage, the
    stage before the last, the last stage (fast path, batch 1), the fast
    residual diffusion and the fast VAE decode (NCHW and channels_last)."""
    from hart_fast.model.diffusion import RespacedSchedule
    from hart_fast.model.diffusion_fast import sample_residual_fast
    from hart_fast.model.vae_fast import fhat_to_img_fast

    pipe = random_pipeline(LLM, TOK, dev, dtype, fast=True)
    ctx, mask = random_prompts(pipe, 1)
    pipe.generate(ctx, mask, residual_diffusion=False, output_type="latent", seed=0)  # fills the static state
    eng, S = pipe.engine, pipe.config.num_stages
    st = eng.state(2)
    net, tok, sched = pipe.transformer.diffloss.net, pipe.tokenizer, RespacedSchedule.build("8")
    z = torch.randn(2 * _last_tokens(), LLM["embed_dim"], device=dev, dtype=dtype)
    f = _latent(1, dev, dtype)
    noise = lambda shape: torch.randn(*shape, device=dev)  # noqa: E731
    runs = (  # (the fast decode turns cuDNN's algorithm search on by itself)
        ("AR stage 5 (49 tokens)", lambda: eng._stage_forward(st, 5)),
        (f"AR stage {S - 2} (before the last)", lambda: eng._stage_forward(st, S - 2)),
        (f"AR stage {S - 1} (last)", lambda: eng._stage_forward(st, S - 1)),
        ("residual diffusion", lambda: sample_residual_fast(net, z, 3.6, sched, 1.0, None, noise)),
        ("VAE decode NCHW", lambda: fhat_to_img_fast(tok, f)),
        ("VAE decode channels_last", lambda: fhat_to_img_fast(tok, f, channels_last=True)),
    )
    rows = []
    with torch.inference_mode():
        for what, fn in runs:
            rows += [{"section": "profile, batch 1", "what": what, **r} for r in kernel_profile(fn, dev, top=8)]
    return rows


def section_end_to_end(dev, dtype, batches, repeats):
    rows = []
    for B in batches:
        for path in ("reference", "fast"):
            pipe = random_pipeline(LLM, TOK, dev, dtype, fast=path == "fast")
            ctx, mask = random_prompts(pipe, B)
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            ms = median_ms(lambda: pipe.generate(ctx, mask, seed=0), dev, repeats)
            row = {"section": "end-to-end", "path": path, "batch": B, "ms": ms, "ms_per_image": ms / B}
            if dev == "cuda":  # weights + static state + graphs + the decode's activations
                row["peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
            rows.append(row)
            pipe = None  # free its engine (static buffers, CUDA graphs); the weights are shared
            _free()
    return rows


def _text_encoder(pipe, dev, dtype, **opts):
    """A random text encoder of the Qwen2 shape that goes with TOK (1.5B at the
    0.7B model's shape, the small one otherwise), emitting pipe's context length."""
    from hart_shapes import QWEN2_1_5B, SMALL_QWEN, random_text_encoder

    shape = SMALL_QWEN if TOK is SMALL_TOK else QWEN2_1_5B
    return random_text_encoder(shape, dev, dtype, pipe.config.context_token, **opts)


def _ms_from_text(pipe, te, prompts, dev, repeats, **kw):
    """Median ms of hart_fast.generate from prompt strings, the text encoder included."""
    import hart_fast

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the long prompts are truncated to the context, on purpose
        return median_ms(lambda: hart_fast.generate(prompts, model=pipe, text_encoder=te, output_type="pt", **kw),
                         dev, repeats)


def section_end_to_end_text(dev, dtype, batches, repeats):
    """Whole images as users make them (issue 13): hart_fast.generate from prompt
    strings, the Qwen2-1.5B-shaped text encoder (random weights, fp16 on the GPU) on
    a 300-token prompt behind the official system prompt, the fast path, the decode.
    Encoder variants: the concatenated pass, the system prompt's key/value cache
    computed once, and that with the encoder offloaded to the CPU between calls."""
    from hart_shapes import long_prompts

    pipe = random_pipeline(LLM, TOK, dev, dtype, fast=True)
    variants = [("concatenated", {"cache_system_prompt": False}), ("cached_prefix", {}),
                ("cached_prefix+offload", {"offload": True})]
    rows = []
    for name, opts in variants:
        te = _text_encoder(pipe, dev, dtype, **opts)
        for B in batches:
            prompts = long_prompts(B)
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # every prompt is truncated to 300 tokens, on purpose
                text_ms = median_ms(lambda: te(prompts), dev, repeats)
            ms = _ms_from_text(pipe, te, prompts, dev, repeats, batch_size=B)
            row = {"section": "e2e_text", "encoder": name, "batch": B, "text_ms": text_ms, "ms": ms,
                   "ms_per_image": ms / B}
            if te._prefix is not None:
                row["system_tokens"] = te._prefix[1]
            if dev == "cuda":
                row["peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
            rows.append(row)
        te = None
        _free()
    return rows


def section_attention(dev, dtype, repeats):
    from hart_fast import ops

    rows = []
    H, d = LLM["num_heads"], LLM["embed_dim"] // LLM["num_heads"]
    kv = LLM["context_token"]
    for pn in LLM["patch_nums"][1:]:
        lq = pn * pn
        kv += lq
        for B in (2, 16):
            q = torch.randn(B, H, lq, d, device=dev, dtype=dtype)
            k = torch.randn(B, H, kv, d, device=dev, dtype=dtype)
            v = torch.randn_like(k)
            scale = 0.25 / d ** 0.5
            row = {"section": "attention", "queries": lq, "keys": kv, "batch(2xCFG)": B}
            for name in ("ours", "sdpa", "flash", "triton"):
                try:
                    ms = median_ms(lambda: ops.attention(q, k, v, kv, scale, backend=name), dev, repeats)
                except Exception as e:  # backend missing (flash-attn not installed) or refused
                    ms = float("nan")
                    row[f"{name}_error"] = type(e).__name__
                row[f"{name}_ms"] = ms
            flops = 4 * B * H * lq * kv * d  # of the unmasked problem
            timed = {n: row[f"{n}_ms"] for n in ("ours", "sdpa", "flash", "triton") if row[f"{n}_ms"] == row[f"{n}_ms"]}
            best = min(timed, key=timed.get) if timed else None
            row["best"] = best or "-"  # the backend CUDA_CROSSOVER should pick for this shape
            row["best_TFLOPs"] = flops / (timed[best] * 1e-3) / 1e12 if best else float("nan")
            rows.append(row)
    # The training-time block-causal pass over the whole 1024px sequence.
    from hart_fast.ops.attention import block_causal_mask
    from hart_fast.ops.triton_attention import ms_attention_block_causal_triton

    sizes = [LLM["context_token"]] + [pn * pn for pn in LLM["patch_nums"][1:]]
    level = torch.cat([torch.full((n,), i, dtype=torch.int64) for i, n in enumerate(sizes)]).to(dev)
    L = level.numel()
    q, k, v = (torch.randn(2, H, L, d, device=dev, dtype=dtype) for _ in range(3))
    mask = block_causal_mask(level, dtype)
    row = {"section": "attention", "queries": L, "keys": L, "batch(2xCFG)": 2}
    for name, fn in (("ours", lambda: ops.ms_attention_block_causal(q, k, v, level, 0.125)),
                     ("sdpa", lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                                      scale=0.125)),
                     ("triton", lambda: ms_attention_block_causal_triton(q, k, v, level, 0.125))):
        try:
            row[f"{name}_ms"] = median_ms(fn, dev, repeats)
        except Exception as e:  # noqa: BLE001
            row[f"{name}_ms"], row[f"{name}_error"] = float("nan"), type(e).__name__
    row["flash_ms"] = float("nan")
    rows.append(row)
    return rows


def section_diffusion(dev, dtype, batches, repeats):
    from hart_fast.model.diffusion import RespacedSchedule, sample_residual
    from hart_fast.model.diffusion_fast import sample_residual_fast

    rows = []
    pipe = random_pipeline(LLM, TOK, dev, dtype, fast=False)
    net = pipe.transformer.diffloss.net
    sched = RespacedSchedule.build("8")
    for B in batches:
        N = B * _last_tokens()
        z = torch.randn(2 * N, LLM["embed_dim"], device=dev, dtype=dtype)
        noise = lambda shape: torch.randn(*shape, device=dev)  # noqa: E731
        with torch.inference_mode():
            ref = median_ms(lambda: sample_residual(net, z, 3.6, sched, noise_fn=noise), dev, repeats)
            row = {"section": "residual diffusion", "batch": B, "reference_ms": ref}
            for graph in (False, True):
                row[f"fast{'_graph' if graph else ''}_ms"] = median_ms(
                    lambda: sample_residual_fast(net, z, 3.6, sched, 1.0, None, noise, cuda_graph=graph),
                    dev, repeats)
        rows.append(row)
    return rows


def section_vae(dev, dtype, batches, repeats):
    """The reference decoder as the reference path runs it and with cuDNN's
    algorithm search (the issue's best library setting), vs the fast decoder
    (which turns the search on itself) in NCHW and channels_last."""
    from hart_fast.model.vae_fast import cudnn_autotune, fhat_to_img_fast

    rows = []
    pipe = random_pipeline(LLM, TOK, dev, dtype, fast=False)
    tok = pipe.tokenizer
    for B in batches:
        f = _latent(B, dev, dtype)
        with torch.inference_mode():
            row = {"section": "VAE decode", "batch": B,
                   "reference_ms": median_ms(lambda: tok.fhat_to_img(f), dev, repeats)}
            with cudnn_autotune():
                row["reference_cudnn_search_ms"] = median_ms(lambda: tok.fhat_to_img(f), dev, repeats)
            for cl in (False, True):
                row[f"fast{'_cl' if cl else ''}_ms"] = median_ms(
                    lambda: fhat_to_img_fast(tok, f, channels_last=cl), dev, repeats)
        rows.append(row)
    return rows


def section_norm(dev, dtype, repeats):
    """A block's gated residual add + the next norm at the last stage's shape
    (2 x 4,096 tokens per image for CFG, C = 1,536): fused vs torch add + norm kernel."""
    from hart_fast import ops

    rows = []
    for B in (1, 8):
        C = LLM["embed_dim"]
        x = torch.randn(2 * B, _last_tokens(), C, device=dev, dtype=dtype)
        branch = torch.randn_like(x)
        w = torch.randn(C, device=dev)
        gate, scale, shift = (0.1 * torch.randn(2 * B, 1, C, device=dev, dtype=dtype) for _ in range(3))

        def unfused():
            s = x + branch * gate
            return ops.rms_norm_modulate(s, w, scale, shift, 1e-6)

        rows.append({
            "section": "add + RMSNorm + modulate", "batch": B,
            "reference_ms": median_ms(lambda: ops.add_rms_norm_modulate_reference(x, branch, gate, w, scale, shift),
                                      dev, repeats),
            "unfused_ms": median_ms(unfused, dev, repeats),
            "fused_ms": median_ms(lambda: ops.add_rms_norm_modulate(x, branch, gate, w, scale, shift), dev, repeats),
        })
    return rows


def section_vq_glue(dev, dtype, repeats):
    from hart_fast.ops.vq_glue import next_scale_input_fast

    pipe = random_pipeline(LLM, TOK, dev, dtype, fast=False)
    tok, pns = pipe.tokenizer, LLM["patch_nums"]
    # Each stage's codes as embeddings, drawn outside the timed loop.
    hs = [torch.randn(1, TOK["z_channels"], pn, pn, device=dev, dtype=dtype) for pn in pns[:-1]]

    def run(fn):
        f_hat = torch.zeros_like(_latent(1, dev, torch.float32))
        for si, h in enumerate(hs):
            f_hat, _ = fn(tok, si, pns, f_hat, h)

    with torch.inference_mode():
        row = {"section": f"VQ glue ({len(pns) - 1} stages)", "batch": 1,
               "reference_ms": median_ms(lambda: run(lambda t, *a: t.next_scale_input(*a)), dev, repeats),
               "fast_ms": median_ms(lambda: run(next_scale_input_fast), dev, repeats)}
    return [row]


# Sections in priority order: the issues' targets first (AR, with its per-stage
# split and a kernel profile of each piece, diffusion, VAE, VQ glue), then end
# to end, then the kernel-level comparisons.
SECTION_ORDER = "ar,stages,profile,diffusion,vae,vq,e2e,e2e_text,speed,norm,attention"


def section_speed(dev, dtype, repeats):
    """The speed presets (hart_fast.speed) end to end at batch 1 against exact, in one
    run; on a GPU with fp8 tensor cores also fastest with fp8_weights (issue 14's
    GPU target: fastest <= 100 ms at the 0.7B shape)."""
    from hart_fast.quantize import fp8_supported

    pipe = random_pipeline(LLM, TOK, dev, dtype, fast=True)
    ctx, mask = random_prompts(pipe, 1)
    modes = [("exact", {}), ("balanced", {"speed": "balanced"}), ("fastest", {"speed": "fastest"})]
    if fp8_supported(dev):
        modes += [("fp8_weights", {"fp8_weights": True}), ("fastest+fp8_weights", {"speed": "fastest",
                                                                                  "fp8_weights": True})]
    rows, base = [], None
    for name, kw in modes:
        ms = median_ms(lambda: pipe.generate(ctx, mask, seed=0, **kw), dev, repeats)
        base = base or ms
        rows.append({"section": "speed", "mode": name, "batch": 1, "ms": ms, "x_exact": base / ms})
    # The target's own terms: from a prompt string, the text encoder included.
    from hart_shapes import long_prompts

    te = _text_encoder(pipe, dev, dtype)
    prompts, base = long_prompts(1), None  # generate()'s defaults (more_smooth on): x_exact against its exact
    for name, kw in [("exact", {}), ("fastest", {"speed": "fastest"})] + [m for m in modes if "fp8" in m[0]][-1:]:
        ms = _ms_from_text(pipe, te, prompts, dev, repeats, **kw)
        base = base or ms
        rows.append({"section": "speed", "mode": f"{name}, from text", "batch": 1, "ms": ms, "x_exact": base / ms})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="batch 1 only, 3 repeats")
    p.add_argument("--sections", default=SECTION_ORDER)
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no new section after this many seconds (device time is scarce)")
    p.add_argument("--small", action="store_true",
                   help="the CPU-sized stand-in configuration instead of the real shapes (smoke test)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cpu only makes sense with --small: it checks the report runs, it measures nothing useful")
    args = p.parse_args(argv)
    global LLM, TOK
    LLM, TOK = (SMALL_LLM, SMALL_TOK) if args.small else (REAL_LLM, REAL_TOK)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("report.py needs a CUDA device (or --device cpu --small for a smoke test)", file=sys.stderr)
        return 2
    t_start = time.monotonic()
    dev = args.device
    dtype = torch.float16 if dev == "cuda" else torch.float32
    batches = [1] if args.quick else [1, 8]
    repeats = 3 if args.quick else args.repeats
    card = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    dt_name = str(dtype).replace("torch.", "")
    print(f"# card: {card}, torch {torch.__version__}, dtype {dt_name}, median of {repeats}"
          f"{', SMALL stand-in shapes' if args.small else ''}")
    sections = {
        "attention": lambda: section_attention(dev, dtype, repeats),
        "norm": lambda: section_norm(dev, dtype, repeats),
        "ar": lambda: section_ar(dev, dtype, batches, repeats),
        "stages": lambda: section_stages(dev, dtype, batches, repeats),
        "profile": lambda: section_profile(dev, dtype),
        "diffusion": lambda: section_diffusion(dev, dtype, batches, repeats),
        "vae": lambda: section_vae(dev, dtype, batches, repeats),
        "vq": lambda: section_vq_glue(dev, dtype, repeats),
        "e2e": lambda: section_end_to_end(dev, dtype, batches, repeats),
        "e2e_text": lambda: section_end_to_end_text(dev, dtype, batches, repeats),
        "speed": lambda: section_speed(dev, dtype, repeats),
    }
    report = {"card": card, "torch": torch.__version__, "dtype": dt_name, "repeats": repeats, "small": args.small,
              "sections": {}}
    failed = []
    for name in args.sections.split(","):
        elapsed = time.monotonic() - t_start
        if args.budget_s is not None and elapsed > args.budget_s:
            report["sections"][name] = {"skipped": f"time budget of {args.budget_s:.0f} s spent"}
            print(f"\n## {name}: skipped (budget of {args.budget_s:.0f} s spent after {elapsed:.0f} s)", flush=True)
        else:
            try:
                rows = sections[name]()
                report["sections"][name] = rows
                print(f"\n## {name} ({time.monotonic() - t_start - elapsed:.0f} s)\n" + table(rows), flush=True)
            except Exception:
                report["sections"][name] = {"error": traceback.format_exc()}
                failed.append(name)
                print(f"\n## {name}: FAILED\n{traceback.format_exc()}", flush=True)
            _free()
        if args.out:  # after every section, so a run cut short still leaves its figures
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1, default=str)
    if failed:
        print(f"\nfailed sections: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
