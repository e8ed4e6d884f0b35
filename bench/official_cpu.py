"""The official HART code and hart_fast on the CPU, same weights, same process (issue 14).

    python bench/official_cpu.py --hart-src /path/to/mit-han-lab/hart [--repeats 5] [--batches 1,4] [--threads N]
    python bench/official_cpu.py --hart-src /path/to/mit-han-lab/hart --smoke    # a tiny model, seconds

--hart-src is a checkout of https://github.com/mit-han-lab/hart; its modules are imported from there (nothing of
it is copied here). What the import chain needs besides hart_fast's own dependencies: scipy (for scipy.stats),
transformers and huggingface_hub (any recent version; see load_official for what transformers 5 changes).

1. Writes the medium random-weight model of issue 14 (bench/speed_modes.py: MEDIUM_LLM / MEDIUM_TOK) in the
   official layout and loads it with both codes.
2. Faithfulness, per batch: the official image against hart_fast's `exact` image of the same context and seed,
   with hart_fast drawing from the official random streams (one generator for the whole batch's codes, torch's
   global one for the residual diffusion), with its own code streams (one per row) but the official diffusion
   noise, and with its own streams throughout (its default, which differs from the official draw by design).
3. Times whole images (latent + decode, no text encoder on either side) from random context states and an
   all-ones mask: one warm-up per row, then `repeats` rounds with every row once per round (interleaved, so a
   slow spell of the machine costs every row alike); prints the median ms per row and batch as markdown.

The official code is CUDA-only as written; two shims make it run on the CPU, its own code unchanged:
- `hart_backend.fused_kernels` (its CUDA extension) is a stand-in module of plain-PyTorch versions of the
  kernels' math: rms_norm (used by every LlamaRMSNormFused) and the fused RoPE functions (imported but not
  called at inference, where the official attention takes its unfused RoPE path);
- while official code runs, `Tensor.cuda` / `Module.cuda` return the CPU object (restored afterwards).
Without flash_attn and xformers (its imports of them are guarded) its attention is its fallback, torch's
scaled_dot_product_attention, and its MLP the plain fc1 -> GELU(tanh) -> fc2.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import tempfile
import time
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # all loading is local; never wait on the network

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from speed_modes import MEDIUM_LLM, MEDIUM_TOK  # noqa: E402  (bench/ is this script's directory)

from hart_fast.demo import write_model_folder  # noqa: E402
from hart_fast.pipeline import HartPipeline  # noqa: E402
from hart_fast.sampling import filter_top_k_top_p_, official_top_k  # noqa: E402
from hart_fast.speed import cpu_native_bf16  # noqa: E402

# A model that loads and runs in seconds (the vocabulary must exceed the official top-k of 600).
SMOKE_LLM = dict(MEDIUM_LLM, context_token=8, context_dim=32, depth=2, embed_dim=64, num_heads=4,
                 patch_nums=[1, 2, 3, 4], diff_width=32, diff_depth=2, num_sampling_steps="4")
SMOKE_TOK = dict(MEDIUM_TOK, vocab_size=1024, z_channels=8, ch=32, ch_mult=[1, 1, 1], v_patch_nums=[1, 2, 3, 4])
GUIDANCE = 4.5  # the official sample.py's --cfg default, and hart_fast's

# hart_fast rows: name and generate() options.
FAST_ROWS = [("hart_fast exact", {}), ("speed=balanced", {"speed": "balanced"}),
             ("speed=fastest", {"speed": "fastest"})]


# ---- the CPU stand-in for hart_backend.fused_kernels (the official CUDA extension) ----

def rms_norm(out, input, weight, epsilon, use_quant=False):
    """In place into `out`: input * rsqrt(mean(input^2, last dim) + epsilon) * weight. As the kernel: the
    statistic in float32, the normalised value cast to the input dtype before the weight multiply; with
    use_quant all in float32, rounded half to even and saturated into `out`'s int8."""
    x = input.float()
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + epsilon)
    if use_quant:
        out.copy_((normed * weight.float()).round().clamp_(-128, 127))
    else:
        out.copy_(normed.to(input.dtype) * weight)


