"""HartPipeline: a loaded HART model on one device and dtype, and what runs around the loop.

The generation loop itself is hart_fast.generation (one loop, two backends:
hart_fast.reference and the kernel path hart_fast.engine).  Here: owning the
modules and the fast engine, validating inputs (hart_fast.options), the
out-of-memory retry, the decode policy, encode / reconstruct, and PIL output.
Loading the official folders is hart_fast.loading.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Union

import torch

from hart_fast.generation import TokenSampler, generate_latent, guided_stages
from hart_fast.loading import ModelInfo, load_models
from hart_fast.model.diffusion import RespacedSchedule
from hart_fast.model.tokenizer import HartTokenizer
from hart_fast.model.transformer import HartTransformer
from hart_fast.options import parse_dtype, validate_inputs, validate_options
from hart_fast.pruning import check_ratios
from hart_fast.reference import ReferenceBackend
from hart_fast.speed import BOOL_LEVERS, check_levers_where, pipeline_traits, resolve_levers


def is_out_of_memory(e: BaseException) -> bool:
    """torch's out-of-memory error, or a library error that reports one (cuBLAS, cuDNN)."""
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


class HartPipeline:
    """A loaded HART model (transformer + tokenizer) on one device and dtype."""

    def __init__(self, transformer: HartTransformer, tokenizer: HartTokenizer,
                 device="cpu", dtype=torch.float32, info: Optional[ModelInfo] = None,
                 fast: Optional[bool] = None):
        self.device = torch.device(device)
        self.dtype = parse_dtype(dtype)
        # Inference only: no parameter needs a gradient.
        # Half precision as the official sampler under autocast: the weights that feed
        # float32 math (norms outside the blocks) stay float32, the rest take the dtype.
        self.transformer = transformer.to_run_dtype(self.device, self.dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer.to(self.device, self.dtype).eval().requires_grad_(False)
        self.info = info
        self._schedules: Dict[str, RespacedSchedule] = {}
        # fast: the kernel path (hart_fast.engine); None = on whenever the compiled
        # extension is available. The reference path stays the ground truth.
        from hart_fast import ops

        self.fast = ops.HAS_EXTENSION if fast is None else bool(fast)
        self._engine = None
        # Built on first use: the int8_weights / fp8_weights levers' engines (by weight
        # kind), and the cpu_bf16 lever's bfloat16 copy of this pipeline.
        self._quantized_engines: Dict[str, object] = {}
        self._bf16_pipeline: Optional["HartPipeline"] = None

    def release_memory(self) -> bool:
        """Free the fast path's cached state of every batch size (KV caches, stage
        buffers, CUDA graphs); the next generate rebuilds what it needs.  Returns
        whether anything was freed."""
        freed = self._engine is not None and self._engine.release()
        for eng in self._quantized_engines.values():
            eng.release()  # its CUDA graphs and pools, before the engine goes
        if self._quantized_engines or self._bf16_pipeline is not None:
            self._quantized_engines, self._bf16_pipeline, freed = {}, None, True
        return freed

    def _retry_out_of_memory(self, fn, keep_rows: Optional[int] = None):
        """fn(), run once more if it ran out of memory while the fast engine held
        state it does not need (other batch sizes' buffers and graphs; for a decode,
        keep_rows None, all of it).  The retry starts from scratch: seeded runs
        give the same result; a stateful token_sampler sees the stages again."""
        try:
            return fn()
        except (RuntimeError, torch.OutOfMemoryError) as e:
            # Every engine's spare state (the float one's and the quantised levers',
            # listed now: fn may have built one on first use).
            engines = [eng for eng in (self._engine, *self._quantized_engines.values()) if eng is not None]
            if not is_out_of_memory(e) or not any([eng.release(keep=keep_rows) for eng in engines]):
                raise
        # The state of this batch size too: a graph capture cut short is not reused.
        for eng in engines:
            eng.release()
        return fn()

    @property
    def engine(self):
        """The FastEngine of this pipeline (static buffers, CUDA graphs), built on first use."""
        if self._engine is None:
            from hart_fast.engine import FastEngine

            self._engine = FastEngine(self.transformer, self.tokenizer)
        return self._engine

    def quantized_engine(self, weights: str):
        """The FastEngine whose transformer projections are `weights` ('int8' or 'fp8':
        the int8_weights / fp8_weights levers), built on first use."""
        if weights not in self._quantized_engines:
            from hart_fast.engine import FastEngine

            # Without CUDA graphs (the CPU) it shares the float engine's KV cache and buffers.
            shared = None if self.engine.use_cuda_graphs else self.engine.states
            self._quantized_engines[weights] = FastEngine(self.transformer, self.tokenizer, weights=weights,
                                                          states=shared)
        return self._quantized_engines[weights]

    @property
    def bf16_pipeline(self) -> "HartPipeline":
        """A bfloat16 copy of this (float32 CPU) pipeline: the cpu_bf16 lever."""
        if self._bf16_pipeline is None:
            # Made outside inference mode (generate runs in it): the copy's weights are
            # ordinary tensors, whose version counters the diffusion's caches read.
            with torch.inference_mode(False):
                tr = _copy_as(self.transformer, torch.bfloat16, self.transformer.float32_parameters())
                self._bf16_pipeline = HartPipeline(tr, _copy_as(self.tokenizer, torch.bfloat16), self.device,
                                                   torch.bfloat16, self.info, fast=self.fast)
        return self._bf16_pipeline

    def levers(self, speed="exact", **explicit):
        """The speed levers a call runs with (hart_fast.speed.resolve_levers for this
        pipeline: the preset, its extras where this pipeline gains from them, and
        every explicit non-None lever)."""
        traits = pipeline_traits(self.device, self.dtype, self.fast, last_scale=self.config.patch_nums[-1])
        return resolve_levers(speed, traits=traits, **explicit)

    @classmethod
    def from_pretrained(cls, model_dir, device="cpu", dtype=torch.float32, use_ema: Optional[bool] = None,
                        fast: Optional[bool] = None):
        """Load an official HART folder (holding llm/ and tokenizer/). Nothing is downloaded.

        fast: run the kernel path (default: when the compiled extension is available);
        False runs the plain-PyTorch reference loop.
        """
        dtype = parse_dtype(dtype)
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {device} requested but CUDA is not available on this machine")
        transformer, tokenizer, info = load_models(model_dir, use_ema)
        return cls(transformer, tokenizer, device, dtype, info, fast=fast)

    @property
    def config(self):
        return self.transformer.cfg

    def schedule(self, steps) -> RespacedSchedule:
        key = str(steps)
        if key not in self._schedules:
            self._schedules[key] = RespacedSchedule.build(key)
        return self._schedules[key]

    def validate_options(self, guidance_scale=4.5, top_k=None, top_p=0.0, diffusion_steps=None,
                         diffusion_temperature=1.0, seed=0, speed="exact", **levers):
        """Raise ValueError naming the first invalid sampling option.  levers: the
        speed levers of hart_fast.speed.LEVERS but diffusion_steps (None = unset).
        Returns the levers the call runs with (`levers(...)`), checked."""
        lv = self.levers(speed, diffusion_steps=diffusion_steps, **levers)
        validate_options(guidance_scale, top_k, top_p, lv["diffusion_steps"], diffusion_temperature, seed,
                         schedule_fn=self.schedule, guidance_until=lv["guidance_until"],
                         prune_ratios=lv["prune_ratios"],
                         **{k: lv[k] for k in BOOL_LEVERS})
        guided_stages(lv["guidance_until"], self.config.num_stages)
        if lv["prune_ratios"] is not None:
            check_ratios(lv["prune_ratios"], self.config.num_stages)
        check_levers_where(lv, self.device, self.dtype, self.fast)
        return lv

    @torch.inference_mode()
    def generate(
        self,
        prompt_embeds: torch.Tensor,
        prompt_mask: Optional[torch.Tensor] = None,
        guidance_scale: float = 4.5,
        seed: Union[int, Sequence[int], None] = 0,
        top_k: Optional[int] = None,
        top_p: float = 0.0,
        more_smooth: bool = False,
        residual_diffusion: bool = True,
        diffusion_steps: Union[int, str, None] = None,
        diffusion_temperature: float = 1.0,
        residual_latents: Optional[torch.Tensor] = None,
        token_sampler: Optional[TokenSampler] = None,
        output_type: str = "pt",
        *,
        speed: str = "exact",
        guidance_until: Optional[int] = None,
        prune_ratios: Optional[Sequence[float]] = None,
        topk_sampling: Optional[bool] = None,
        int8_weights: Optional[bool] = None,
        fp8_weights: Optional[bool] = None,
        cpu_bf16: Optional[bool] = None,
        trace: Optional[dict] = None,
        diffusion_noise_fn: Optional[Callable] = None,
    ):
        """Generate images from text-encoder states.

        prompt_embeds (B, context_token, context_dim); prompt_mask (B, context_token)
        bool, True for real tokens (None = all real); position ids are
        cumsum(mask) - 1. seed: an int s seeds row b with s + b, a list one seed per
        row, None fresh ones; each row draws only from its own streams, so an image
        does not depend on the rest of its batch. guidance_scale >= 0 (0: no guidance). top_k None follows
        the official schedule (600 for stages 0-6, 300 after); an int applies to
        every stage (0 = off). diffusion_steps None uses the config's
        `num_sampling_steps`. token_sampler(stage, logits (B, l, V) float32 after
        CFG, before top-k) -> (B, l) int64 replaces the multinomial draw.
        residual_latents (B, L_last, Cvae) is the residual diffusion's initial noise.
        speed: 'exact' (the official algorithm), 'balanced' or 'fastest', presets of
        the levers in hart_fast.speed: guidance_until (CFG on the first g scales
        only), prune_ratios (token pruning at the last scales), diffusion_steps,
        topk_sampling (each draw over the top-k candidates only), int8_weights
        (CPU), fp8_weights (CUDA, compute capability 8.9+) and cpu_bf16 (a float32
        CPU pipeline run in bfloat16); an explicit lever overrides the preset's.
        trace, a dict, receives the loop's intermediate tensors (hart_fast.generation);
        diffusion_noise_fn(shape) replaces the residual diffusion's Gaussian draws.
        Returns (B, 3, H, W) float in [0, 1] ("pt"), a list of PIL images ("pil")
        or the decoder's input latent f_hat ("latent").
        """
        validate_inputs(self.config, self.tokenizer.Cvae, prompt_embeds, prompt_mask, residual_latents, output_type,
                        seed)
        explicit = dict(guidance_until=guidance_until, prune_ratios=prune_ratios, topk_sampling=topk_sampling,
                        int8_weights=int8_weights, fp8_weights=fp8_weights, cpu_bf16=cpu_bf16)
        levers = self.validate_options(guidance_scale, top_k, top_p, diffusion_steps, diffusion_temperature, seed,
                                       speed, **explicit)
        if levers.pop("cpu_bf16"):
            # The same call on the bfloat16 copy, every lever now explicit.
            out = self.bf16_pipeline.generate(
                prompt_embeds, prompt_mask, guidance_scale, seed, top_k, top_p, more_smooth, residual_diffusion,
                diffusion_temperature=diffusion_temperature, residual_latents=residual_latents,
                token_sampler=token_sampler, output_type=output_type, trace=trace,
                diffusion_noise_fn=diffusion_noise_fn, **levers)
            return out.float() if output_type == "latent" else out
        diffusion_steps = levers["diffusion_steps"]
        if diffusion_steps is None:
            diffusion_steps = self.config.num_sampling_steps

        def run():
            weights = "int8" if levers["int8_weights"] else "fp8" if levers["fp8_weights"] else None
            if weights:
                backend = self.quantized_engine(weights)
            else:
                backend = self.engine if self.fast else ReferenceBackend(self.transformer, self.tokenizer)
            return generate_latent(
                self.transformer, self.tokenizer, backend, prompt_embeds, prompt_mask,
                guidance_scale=guidance_scale, seed=seed, top_k=top_k, top_p=top_p, more_smooth=more_smooth,
                residual_diffusion=residual_diffusion, schedule=self.schedule(diffusion_steps),
                diffusion_temperature=diffusion_temperature, residual_latents=residual_latents,
                token_sampler=token_sampler, trace=trace, diffusion_noise_fn=diffusion_noise_fn,
                guidance_until=levers["guidance_until"], prune_ratios=levers["prune_ratios"],
                topk_sampling=bool(levers["topk_sampling"]),
            )

        f_hat = self._retry_out_of_memory(run, keep_rows=2 * prompt_embeds.shape[0])
        if output_type == "latent":
            return f_hat
        images = self._retry_out_of_memory(lambda: self.decode(f_hat))
        if output_type == "pil":
            return to_pil(images)
        return images

    @torch.inference_mode()
    def decode(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Latent f_hat (B, Cvae, P, P) -> images (B, 3, H, W) float32 in [0, 1]."""
        f_hat = f_hat.to(self.device, self.dtype)
        if self.fast:
            from hart_fast.model.vae_fast import fhat_to_img_fast

            # channels_last on the CPU: oneDNN's convolutions (89% of the decode
            # there) prefer NHWC, 10-16% faster end to end (BENCHMARKS.md).  The
            # GPU keeps NCHW until the device report says otherwise.
            img = fhat_to_img_fast(self.tokenizer, f_hat, channels_last=self.device.type == "cpu")
        else:
            img = self.tokenizer.fhat_to_img(f_hat)
        return img.float().add_(1).mul_(0.5)

    @torch.inference_mode()
    def encode(self, images: torch.Tensor):
        """Images (B, 3, H, W) in [0, 1] -> (codes per scale [(B, pn*pn) int64], residual (B, L_last, Cvae)).

        The multi-scale residual quantisation of HART's tokenizer at the model's
        scales; `residual` is the continuous part the residual diffusion models, so
        `decode(latent_from_tokens(codes, residual))` reconstructs the image up to the
        autoencoder's own loss. Needs a tokenizer folder with encoder weights.
        """
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be a (B, 3, H, W) tensor in [0, 1], got {getattr(images, 'shape', images)}")
        side = self.config.patch_nums[-1] * self.tokenizer.cfg.downsample
        if tuple(images.shape[2:]) != (side, side):
            raise ValueError(f"images must be {side}x{side} for this model, got {tuple(images.shape[2:])}")
        f = self.tokenizer.img_to_latent(images.to(self.device, self.dtype) * 2 - 1)
        return self.tokenizer.latent_to_tokens(f, self.config.patch_nums)

    @torch.inference_mode()
    def latent_from_tokens(self, codes, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Codes per scale (+ optional residual) -> the decoder's input latent f_hat."""
        return self.tokenizer.tokens_to_latent(codes, self.config.patch_nums, residual)

    def reconstruct(self, images: torch.Tensor, with_residual: bool = True) -> torch.Tensor:
        """Encode then decode: images in [0, 1] -> images in [0, 1]."""
        codes, residual = self.encode(images)
        return self.decode(self.latent_from_tokens(codes, residual if with_residual else None))


def _copy_as(module: torch.nn.Module, dtype: torch.dtype, keep_float32=()) -> torch.nn.Module:
    """A deep copy of `module` whose floating parameters and buffers are made in `dtype`
    as they are copied (those named in keep_float32 stay float32): no second float32
    copy of the whole model exists at any time, so the peak is the original plus the copy."""
    import copy

    keep = set(keep_float32)
    memo = {}
    for name, p in module.named_parameters():
        t = p.detach().float().clone() if name in keep else (
            p.detach().to(dtype, copy=True) if p.is_floating_point() else p.detach().clone())
        memo[id(p)] = torch.nn.Parameter(t, requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = b.detach().to(dtype, copy=True) if b.is_floating_point() else b.detach().clone()
    return copy.deepcopy(module, memo)


def to_pil(images_B3HW: torch.Tensor):
    from PIL import Image

    # Truncation, as the official sampler saves its PNGs (x*255 then astype(uint8)).
    arr = images_B3HW.detach().float().clamp(0, 1).mul(255).to(torch.uint8)
    arr = arr.permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a, mode="RGB") for a in arr]


__all__ = ["HartPipeline", "TokenSampler", "is_out_of_memory", "load_models", "parse_dtype", "to_pil"]
