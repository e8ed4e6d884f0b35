"""`hart_fast.generate(prompts)`: prompts in, images out.

Finding the model: an explicit `model=` wins; else the environment variable
`HART_FAST_MODEL`; else the embedded demo model. The text encoder likewise:
`text_encoder=`, else `HART_FAST_TEXT_ENCODER`, else the model folder's own
`text_encoder/` (the demo model has one; official HART folders do not, and then
the error says what to pass). Loaded pipelines and encoders are cached between
calls.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from hart_fast.demo import DEMO_DIR, DEMO_NAME
from hart_fast.options import MAX_SEED, parse_dtype
from hart_fast.pipeline import HartPipeline, is_out_of_memory, to_pil
from hart_fast.text_encoder import as_text_encoder

log = logging.getLogger("hart_fast")

_CACHE: Dict[Tuple, Any] = {}
_LOCK = threading.Lock()


@dataclass
class GenerationSettings:
    """Every setting that determines an image (written into PNG metadata)."""

    guidance_scale: float = 4.5
    seed: Optional[int] = 0
    top_k: Optional[int] = None
    top_p: float = 0.0
    more_smooth: bool = True          # the official sampler's default
    residual_diffusion: bool = True
    diffusion_steps: Optional[int] = None
    diffusion_temperature: float = 1.0
    use_system_prompt: bool = True
    max_length: Optional[int] = None  # None = the model's context_token (300 for HART)
    speed: str = "exact"              # hart_fast.speed: 'exact', 'balanced' or 'fastest'
    guidance_until: Optional[int] = None  # a speed lever: CFG on the first g scales only
    prune_ratios: Optional[Tuple[float, ...]] = None  # a speed lever: token pruning at the last scales
    topk_sampling: Optional[bool] = None  # a speed lever: random numbers for the top-k candidates only
    int8_weights: Optional[bool] = None   # a speed lever (CPU): int8 transformer projections
    fp8_weights: Optional[bool] = None    # a speed lever (CUDA 8.9+): fp8 transformer projections
    cpu_bf16: Optional[bool] = None       # a speed lever (CPU): run a float32 pipeline in bfloat16

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def lever_options(self) -> Dict[str, Any]:
        """The speed preset and levers, as HartPipeline.generate / validate_options take them."""
        from hart_fast.speed import LEVERS

        # diffusion_steps is a lever too, but a sampling setting of its own here.
        return {"speed": self.speed, **{k: getattr(self, k) for k in LEVERS if k != "diffusion_steps"}}

    def resolved_levers(self, pipe) -> Dict[str, Any]:
        """The levers `pipe` runs these settings with (a preset's extras depend on the
        machine: hart_fast.speed.PRESET_EXTRAS), for PNG metadata: they say what ran.
        Passed explicitly on another kind of machine they rerun the same algorithm,
        not always the same pixels (int8 and bfloat16 kernels round differently
        from one CPU to another)."""
        return pipe.levers(diffusion_steps=self.diffusion_steps, **self.lever_options())


def resolve_model_path(model: Union[str, os.PathLike, None]) -> str:
    if model is not None:
        return os.fspath(model)
    env = os.environ.get("HART_FAST_MODEL")
    if env:
        return env
    return DEMO_DIR


def model_name(path: str) -> str:
    return DEMO_NAME if os.path.abspath(path) == os.path.abspath(DEMO_DIR) else os.path.abspath(path)


def check_device_dtype(device, dtype) -> Tuple[torch.device, torch.dtype]:
    device = torch.device(device)
    dtype = parse_dtype(dtype)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device} requested but CUDA is not available on this machine; use --device cpu")
        from hart_fast.device import check_driver_for_kernels

        check_driver_for_kernels()
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise RuntimeError(f"{torch.cuda.get_device_name(device)} cannot run bfloat16; use float16 or float32")
    elif device.type == "cpu":
        if dtype == torch.float16:
            raise RuntimeError("float16 is not supported on the CPU (too slow and not bit-stable); use float32 or bfloat16")
    else:
        raise RuntimeError(f"unsupported device {device}: use 'cpu' or 'cuda'")
    return device, dtype


def load_pipeline(model=None, device="cpu", dtype=torch.float32, use_ema=None) -> HartPipeline:
    """Load (or reuse) a pipeline for `model`; a HartPipeline passes through unchanged."""
    if isinstance(model, HartPipeline):
        return model
    path = resolve_model_path(model)
    device, dtype = check_device_dtype(device, dtype)
    key = ("pipe", os.path.abspath(path), str(device), dtype, use_ema)
    with _LOCK:
        if key not in _CACHE:
            log.info("loading HART model %s on %s (%s)", model_name(path), device, str(dtype).replace("torch.", ""))
            if model_name(path) == DEMO_NAME:
                log.warning("hart_fast: using the embedded demo model (a small HART trained on procedural scenes, "
                            "not the HART 0.7B model); pass model= or set HART_FAST_MODEL for real images")
            _CACHE[key] = HartPipeline.from_pretrained(path, device=device, dtype=dtype, use_ema=use_ema)
        return _CACHE[key]


def load_text_encoder(text_encoder, pipe: HartPipeline, settings: GenerationSettings):
    if text_encoder is not None and not isinstance(text_encoder, (str, os.PathLike)):
        return as_text_encoder(text_encoder)
    path = text_encoder if text_encoder is not None else os.environ.get("HART_FAST_TEXT_ENCODER")
    if path is None and pipe.info is not None:
        own = os.path.join(pipe.info.model_dir, "text_encoder")
        if os.path.isdir(own):
            path = own
    if path is None:
        where = pipe.info.model_dir if pipe.info else "the given pipeline"
        raise ValueError(
            f"no text encoder for model {where}: pass text_encoder= (or --text-encoder) with the path of a "
            "local Qwen2-VL-1.5B-Instruct folder, set HART_FAST_TEXT_ENCODER, or pass prompt_embeds"
        )
    max_length = settings.max_length or pipe.config.context_token
    key = ("te", os.path.abspath(os.fspath(path)), str(pipe.device), pipe.dtype, max_length, settings.use_system_prompt)
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = as_text_encoder(os.fspath(path), device=pipe.device, dtype=pipe.dtype,
                                          max_length=max_length, use_system_prompt=settings.use_system_prompt)
        encoder = _CACHE[key]
    hidden = getattr(encoder, "hidden_size", None)
    if hidden is not None and hidden != pipe.config.context_dim:
        raise ValueError(
            f"text encoder {encoder.name!r} has hidden size {hidden}, but the model expects context_dim "
            f"{pipe.config.context_dim}: this encoder does not belong to this model"
        )
    return encoder


def check_prompts(prompts) -> List[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("no prompts given: pass at least one prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompt {i} is a {type(p).__name__}, not a string: {p!r}")
    return list(prompts)


def batches(items: Sequence, batch_size: int) -> Iterator[Tuple[int, Sequence]]:
    for i in range(0, len(items), batch_size):
        yield i // batch_size, items[i:i + batch_size]


@dataclass
class Batch:
    """One generated batch: which prompt each image belongs to, and how to redo it."""

    index: int
    prompt_indices: List[int]   # per image: index into the prompt list
    repeat_indices: List[int]   # per image: which of the images_per_prompt it is
    seeds: List[int]            # per image: its seed (the image alone with this seed is the same image)
    images: torch.Tensor        # (n, 3, H, W) float32 in [0, 1], on the CPU


def iter_generate(
    prompts=None,
    *,
    model=None,
    text_encoder=None,
    device="cpu",
    dtype=torch.float32,
    use_ema: Optional[bool] = None,
    batch_size: int = 4,
    images_per_prompt: int = 1,
    prompt_embeds: Optional[torch.Tensor] = None,
    prompt_mask: Optional[torch.Tensor] = None,
    settings: Optional[GenerationSettings] = None,
) -> Iterator[Batch]:
    """Generate batch by batch (see `generate`); everything is validated before the first batch."""
    settings = settings or GenerationSettings()
    _check_int("batch_size", batch_size)
    _check_int("images_per_prompt", images_per_prompt)
    pipe = load_pipeline(model, device, dtype, use_ema)
    # Every option is checked before any work, so a bad value never costs a model run.
    pipe.validate_options(guidance_scale=settings.guidance_scale, top_k=settings.top_k, top_p=settings.top_p,
                          diffusion_steps=settings.diffusion_steps, diffusion_temperature=settings.diffusion_temperature,
                          seed=settings.seed, **settings.lever_options())
    if prompt_embeds is not None:
        if prompts is not None:
            raise ValueError("pass either prompts or prompt_embeds, not both")
        count, encode = prompt_embeds.shape[0], None
    else:
        if prompts is None:
            raise ValueError("no prompts given: pass at least one prompt")
        prompts = check_prompts(prompts)
        encode = load_text_encoder(text_encoder, pipe, settings)
        count = len(prompts)
    jobs = [(i, r) for i in range(count) for r in range(images_per_prompt)]
    # Image k of a run seeded s has seed s + k whatever the batch size: every image
    # draws only from its own streams (hart_fast.generation), so it does not depend
    # on how the run is batched.  No seed: one fresh base seed for the run.
    if settings.seed is not None and (isinstance(settings.seed, bool) or not isinstance(settings.seed, int)):
        raise ValueError(f"seed must be an integer >= 0 (image k uses seed + k) or None, got {settings.seed!r}; "
                         "one seed per row is an option of HartPipeline.generate")
    base = int(torch.randint(0, 2**62, (1,))) if settings.seed is None else settings.seed
    if base + len(jobs) - 1 > MAX_SEED:
        raise ValueError(f"seed must be <= {MAX_SEED - len(jobs) + 1} for {len(jobs)} images (image k uses seed + k)")
    for b, job in batches(jobs, batch_size):
        rows = [i for i, _ in job]
        if encode is not None:
            embeds, mask = encode([prompts[i] for i in rows])
        else:
            embeds = prompt_embeds[rows]
            mask = None if prompt_mask is None else prompt_mask[rows]
        seeds = [base + b * batch_size + j for j in range(len(job))]
        try:
            out = pipe.generate(
                embeds, mask, guidance_scale=settings.guidance_scale, seed=seeds, top_k=settings.top_k,
                top_p=settings.top_p, more_smooth=settings.more_smooth,
                residual_diffusion=settings.residual_diffusion, diffusion_steps=settings.diffusion_steps,
                diffusion_temperature=settings.diffusion_temperature, output_type="pt", **settings.lever_options(),
            )
        except (RuntimeError, torch.OutOfMemoryError) as e:
            if is_out_of_memory(e):
                raise RuntimeError(
                    f"out of memory generating a batch of {len(job)} images on {pipe.device}; "
                    f"try a smaller batch size (for example --batch-size {max(1, len(job) // 2)})"
                ) from e
            raise
        yield Batch(b, rows, [r for _, r in job], seeds, out.cpu())


def generate(
    prompts=None,
    *,
    model=None,
    text_encoder=None,
    device="cpu",
    dtype=torch.float32,
    use_ema: Optional[bool] = None,
    batch_size: int = 4,
    images_per_prompt: int = 1,
    output_type: str = "pil",
    prompt_embeds: Optional[torch.Tensor] = None,
    prompt_mask: Optional[torch.Tensor] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    **options,
):
    """Generate images for `prompts` (a string or a list of strings).

    model: a HART folder, a loaded HartPipeline, or None (HART_FAST_MODEL, else the
    embedded demo model). text_encoder: a Qwen2 folder, any callable
    `prompts -> embeds or (embeds, mask)`, or None (HART_FAST_TEXT_ENCODER, else the
    model folder's text_encoder/). Or pass prompt_embeds (and prompt_mask) directly.
    Options (defaults are the official sampler's): guidance_scale (alias cfg)=4.5,
    seed=0, top_k=None (official per-stage schedule), top_p=0.0, more_smooth=True,
    residual_diffusion=True, diffusion_steps=None (the config's, 8),
    diffusion_temperature=1.0, use_system_prompt=True, max_length=None;
    speed='exact' (or 'balanced' / 'fastest': opt-in presets of faster levers,
    hart_fast.speed) and its levers guidance_until=None (CFG on the first g scales
    only), prune_ratios=None (token pruning at the last scales, e.g. (0.5, 0.75)),
    topk_sampling=None (draw each token over the top-k candidates only: the same
    distribution from fewer random numbers), int8_weights=None (CPU: int8
    transformer projections), fp8_weights=None (CUDA compute capability 8.9+:
    fp8 projections) and cpu_bf16=None (run a float32 CPU pipeline in bfloat16; a
    gain only where the CPU has native bfloat16).
    Image k of the run (prompt-major) uses seed + k, whatever `batch_size`: an
    image depends on its own prompt, seed and settings only.
    Returns a list of PIL images ("pil", the default) or an (N, 3, H, W) float
    tensor in [0, 1] ("pt"), prompt-major: all images of prompt 0 first. A single
    prompt string with images_per_prompt=1 returns that one image (a PIL image,
    or a (3, H, W) tensor).
    """
    settings = GenerationSettings(**_settings_kwargs(options))
    if output_type not in ("pil", "pt"):
        raise ValueError(f"output_type must be 'pil' or 'pt', got {output_type!r}")
    images = []
    it = iter_generate(prompts, model=model, text_encoder=text_encoder, device=device, dtype=dtype,
                       use_ema=use_ema, batch_size=batch_size, images_per_prompt=images_per_prompt,
                       prompt_embeds=prompt_embeds, prompt_mask=prompt_mask, settings=settings)
    count = (len(check_prompts(prompts)) if prompt_embeds is None and prompts is not None
             else (0 if prompt_embeds is None else prompt_embeds.shape[0]))
    total = max(1, -(-count * images_per_prompt // batch_size)) if isinstance(batch_size, int) and batch_size > 0 else 1
    for batch in it:
        images.append(batch.images)
        if progress is not None:
            progress(batch.index + 1, total)
    result = torch.cat(images, 0)
    # One prompt string and one image: hand back that image, not a list of one.
    single = isinstance(prompts, str) and images_per_prompt == 1
    if output_type == "pil":
        pil = to_pil(result)
        return pil[0] if single else pil
    return result[0] if single else result


def _check_int(name, value, lo=1):
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")


def _settings_kwargs(options: Dict[str, Any]) -> Dict[str, Any]:
    aliases = {"cfg": "guidance_scale"}
    out = {}
    valid = set(GenerationSettings.__dataclass_fields__)
    for k, v in options.items():
        k = aliases.get(k, k)
        if k not in valid:
            raise TypeError(f"generate() got an unexpected option {k!r}; valid options: {', '.join(sorted(valid))}")
        out[k] = v
    return out


def clear_cache() -> None:
    """Forget cached pipelines and text encoders (frees their memory)."""
    with _LOCK:
        _CACHE.clear()


__all__ = ["generate", "iter_generate", "load_pipeline", "GenerationSettings", "Batch", "clear_cache"]