def _rope(t_sbhd, freqs_sb1d, transpose_output_memory, backward):
    """Rotate the first d2 = freqs.shape[-1] channels of t (s, b, h, d) by the angles freqs (float32, broadcast
    over heads), copy the rest. Forward: x*cos + rotate_half(x)*sin; backward: its transpose. A new tensor of
    t's dtype, laid out (b, s, h, d) in memory when transpose_output_memory (viewed as (s, b, h, d))."""
    s, b, h, d = t_sbhd.shape
    d2 = freqs_sb1d.shape[-1]
    x1, x2 = t_sbhd[..., : d2 // 2].float(), t_sbhd[..., d2 // 2: d2].float()
    f1, f2 = freqs_sb1d[..., : d2 // 2], freqs_sb1d[..., d2 // 2:]
    if backward:
        lo, hi = x1 * f1.cos() + x2 * f2.sin(), x2 * f2.cos() - x1 * f1.sin()
    else:
        lo, hi = x1 * f1.cos() - x2 * f1.sin(), x2 * f2.cos() + x1 * f2.sin()
    out = torch.empty(b, s, h, d, dtype=t_sbhd.dtype).transpose(0, 1) if transpose_output_memory \
        else torch.empty(s, b, h, d, dtype=t_sbhd.dtype)
    out[..., : d2 // 2], out[..., d2 // 2: d2], out[..., d2:] = lo, hi, t_sbhd[..., d2:]
    return out


def install_fused_kernel_shim():
    """Register the stand-in `hart_backend.fused_kernels` before the official modules import it."""
    kernels = types.ModuleType("hart_backend.fused_kernels")
    kernels.rms_norm = rms_norm
    # freqs (S, 1, 1, d2): one angle row per sequence position (the first s used).
    kernels.fused_rope_forward_func = lambda t, freqs, tr: _rope(t, freqs[: t.shape[0]], tr, backward=False)
    kernels.fused_rope_backward_func = lambda g, freqs, tr: _rope(g, freqs[: g.shape[0]], tr, backward=True)
    # freqs (b, s, d2): one angle row per batch row and position.
    kernels.fused_rope_with_pos_forward_func = lambda t, freqs, tr: _rope(
        t, freqs.transpose(0, 1).unsqueeze(2), tr, backward=False)
    package = types.ModuleType("hart_backend")
    package.fused_kernels = kernels
    sys.modules["hart_backend"], sys.modules["hart_backend.fused_kernels"] = package, kernels


@contextlib.contextmanager
def patched(owner, name, value):
    """owner.name = value inside the block; the class's own attribute (or its absence) restored after."""
    had, old = name in vars(owner), vars(owner).get(name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if had:
            setattr(owner, name, old)
        else:
            delattr(owner, name)


@contextlib.contextmanager
def cuda_is_cpu():
    """The official code's `.cuda()` calls return the CPU tensor / module itself."""
    with patched(torch.Tensor, "cuda", lambda self, *a, **k: self), \
            patched(torch.nn.Module, "cuda", lambda self, *a, **k: self):
        yield


# ---- the official side ----

def load_official(root):
    """The official HARTForT2I (with its VAE) on the CPU, float32, from the folder's llm/ and tokenizer/.

    The official classes are built from their configs and given the weights with load_state_dict: under
    transformers 5, PreTrainedModel.from_pretrained builds models on the meta device (HARTForT2I.__init__
    then cannot load its VAE inside) and expects a post_init() the official classes do not call.
    """
    from safetensors.torch import load_file

    from hart.modules.models.autoencoder import HARTAutoEncoderWithDisc, HARTAutoEncoderWithDiscConfig
    from hart.modules.models.transformer import HARTForT2I
    from hart.modules.models.transformer.configuration import HARTForT2IConfig

    def vae_from_folder(cls, path, **_):
        vae = cls(HARTAutoEncoderWithDiscConfig.from_pretrained(path))
        res = torch.nn.Module.load_state_dict(vae, load_file(os.path.join(path, "model.safetensors")), strict=False)
        # Only what image generation never touches may be missing: the encoder side and the discriminator.
        missing = [k for k in res.missing_keys if not k.startswith(("vae.encoder.", "vae.quant_conv.", "disc."))]
        unexpected = [k for k in res.unexpected_keys if not k.startswith("disc.")]
        if missing or unexpected:
            raise RuntimeError(f"official VAE weights: missing {missing}, unexpected {unexpected}")
        return vae

    cfg = HARTForT2IConfig.from_pretrained(os.path.join(root, "llm"))
    cfg.vae_path = os.path.join(root, "tokenizer")
    # (its constructor prints a mask shape: to stderr, away from the table)
    with cuda_is_cpu(), patched(HARTAutoEncoderWithDisc, "from_pretrained", classmethod(vae_from_folder)), \
            contextlib.redirect_stdout(sys.stderr):
        model = HARTForT2I(cfg)
    model.load_state_dict(load_file(os.path.join(root, "llm", "model.safetensors")), strict=True)
    return model.eval()


def official_generate(model, ctx, mask, seed):
    """The official latent + decode, called as sample.py does (cfg 4.5, top_p 0, no smoothing; its top_k
    argument is ignored by the loop): images (B, 3, H, W) in [0, 1]."""
    torch.manual_seed(seed)  # its residual diffusion draws from torch's global generator
    np.random.seed(seed)  # its last-scale order shuffle (no effect with one maskgit iteration)
    positions = torch.cumsum(mask.long(), dim=1) - 1  # as its encode_prompts makes them
    with cuda_is_cpu(), torch.inference_mode():
        return model.autoregressive_infer_cfg(B=ctx.shape[0], label_B=ctx, g_seed=seed, cfg=GUIDANCE, top_p=0.0,
                                              more_smooth=False, context_position_ids=positions, context_mask=mask)


def exact_with_official_streams(pipe, ctx, mask, seed):
    """hart_fast's exact image drawing its random numbers as the official code does: every stage's codes
    from one generator for the whole batch, the diffusion noise from a second one (standing in for torch's
    global generator), both seeded `seed`."""
    codes_rng, noise_rng = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)

    def draw_codes(si, logits_BlV):
        B, l, V = logits_BlV.shape
        probs = filter_top_k_top_p_(logits_BlV.clone(), official_top_k(si), 0.0).softmax(-1).view(-1, V)
        return torch.multinomial(probs, 1, replacement=True, generator=codes_rng).view(B, l)

    return pipe.generate(ctx, mask, guidance_scale=GUIDANCE, seed=seed, token_sampler=draw_codes,
                         diffusion_noise_fn=lambda shape: torch.randn(*shape, generator=noise_rng))


def compare(name, ours, theirs) -> str:
    """One line: max |pixel difference| of the float images and PSNR of them saved as uint8 (truncated)."""
    u8 = [im.clamp(0, 1).mul(255).to(torch.uint8).double() for im in (ours, theirs)]
    mse = (u8[0] - u8[1]).pow(2).mean().item()
    psnr = "inf (identical)" if mse == 0 else f"{10 * math.log10(255 ** 2 / mse):.1f} dB"
    line = f"{name}: max abs diff {(ours - theirs).abs().max().item():.2e}, uint8 PSNR {psnr}"
    print("  " + line, file=sys.stderr)
    return line


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hart-src", required=True, help="a checkout of the official mit-han-lab/hart repository")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="a tiny model and one round: checks the script runs")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    llm, tok = (SMOKE_LLM, SMOKE_TOK) if args.smoke else (MEDIUM_LLM, MEDIUM_TOK)
    repeats = 1 if args.smoke else args.repeats

    install_fused_kernel_shim()
    sys.path.insert(0, os.path.abspath(args.hart_src))
    # (On a CPU with native bfloat16 the presets run in bfloat16: hart_fast.speed.PRESET_EXTRAS.)
    rows = list(FAST_ROWS)

    with tempfile.TemporaryDirectory() as root:
        write_model_folder(root, llm, tok, with_encoder=False, seed=0)
        official = load_official(root)
        pipe = HartPipeline.from_pretrained(root)
    cfg = pipe.config
    run = {"official": lambda c, m: official_generate(official, c, m, args.seed)}
    for name, kw in rows:
        run[name] = lambda c, m, kw=kw: pipe.generate(c, m, guidance_scale=GUIDANCE, seed=args.seed, **kw)

    times, faithfulness = {}, {}
    for B in batches:
        g = torch.Generator().manual_seed(B)  # the context states of bench/speed_modes.py's time_rows
        ctx = torch.randn(B, cfg.context_token, cfg.context_dim, generator=g)
        mask = torch.ones(B, cfg.context_token, dtype=torch.bool)
        print(f"batch {B}, faithfulness to the official image:", file=sys.stderr)
        reference = run["official"](ctx, mask)
        noise_rng = torch.Generator().manual_seed(args.seed)
        own_codes = pipe.generate(ctx, mask, guidance_scale=GUIDANCE, seed=args.seed,
                                  diffusion_noise_fn=lambda shape: torch.randn(*shape, generator=noise_rng))
        faithfulness[B] = [
            compare("exact, official random streams", exact_with_official_streams(pipe, ctx, mask, args.seed),
                    reference),
            # At batch 1 hart_fast's own code stream is the official one (one generator seeded `seed`).
            compare("exact, own code streams, official diffusion noise", own_codes, reference),
            compare("exact, own streams (the default)", run["hart_fast exact"](ctx, mask), reference)]

        samples = {name: [] for name in run}
        for fn in run.values():
            fn(ctx, mask)  # warm-up (buffers, schedules, quantised weights)
        for _ in range(repeats):
            for name, fn in run.items():
                t0 = time.perf_counter()
                fn(ctx, mask)
                samples[name].append((time.perf_counter() - t0) * 1e3)
        for name in run:
            times[(name, B)] = statistics.median(samples[name])
            print(f"  {name} batch {B}: {times[(name, B)]:.0f} ms", file=sys.stderr)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, native bf16: {cpu_native_bf16()}; "
          f"{'smoke' if args.smoke else 'medium'} model, median of {repeats} interleaved rounds")
    print()
    print("| row | " + " | ".join(f"batch {b} ms | x official" for b in batches) + " |")
    print("|---|" + "---|---|" * len(batches))
    for name in run:
        cells = [f"{times[(name, b)]:.0f} | {times[('official', b)] / times[(name, b)]:.2f}" for b in batches]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()
    print(f"Faithfulness: hart_fast exact against the official image of the same context and seed {args.seed}")
    for B in batches:
        print("\n".join(f"- batch {B}, {line}" for line in faithfulness[B]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
