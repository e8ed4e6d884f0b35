"""The `hart-fast` command: `generate` images from prompts, `info` about a model folder."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from typing import List, Optional

import torch

EXIT_USAGE = 2


class UsageError(Exception):
    """Bad input from the command line: reported in one line, exit code 2."""


def _read_prompts(args) -> List[str]:
    prompts: List[str] = []
    sources = list(args.prompts)
    if args.file:
        sources.append("@" + args.file)
    if not sources and not sys.stdin.isatty():
        sources = ["-"]
    for src in sources:
        if src == "-" or src.startswith("@"):
            path = src[1:] if src.startswith("@") else None
            try:
                text = sys.stdin.read() if path is None else open(path, encoding="utf-8").read()
            except OSError as e:
                raise UsageError(f"cannot read prompts from {path}: {e.strerror}") from e
            prompts += [line.strip() for line in text.splitlines() if line.strip()]
        else:
            prompts.append(src)
    if not prompts:
        raise UsageError("no prompts given: pass prompts as arguments, with --file FILE, or one per line on stdin")
    return prompts


def _plan_outputs(out: str, count: int, grid: bool) -> List[str]:
    """The file names to write, checked writable before anything is generated."""
    as_file = out.lower().endswith(".png")
    if as_file:
        folder = os.path.dirname(os.path.abspath(out))
        if os.path.isdir(out):
            raise UsageError(f"--out {out!r} is a folder; a .png name must be a file")
        if not os.path.isdir(folder):
            raise UsageError(f"cannot write {out!r}: folder {folder!r} does not exist")
        stem = out[:-4]
        names = [out] if (grid or count == 1) else [f"{stem}-{i:03d}.png" for i in range(count)]
    else:
        folder = out
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise UsageError(f"--out {out!r} exists and is not a folder")
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create output folder {out!r}: {e.strerror}") from e
        names = [os.path.join(folder, "grid.png")] if grid else [os.path.join(folder, f"{i:06d}.png") for i in range(count)]
    if not os.access(folder, os.W_OK):
        raise UsageError(f"cannot write to {folder!r}: permission denied")
    # A real probe: access() can say yes where the write still fails (read-only mounts).
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".hart-fast-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"cannot write to {folder!r}: {e.strerror}") from e
    return names


def save_png(image, path: str, text: dict) -> None:
    """Write atomically: a temporary name in the same folder, renamed when complete."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in text.items():
        info.add_itxt(k, v)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".hart-fast-", suffix=".png.part")
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a PNG gets the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def png_text(prompt: str, meta: dict, settings: dict, model_label: str, size) -> dict:
    """The PNG text chunks of an image: its prompt, an A1111-style `parameters`
    line, and `hart_fast`, every setting as JSON (enough to regenerate it)."""
    return {
        "prompt": prompt,
        "parameters": (
            f"{prompt}\nSteps: {settings.get('diffusion_steps') or 'config'}, CFG scale: "
            f"{settings['guidance_scale']}, Seed: {settings['seed']}, Model: {model_label}, Size: {size[0]}x{size[1]}"
        ),
        "hart_fast": json.dumps(meta, sort_keys=True),
    }


def make_grid(images: List, ncols: Optional[int] = None):
    from PIL import Image

    n = len(images)
    ncols = ncols or min(n, max(1, int(round(n ** 0.5 + 0.4999))))
    nrows = -(-n // ncols)
    w, h = images[0].size
    grid = Image.new("RGB", (ncols * w, nrows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % ncols) * w, (i // ncols) * h))
    return grid


def cmd_generate(args) -> int:
    import hart_fast
    from hart_fast.api import iter_generate, load_pipeline, model_name, resolve_model_path
    from hart_fast.options import validate_options
    from hart_fast.pipeline import to_pil
    from hart_fast.prompt_filter import check_prompt, load_prompt_filter

    prompts = _read_prompts(args)
    if args.n < 1:
        raise UsageError(f"-n must be >= 1, got {args.n}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    settings = _settings_from_args(args)
    count = len(prompts) * args.n
    try:  # the options that need no model first: a bad one costs no load and writes nothing
        validate_options(settings.guidance_scale, settings.top_k, settings.top_p, settings.diffusion_steps,
                         settings.diffusion_temperature, settings.seed, **settings.lever_options())
        flt = load_prompt_filter(args.prompt_filter)
    except ValueError as e:
        raise UsageError(str(e)) from e
    for i, p in enumerate(prompts):
        reason = check_prompt(flt, p)
        if reason is not None:
            raise UsageError(f"prompt {i + 1} ({p[:60]!r}) refused: {reason}")
    model_path = resolve_model_path(args.model)
    name = model_name(model_path)
    print(f"hart-fast: model {name}", file=sys.stderr)
    try:
        pipe = load_pipeline(model_path, args.device, args.dtype)
        pipe.validate_options(settings.guidance_scale, settings.top_k, settings.top_p, settings.diffusion_steps,
                              settings.diffusion_temperature, settings.seed, **settings.lever_options())
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise UsageError(str(e)) from e
    names = _plan_outputs(args.out, count, args.grid)  # checked writable before any generation

    from tqdm import tqdm

    n_batches = -(-count // args.batch_size)
    bar = tqdm(total=n_batches, unit="batch", desc="generating", file=sys.stderr, disable=args.quiet)
    grid_images, written = [], []
    base = {
        "model": name, "hart_fast_version": hart_fast.__version__, "device": args.device, "dtype": args.dtype,
        "batch_size": args.batch_size, "images_per_prompt": args.n, **settings.as_dict(),
        "levers": settings.resolved_levers(pipe),
    }
    try:
        for batch in iter_generate(prompts, model=pipe, text_encoder=args.text_encoder, batch_size=args.batch_size,
                                   images_per_prompt=args.n, settings=settings):
            pil = to_pil(batch.images)
            batch_prompts = [prompts[i] for i in batch.prompt_indices]
            for j, (img, pi) in enumerate(zip(pil, batch.prompt_indices)):
                k = batch.index * args.batch_size + j
                meta = {**base, "prompt": prompts[pi], "seed": batch.seeds[j], "index_in_batch": j,
                        "batch_prompts": batch_prompts}
                text = png_text(prompts[pi], meta, meta, name, img.size)
                if args.grid:
                    grid_images.append(img)
                else:
                    save_png(img, names[k], text)
                    written.append(names[k])
            bar.update(1)
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise UsageError(str(e)) from e
    finally:
        bar.close()
    if args.grid:
        grid_meta = {**base, "prompts": prompts}
        save_png(make_grid(grid_images), names[0], {"prompt": "\n".join(prompts), "hart_fast": json.dumps(grid_meta, sort_keys=True)})
        written.append(names[0])
    for path in written:
        print(path)
    return 0


def _settings_from_args(args):
    from hart_fast.api import GenerationSettings

    return GenerationSettings(
        guidance_scale=args.cfg, seed=args.seed, top_k=args.top_k, top_p=args.top_p,
        more_smooth=not args.no_more_smooth, residual_diffusion=not args.no_residual,
        diffusion_steps=args.diffusion_steps, diffusion_temperature=args.diffusion_temperature,
        use_system_prompt=not args.no_system_prompt, speed=args.speed, guidance_until=args.guidance_until,
        prune_ratios=args.prune_ratios, topk_sampling=args.topk_sampling, int8_weights=args.int8_weights,
        fp8_weights=args.fp8_weights, cpu_bf16=args.cpu_bf16,
    )


def cmd_batch(args) -> int:
    from tqdm import tqdm

    from hart_fast.api import model_name, resolve_model_path
    from hart_fast.batch import PromptFileError, run_batch

    print(f"hart-fast: model {model_name(resolve_model_path(args.model))}", file=sys.stderr)
    bar = None

    def progress(done, total):
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="image", desc="batch", file=sys.stderr, disable=args.quiet)
        bar.n = done
        bar.refresh()

    try:
        res = run_batch(args.prompts_file, args.out, model=args.model, text_encoder=args.text_encoder,
                        device=args.device, dtype=args.dtype, batch_size=args.batch_size, seed=args.seed,
                        images_per_prompt=args.n, settings=_settings_from_args(args), resume=not args.no_resume,
                        ray=args.ray, workers=args.workers, prompt_filter=args.prompt_filter, progress=progress)
    except (PromptFileError, ValueError, FileNotFoundError, RuntimeError) as e:
        raise UsageError(str(e)) from e
    finally:
        if bar is not None:
            bar.close()
    print(f"hart-fast: {len(res.written)} images written, {len(res.skipped)} already done ({res.runner}); "
          f"manifest {res.manifest}", file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    try:
        from hart_fast.serve import load_prompt_filter, serve
    except ImportError as e:
        raise UsageError(f"hart-fast serve needs the serve extra (pip install '.[serve]'): {e}") from e
    if args.max_batch < 1 or args.max_queue < 1 or args.max_wait_ms < 0:
        raise UsageError("--max-batch and --max-queue must be >= 1 and --max-wait-ms >= 0")
    if args.replicas is not None and args.replicas < 1:
        raise UsageError("--replicas must be >= 1")
    try:
        load_prompt_filter(args.prompt_filter)  # a bad hook fails before the model loads
        if args.ray is not None:
            from hart_fast.batch_ray import ray_available
            from hart_fast.serve import serve_on_ray

            if not ray_available():
                raise UsageError("hart-fast serve --ray needs Ray Serve (pip install '.[ray]')")
            serve_on_ray(args.ray, args.host, args.port, model=args.model, text_encoder=args.text_encoder,
                         device=args.device, dtype=args.dtype, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                         max_queue=args.max_queue, prompt_filter=args.prompt_filter, replicas=args.replicas)
            return 0
        serve(args.model, args.text_encoder, args.device, args.dtype, args.host, args.port, args.max_batch,
              args.max_wait_ms, args.max_queue, args.prompt_filter)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise UsageError(str(e)) from e
    return 0


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def cmd_info(args) -> int:
    from hart_fast import device
    from hart_fast.api import model_name, resolve_model_path
    from hart_fast.loading import load_models

    path = resolve_model_path(args.model_dir)
    try:
        tr, tok, info = load_models(path, use_ema=None)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from e
    c = tr.cfg
    k = tok.cfg
    n_mlp = _count(tr.diffloss)
    lines = [
        f"model:        {model_name(path)}",
        f"weights:      {info.weights_file}{' (EMA)' if info.used_ema else ''}",
        f"tokenizer:    {info.tokenizer_dir}",
        f"transformer:  depth {c.depth}, width {c.embed_dim}, {c.num_heads} heads x {c.head_dim}, "
        f"mlp {c.mlp_type} ({c.ffn_hidden}), context {c.context_token} x {c.context_dim}",
        f"scales:       {list(c.patch_nums)} ({c.total_tokens} tokens with context)",
        f"AdaLN:        {'off' if c.disable_aln and not c.shared_aln else ('shared' if c.shared_aln else c.sep_aln_pooling_mode)}",
        f"diffusion:    MLP width {c.diff_width}, depth {c.diff_depth}, {c.num_sampling_steps} IDDPM steps",
        f"vae:          vocab {k.vocab_size} x {k.Cvae}, ch {k.ch} x {list(k.ch_mult)}, "
        f"image {c.patch_nums[-1] * k.downsample}px, encoder {'yes' if tok.has_encoder else 'no (decode-only)'}",
        f"parameters:   transformer {(_count(tr) - n_mlp) / 1e6:.2f}M, diffusion MLP {n_mlp / 1e6:.2f}M, "
        f"tokenizer {_count(tok) / 1e6:.2f}M",
    ]
    lines += device.describe()
    from hart_fast.kernel_plan import KernelPlan

    from hart_fast.options import parse_dtype

    try:
        plan = KernelPlan.for_model(c, args.device, parse_dtype(args.dtype))
    except (ValueError, RuntimeError) as e:
        raise UsageError(str(e)) from e
    lines.append(f"fast path on {args.device} {args.dtype}, per op (kernel or fallback, and why):")
    lines += plan.describe()
    print("\n".join(lines))
    return 0


def _add_model_args(g) -> None:
    """Which model, on which device: every command that loads one."""
    g.add_argument("--model", help="HART model folder (default: $HART_FAST_MODEL, else the embedded demo model)")
    g.add_argument("--text-encoder", help="Qwen2 text encoder folder (default: $HART_FAST_TEXT_ENCODER or the model's own)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: float16 on CUDA, float32 on CPU)")
    g.add_argument("--prompt-filter", default=None, metavar="MODULE:FUNCTION",
                   help="function(prompt) -> None to accept, or the reason to refuse")


def _ratios(text: str):
    """--prune-ratios: comma-separated fractions (range-checked with the other options)."""
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions such as 0.5,0.75, got {text!r}")


def _add_model_and_sampling_args(g) -> None:
    """The options generate and batch share: model, sampling, device."""
    _add_model_args(g)
    g.add_argument("-n", type=int, default=1, help="images per prompt (default 1)")
    g.add_argument("--batch-size", type=int, default=4, help="images per model batch (default 4)")
    g.add_argument("--seed", type=int, default=0, help="seed of the first image; image k uses seed+k, whatever the batch size (default 0)")
    g.add_argument("--cfg", type=float, default=4.5, help="classifier-free guidance scale, >= 0 (default 4.5; 0: none)")
    g.add_argument("--top-k", type=int, default=None, help="top-k for every stage (default: official 600/300 schedule)")
    g.add_argument("--top-p", type=float, default=0.0, help="top-p (default 0: off)")
    g.add_argument("--no-more-smooth", action="store_true", help="hard code embeddings instead of Gumbel smoothing")
    g.add_argument("--no-residual", action="store_true", help="skip the residual diffusion (discrete tokens only)")
    g.add_argument("--diffusion-steps", type=int, default=None, help="residual diffusion steps (default: the model's, 8)")
    g.add_argument("--diffusion-temperature", type=float, default=1.0)
    g.add_argument("--no-system-prompt", action="store_true", help="encode prompts without the LLM system prompt")
    g.add_argument("--speed", choices=["exact", "balanced", "fastest"], default="exact",
                   help="exact (default: the official algorithm) or an opt-in faster preset; what each costs in "
                        "quality is in BENCHMARKS.md")
    g.add_argument("--guidance-until", type=int, default=None, metavar="G",
                   help="a speed lever: classifier-free guidance on the first G scales only (negative: counted "
                        "from the end); overrides the preset's")
    g.add_argument("--prune-ratios", type=_ratios, default=None, metavar="R,R",
                   help="a speed lever: prune these fractions of the tokens of the last scales, e.g. 0.5,0.75 "
                        "(FastVAR's HART setting); overrides the preset's")
    # --no-X turns off a lever a preset would add (default: the preset decides).
    g.add_argument("--topk-sampling", action=argparse.BooleanOptionalAction, default=None,
                   help="a speed lever: draw each token and its Gumbel noise over the top-k candidates only "
                        "(the same distribution, fewer random numbers)")
    g.add_argument("--int8-weights", action=argparse.BooleanOptionalAction, default=None,
                   help="a speed lever (CPU): the transformer's projections as int8 GEMMs")
    g.add_argument("--fp8-weights", action=argparse.BooleanOptionalAction, default=None,
                   help="a speed lever (CUDA, compute capability 8.9+): the transformer's projections as fp8 GEMMs")
    g.add_argument("--cpu-bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="a speed lever (CPU, float32): run in bfloat16 (a gain only where the CPU has native "
                        "bfloat16: AVX512-BF16 or AMX)")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def cmd_train(args) -> int:
    from hart_fast.train.finetune import DatasetError

    try:
        if args.train_command == "demo":
            from hart_fast.train import recipe

            argv = ["--work", args.work, "--stage", args.stage, "--profile", args.profile]
            argv += ["--out", args.out] if args.out else []
            argv += ["--budget-min", str(args.budget_min)] if args.budget_min is not None else []
            argv += ["--device", args.device] if args.device else []
            argv += ["--tok-phase1", args.tok_phase1] if args.tok_phase1 else []
            if args.tok_refine_edge_weight is not None:
                argv += ["--tok-refine-edge-weight", str(args.tok_refine_edge_weight)]
            argv += ["--decoder-steps", str(args.decoder_steps)] if args.decoder_steps is not None else []
            argv += ["--from-model", args.from_model] if args.from_model else []
            argv += ["--quiet"] if args.quiet else []
            return recipe.main(argv)
        from hart_fast.options import parse_dtype
        from hart_fast.train.finetune import finetune

        if args.steps < 1 or args.batch < 1:
            raise UsageError(f"--steps and --batch must be >= 1, got {args.steps} and {args.batch}")
        autocast = None if args.autocast in (None, "float32", "fp32") else parse_dtype(args.autocast)
        out = finetune(args.init, args.data, args.out, work_dir=args.work, steps=args.steps, batch=args.batch,
                       lr=args.lr, seed=args.seed, text_encoder=args.text_encoder, device=args.device,
                       autocast_dtype=autocast, progress=not args.quiet)
        print(f"wrote {out}")
        return 0
    except (DatasetError, ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from e


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hart-fast", description="Fast, faithful HART text-to-image generation.")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate images from prompts")
    g.add_argument("prompts", nargs="*", help="prompts; '-' reads one per line from stdin")
    g.add_argument("--file", "-f", help="read prompts from a file, one per line")
    g.add_argument("--out", "-o", default="outputs", help="output folder, or a .png file name (default: outputs/)")
    g.add_argument("--grid", action="store_true", help="write one grid image instead of one file per image")
    _add_model_and_sampling_args(g)
    g.set_defaults(func=cmd_generate)
    b = sub.add_parser("batch", help="generate a prompt file (.txt, .jsonl, .parquet) into a folder, resumably")
    b.add_argument("prompts_file", help=".txt (one prompt per line), .jsonl or .parquet (prompt, seed, n, settings)")
    b.add_argument("--out", "-o", required=True, help="output folder: PNGs and manifest.jsonl")
    b.add_argument("--ray", default=None, metavar="auto|ADDRESS",
                   help="run on Ray actors: 'auto' joins a running cluster or starts a local one; "
                        "ADDRESS joins that cluster (default: in this process)")
    b.add_argument("--workers", type=int, default=None, help="Ray actors (default: one per GPU, else 2)")
    b.add_argument("--no-resume", action="store_true", help="refuse a folder that already holds a manifest")
    _add_model_and_sampling_args(b)
    b.set_defaults(func=cmd_batch)
    v = sub.add_parser("serve", help="an HTTP image API with dynamic batching (FastAPI + uvicorn)")
    _add_model_args(v)
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--max-batch", type=int, default=8, help="images per pipeline call (default 8)")
    v.add_argument("--max-wait-ms", type=float, default=20.0, help="how long a batch waits to fill (default 20)")
    v.add_argument("--max-queue", type=int, default=64, help="requests held before answering 429 (default 64)")
    v.add_argument("--ray", default=None, metavar="auto|ADDRESS",
                   help="run as a Ray Serve deployment (one replica per GPU) on a cluster: 'auto' joins a running "
                        "one or starts a local one")
    v.add_argument("--replicas", type=int, default=None, help="Ray Serve replicas (default: one per GPU, else 1)")
    v.set_defaults(func=cmd_serve)
    t = sub.add_parser("train", help="train the demo model, or fine-tune a HART folder on captioned images")
    tsub = t.add_subparsers(dest="train_command", required=True)
    td = tsub.add_parser("demo", help="the embedded demo model's recipe (resumable; see hart_fast.train.recipe)")
    td.add_argument("--work", required=True, help="folder for checkpoints and loss logs (rerun to resume)")
    from hart_fast.train.recipe import STAGES

    td.add_argument("--stage", choices=STAGES, default="all")
    td.add_argument("--from-model", default=None, metavar="MODEL_DIR",
                    help="with --stage residual / export: refine the residual MLP of this exported demo folder")
    td.add_argument("--out", default=None, help="model folder the export writes (default: WORK/model)")
    td.add_argument("--profile", choices=["cpu", "gpu"], default="cpu",
                    help="cpu: the embedded model's recipe; gpu: larger batches on CUDA within --budget-min")
    td.add_argument("--budget-min", type=float, default=None, help="minutes of training (the gpu profile's budget)")
    td.add_argument("--device", default=None, help="override the profile's device")
    td.add_argument("--tok-phase1", choices=["plain", "objects"], default=None,
                    help="the tokenizer's first phase: the object-weighted crowded stream (default) or plain "
                         "captioned scenes")
    td.add_argument("--tok-refine-edge-weight", type=float, default=None, metavar="W",
                    help="the edge term's weight in the tokenizer's phase 2 (default 1; the seventh model's: 0)")
    td.add_argument("--decoder-steps", type=int, default=None, metavar="N",
                    help="steps of the decoder-only stage (default 0: none; the seventh model's: 1000)")
    td.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    tf = tsub.add_parser("finetune", help="fine-tune the transformer of an official-layout folder")
    tf.add_argument("--init", required=True, help="the HART folder to start from (with encoder weights)")
    tf.add_argument("--data", required=True, help="images with captions: metadata.jsonl, or image.png + image.txt")
    tf.add_argument("--out", required=True, help="where to write the fine-tuned folder (official layout)")
    tf.add_argument("--work", default=None, help="checkpoints and loss log (default: beside --out); rerun resumes")
    tf.add_argument("--steps", type=int, default=500)
    tf.add_argument("--batch", type=int, default=16)
    tf.add_argument("--lr", type=float, default=2e-4)
    tf.add_argument("--seed", type=int, default=0)
    tf.add_argument("--text-encoder", default=None, help="Qwen2 folder (default: INIT/text_encoder)")
    tf.add_argument("--device", default="cpu")
    tf.add_argument("--dtype", dest="autocast", default=None,
                    help="autocast dtype: bfloat16 / float16 (default: float32, no autocast)")
    tf.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_train)
    i = sub.add_parser("info", help="describe a model folder and the active kernels")
    i.add_argument("model_dir", nargs="?", default=None, help="HART model folder (default: as for generate)")
    i.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="the device whose kernel plan to show (default: as for generate)")
    i.add_argument("--dtype", default=None, help="the dtype whose kernel plan to show (default: as for generate)")
    i.set_defaults(func=cmd_info)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="hart-fast: %(message)s")
    # The command prints its own "model ..." line; the library's demo-model notice would repeat it.
    logging.getLogger("hart_fast").setLevel(logging.ERROR)
    parser = build_parser()
    args = parser.parse_args(argv)
    from hart_fast.cpu_memory import keep_freed_memory

    keep_freed_memory()  # this process is ours: large batches reuse freed pages (hart_fast.cpu_memory)
    if getattr(args, "dtype", "x") is None:
        args.dtype = "float16" if str(args.device).startswith("cuda") else "float32"
    try:
        return args.func(args)
    except UsageError as e:
        print(f"hart-fast: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("hart-fast: interrupted (no partial files were left)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
