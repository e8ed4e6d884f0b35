"""HartPipeline: load the official folders and run HART generation.

The loop reads top to bottom like the official `autoregressive_infer_cfg`:
condition -> stage 0 over the context -> one pass per scale (sample codes,
grow f_hat, build the next scale's input) -> last scale (codes + residual
diffusion) -> decode. Everything runs on one device in one dtype; f_hat and the
sampler work in float32.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Union

import torch

from hart_fast.config import TokenizerConfig, TransformerConfig
from hart_fast.loading import (
    CheckpointError,
    load_strict,
    read_weights,
    resolve_folders,
    tokenizer_folder,
    WEIGHT_FILES,
)
from hart_fast.model.diffusion import RespacedSchedule, sample_residual
from hart_fast.model.tokenizer import HartTokenizer
from hart_fast.model.transformer import HartTransformer, KVCache
from hart_fast.sampling import (
    cfg_combine,
    cfg_ratio,
    filter_top_k_top_p_,
    gumbel_mix,
    multinomial_sample,
    official_top_k,
)

TokenSampler = Callable[[int, torch.Tensor], torch.Tensor]

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def is_out_of_memory(e: BaseException) -> bool:
    """torch's out-of-memory error, or a library error that reports one (cuBLAS, cuDNN)."""
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"unsupported dtype {dtype}: use float32, float16 or bfloat16")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"unsupported dtype {dtype!r}: use 'float32', 'float16' or 'bfloat16'")


@dataclass
class ModelInfo:
    model_dir: str
    llm_dir: str
    tokenizer_dir: str
    weights_file: str
    used_ema: bool


def load_models(model_dir: str, use_ema: Optional[bool] = None):
    """Build and strictly load (transformer, tokenizer, ModelInfo) on CPU in float32."""
    llm_dir, _ = resolve_folders(model_dir)
    tcfg = TransformerConfig.from_file(os.path.join(llm_dir, "config.json"))
    tok_dir = tokenizer_folder(llm_dir, tcfg.vae_path)
    kcfg = TokenizerConfig.from_file(os.path.join(tok_dir, "config.json"))

    # Tokenizer: keep `vae.*`, drop the discriminator, refuse anything else.
    tok_raw, tok_file = read_weights(tok_dir)
    tok_sd, ignored = {}, set()
    for key, value in tok_raw.items():
        if key.startswith("vae."):
            tok_sd[key[len("vae."):]] = value
        elif key.startswith("disc."):
            continue
        else:
            raise CheckpointError(
                f"unexpected key '{key}' in {tok_file}: tokenizer keys must start with 'vae.' (or 'disc.')"
            )
    with_encoder = any(k.startswith(("encoder.", "quant_conv.")) for k in tok_sd)
    tokenizer = HartTokenizer(kcfg, with_encoder=with_encoder)
    ignored.add("quantize.ema_vocab_hit_SV")  # training statistic
    if kcfg.double_decoder:  # the official loader replaces decoder2 by a copy of decoder; unused here
        ignored.update(k for k in tok_sd if k.startswith(("decoder2.", "post_quant_conv2.")))
    load_strict(tokenizer, tok_sd, tok_file, ignored=ignored)

    transformer = HartTransformer(tcfg, Cvae=kcfg.Cvae, vocab_size=kcfg.vocab_size)
    ema_path = os.path.join(llm_dir, "ema_model.bin")
    if use_ema is True and not os.path.isfile(ema_path):
        raise FileNotFoundError(f"use_ema=True but {ema_path} does not exist")
    used_ema = bool(use_ema is not False and os.path.isfile(ema_path))
    if used_ema:
        if not any(os.path.isfile(os.path.join(llm_dir, n)) for n in WEIGHT_FILES):
            raise CheckpointError(f"no weights found in {llm_dir}: expected one of {', '.join(WEIGHT_FILES)}")
        from hart_fast.loading import _load_single

        llm_sd, llm_file = _load_single(ema_path), ema_path
    else:
        llm_sd, llm_file = read_weights(llm_dir)
    # Persistent buffers of the official module: the training mask is unused at
    # inference; the level ids and the zero k-bias are checked when present.
    optional = {"lvl_1L"} | {f"blocks.{i}.attn.zero_k_bias" for i in range(tcfg.depth)}
    ignored_llm = {"attn_bias_for_masking"}
    if "attn_bias_for_masking" in llm_sd:
        n = tcfg.total_tokens
        if tuple(llm_sd["attn_bias_for_masking"].shape) != (1, 1, n, n):
            raise CheckpointError(
                f"shape mismatch for 'attn_bias_for_masking' in {llm_file}: file has "
                f"{tuple(llm_sd['attn_bias_for_masking'].shape)}, the config implies {(1, 1, n, n)}"
            )
    expected_lvl = transformer.lvl_1L.clone()
    load_strict(transformer, llm_sd, llm_file, ignored=ignored_llm, optional=optional)
    if not torch.equal(transformer.lvl_1L, expected_lvl):
        raise CheckpointError(f"'lvl_1L' in {llm_file} does not match the stage layout of patch_nums {tcfg.patch_nums}")
    info = ModelInfo(os.fspath(model_dir), llm_dir, tok_dir, llm_file, used_ema)
    return transformer.eval(), tokenizer.eval(), info


def _check_generator_arg(name, value, kind, lo=None, hi=None, lo_open=False, hi_open=False):
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok:
        raise ValueError(f"{name} must be a {'integer' if kind is int else 'finite number'}, got {value!r}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and (value >= hi if hi_open else value > hi):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {value!r}")


class HartPipeline:
    """A loaded HART model (transformer + tokenizer) on one device and dtype."""

    def __init__(self, transformer: HartTransformer, tokenizer: HartTokenizer,
                 device="cpu", dtype=torch.float32, info: Optional[ModelInfo] = None,
                 fast: Optional[bool] = None):
        self.device = torch.device(device)
        self.dtype = parse_dtype(dtype)
        # Inference only: no parameter needs a gradient.
        self.transformer = transformer.to(self.device, self.dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer.to(self.device, self.dtype).eval().requires_grad_(False)
        self.info = info
        self._schedules: Dict[str, RespacedSchedule] = {}
        # fast: the kernel path (hart_fast.engine); None = on whenever the compiled
        # extension is available. The reference path stays the ground truth.
        from hart_fast import ops

        self.fast = ops.HAS_EXTENSION if fast is None else bool(fast)
        self._engine = None

    def release_memory(self) -> bool:
        """Free the fast path's cached state of every batch size (KV caches, stage
        buffers, CUDA graphs); the next generate rebuilds what it needs.  Returns
        whether anything was freed."""
        return self._engine is not None and self._engine.release()

    def _retry_out_of_memory(self, fn, keep_rows: Optional[int] = None):
        """fn(), run once more if it ran out of memory while the fast engine held
        state it does not need (other batch sizes' buffers and graphs; for a decode,
        keep_rows None, all of it).  The retry starts from scratch: seeded runs
        give the same result; a stateful token_sampler sees the stages again."""
        try:
            return fn()
        except (RuntimeError, torch.OutOfMemoryError) as e:
            if not is_out_of_memory(e) or self._engine is None or not self._engine.release(keep=keep_rows):
                raise
        # The state of this batch size too: a graph capture cut short is not reused.
        self._engine.release()
        return fn()

    @property
    def engine(self):
        """The FastEngine of this pipeline (static buffers, CUDA graphs), built on first use."""
        if self._engine is None:
            from hart_fast.engine import FastEngine

            self._engine = FastEngine(self)
        return self._engine

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
    def config(self) -> TransformerConfig:
        return self.transformer.cfg

    def schedule(self, steps) -> RespacedSchedule:
        key = str(steps)
        if key not in self._schedules:
            self._schedules[key] = RespacedSchedule.build(key)
        return self._schedules[key]

    # ------------------------------------------------------------------------
    def _validate(self, prompt_embeds, prompt_mask, guidance_scale, top_k, top_p, diffusion_steps,
                  diffusion_temperature, residual_latents, output_type, seed):
        cfg = self.config
        if not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.dim() != 3:
            raise ValueError(
                "prompt_embeds must be a tensor of shape (B, context_token, context_dim), got "
                f"{getattr(prompt_embeds, 'shape', type(prompt_embeds).__name__)}"
            )
        B, T, D = prompt_embeds.shape
        if B == 0:
            raise ValueError("prompt_embeds has batch size 0: nothing to generate")
        if (T, D) != (cfg.context_token, cfg.context_dim):
            raise ValueError(
                f"prompt_embeds has shape {tuple(prompt_embeds.shape)}, expected (B, {cfg.context_token}, "
                f"{cfg.context_dim}) for this model (context_token, context_dim)"
            )
        if not prompt_embeds.dtype.is_floating_point:
            raise ValueError(f"prompt_embeds must be a float tensor, got {prompt_embeds.dtype}")
        if prompt_mask is not None:
            if not isinstance(prompt_mask, torch.Tensor) or tuple(prompt_mask.shape) != (B, T):
                raise ValueError(
                    f"prompt_mask must be a (B, context_token) = {(B, T)} tensor, got "
                    f"{getattr(prompt_mask, 'shape', type(prompt_mask).__name__)}"
                )
            if prompt_mask.dtype != torch.bool and prompt_mask.dtype.is_floating_point:
                raise ValueError(f"prompt_mask must be bool (or 0/1 integers), got {prompt_mask.dtype}")
        self.validate_options(guidance_scale, top_k, top_p, diffusion_steps, diffusion_temperature, seed)
        if output_type not in ("pt", "pil", "latent"):
            raise ValueError(f"output_type must be 'pt', 'pil' or 'latent', got {output_type!r}")
        if residual_latents is not None:
            L = cfg.patch_nums[-1] ** 2
            shape = (B, L, self.tokenizer.Cvae)
            if not isinstance(residual_latents, torch.Tensor) or tuple(residual_latents.shape) != shape:
                raise ValueError(
                    f"residual_latents must have shape (B, L_last, Cvae) = {shape}, got "
                    f"{getattr(residual_latents, 'shape', type(residual_latents).__name__)}"
                )

    def validate_options(self, guidance_scale=4.5, top_k=None, top_p=0.0, diffusion_steps=None,
                         diffusion_temperature=1.0, seed=0):
        """Raise ValueError naming the first invalid sampling option."""
        _check_generator_arg("guidance_scale", guidance_scale, float)
        if top_k is not None:
            _check_generator_arg("top_k", top_k, int, lo=0)
        _check_generator_arg("top_p", top_p, float, lo=0, hi=1, hi_open=True)
        if diffusion_steps is None:
            pass
        elif isinstance(diffusion_steps, str):
            try:
                self.schedule(diffusion_steps)
            except ValueError as e:
                raise ValueError(f"invalid diffusion_steps {diffusion_steps!r}: {e}") from e
        else:
            _check_generator_arg("diffusion_steps", diffusion_steps, int, lo=1)
            if diffusion_steps > 1000:
                raise ValueError(f"diffusion_steps must be <= 1000 (the trained schedule), got {diffusion_steps}")
        _check_generator_arg("diffusion_temperature", diffusion_temperature, float, lo=0)
        if seed is not None:
            _check_generator_arg("seed", seed, int, lo=0)

    @torch.inference_mode()
    def generate(
        self,
        prompt_embeds: torch.Tensor,
        prompt_mask: Optional[torch.Tensor] = None,
        guidance_scale: float = 4.5,
        seed: Optional[int] = 0,
        top_k: Optional[int] = None,
        top_p: float = 0.0,
        more_smooth: bool = False,
        residual_diffusion: bool = True,
        diffusion_steps: Union[int, str, None] = None,
        diffusion_temperature: float = 1.0,
        residual_latents: Optional[torch.Tensor] = None,
        token_sampler: Optional[TokenSampler] = None,
        output_type: str = "pt",
    ):
        """Generate images from text-encoder states.

        prompt_embeds (B, context_token, context_dim); prompt_mask (B, context_token)
        bool, True for real tokens (None = all real); position ids are
        cumsum(mask) - 1. top_k None follows the official schedule (600 for
        stages 0-6, 300 after); an int applies to every stage (0 = off).
        diffusion_steps None uses the config's `num_sampling_steps`.
        token_sampler(stage, logits (B, l, V) float32 after CFG, before top-k)
        -> (B, l) int64 replaces the multinomial draw. residual_latents
        (B, L_last, Cvae) is the residual diffusion's initial noise.
        Returns (B, 3, H, W) float in [0, 1] ("pt"), a list of PIL images ("pil")
        or the decoder's input latent f_hat ("latent").
        """
        if diffusion_steps is None:
            diffusion_steps = self.config.num_sampling_steps
        self._validate(prompt_embeds, prompt_mask, guidance_scale, top_k, top_p, diffusion_steps,
                       diffusion_temperature, residual_latents, output_type, seed)
        run = self.engine.run if self.fast else self._run
        f_hat = self._retry_out_of_memory(
            lambda: run(
                prompt_embeds, prompt_mask, guidance_scale=guidance_scale, seed=seed, top_k=top_k, top_p=top_p,
                more_smooth=more_smooth, residual_diffusion=residual_diffusion, diffusion_steps=diffusion_steps,
                diffusion_temperature=diffusion_temperature, residual_latents=residual_latents,
                token_sampler=token_sampler,
            ),
            keep_rows=2 * prompt_embeds.shape[0],
        )
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

    def _sample_codes(self, si, logits_BlV, top_k, top_p, token_sampler, generator):
        k = official_top_k(si) if top_k is None else top_k
        if token_sampler is not None:
            idx = token_sampler(si, logits_BlV.clone())
            B, l, V = logits_BlV.shape
            if not isinstance(idx, torch.Tensor) or tuple(idx.shape) != (B, l) or idx.dtype != torch.int64:
                raise ValueError(
                    f"token_sampler must return an int64 tensor of shape {(B, l)} at stage {si}, got "
                    f"{getattr(idx, 'dtype', type(idx).__name__)} {tuple(getattr(idx, 'shape', ()))}"
                )
            idx = idx.to(logits_BlV.device)
            filter_top_k_top_p_(logits_BlV, k, top_p)  # the Gumbel mixture sees filtered logits
            return idx
        filter_top_k_top_p_(logits_BlV, k, top_p)
        return multinomial_sample(logits_BlV, generator)

    def _run(self, prompt_embeds, prompt_mask, *, guidance_scale, seed, top_k, top_p, more_smooth,
             residual_diffusion, diffusion_steps, diffusion_temperature, residual_latents, token_sampler,
             trace: Optional[dict] = None, diffusion_noise_fn=None):
        tr, tok = self.transformer, self.tokenizer
        cfg = tr.cfg
        dev, dt = self.device, self.dtype
        B, T, _ = prompt_embeds.shape
        S = cfg.num_stages
        P = cfg.patch_nums[-1]
        Cvae = tok.Cvae
        codebook = tok.quantize.embedding.weight
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        generator = torch.Generator(device=dev).manual_seed(seed)

        context = prompt_embeds.to(dev, dt)
        mask2, pos2 = cfg_doubled_mask_and_positions(prompt_mask, B, T, dev)

        cond_BTC = tr.condition(context)                                      # (2B, T, C)
        block_mods, head_mod = tr.modulations(cond_BTC, mask2)
        lvl_pos = tr.level_embeddings()                                       # (1, total, C)
        slices = tr.stage_slices()
        cache = KVCache(cfg.depth, 2 * B, cfg.num_heads, cfg.total_tokens, cfg.head_dim, dev, dt)
        f_hat = torch.zeros(B, Cvae, P, P, device=dev, dtype=torch.float32)

        x = cond_BTC + lvl_pos[:, :T]
        for si, pn in enumerate(cfg.patch_nums):
            last = si == S - 1
            ratio = cfg_ratio(si, S)
            t = guidance_scale * ratio
            start, _ = slices[si]
            if trace is not None:
                trace[f"stage{si:02d}/x"] = x.clone()
            h = tr.forward_stage(x, si, block_mods, tr.stage_rope(si, pos2), cache, start)
            logits = cfg_combine(tr.logits(h, head_mod), t)
            if si == 0:
                logits = logits[:, [-1], :]   # the 1x1 map comes from the last context position
            if trace is not None:
                trace[f"stage{si:02d}/logits"] = logits.clone()
            idx_Bl = self._sample_codes(si, logits, top_k, top_p, token_sampler, generator)
            if trace is not None:
                trace[f"stage{si:02d}/idx"] = idx_Bl.clone()
            if more_smooth:
                h_BlC = gumbel_mix(logits, ratio, codebook.float(), generator)
            else:
                h_BlC = codebook[idx_Bl].float()                              # (B, l, Cvae)
            if not last:
                f_hat, x = next_stage_input(self, si, h_BlC, f_hat, lvl_pos, trace, HartTokenizer.next_scale_input)
                x = x.repeat(2, 1, 1)  # both CFG halves see the same next-scale input
                continue
            # Last scale: discrete codes plus the continuous residual.
            tokens_BLC = last_scale_tokens(
                self, h, h_BlC, idx_Bl, t, seed, residual_diffusion=residual_diffusion,
                diffusion_steps=diffusion_steps, diffusion_temperature=diffusion_temperature,
                residual_latents=residual_latents, trace=trace, diffusion_noise_fn=diffusion_noise_fn,
                sample_fn=sample_residual,
            )
            f_hat = add_last_scale(f_hat, tokens_BLC, trace)
        if trace is not None:
            trace["f_hat_final"] = f_hat.clone()
        return f_hat


def next_stage_input(pipe, si: int, h_BlC, f_hat, lvl_pos, trace, next_scale_input_fn):
    """After stage si (not the last): grow f_hat by its codes and build stage si+1's input.

    h_BlC (B, l, Cvae) are the stage's code embeddings (or Gumbel mixtures);
    returns f_hat and the next input (B, l_next, C) = word_embed(area-down f_hat)
    + level embedding, for one CFG half. next_scale_input_fn is the tokenizer's
    reference glue or the fused one (same contract).
    """
    tr, cfg, dt = pipe.transformer, pipe.config, pipe.dtype
    B, _, Cvae = h_BlC.shape
    pn = cfg.patch_nums[si]
    h_BChw = h_BlC.transpose(1, 2).reshape(B, Cvae, pn, pn)
    f_hat, nxt = next_scale_input_fn(pipe.tokenizer, si, cfg.patch_nums, f_hat, h_BChw.to(dt))
    if trace is not None:
        trace[f"stage{si:02d}/f_hat"] = f_hat.clone()
        trace[f"stage{si:02d}/next_input_latent"] = nxt.clone()
    s_next, e_next = tr.stage_slices()[si + 1]
    x = tr.word_embed(nxt.reshape(B, Cvae, -1).transpose(1, 2).to(dt)) + lvl_pos[:, s_next:e_next]
    return f_hat, x


def add_last_scale(f_hat, tokens_BLC, trace):
    """f_hat + the last scale's tokens laid out as a map (no phi: HART's hybrid last scale)."""
    B, L, Cvae = tokens_BLC.shape
    P = f_hat.shape[-1]
    final = tokens_BLC.transpose(1, 2).reshape(B, Cvae, P, P)
    if trace is not None:
        trace["final_tokens"] = final.clone()
    return f_hat + final


def cfg_doubled_mask_and_positions(prompt_mask, B: int, T: int, device):
    """Mask and position ids of the CFG-doubled batch: (2B, T) bool, (2B, T) int64.

    Position ids are cumsum(mask) - 1; the unconditional half has zero position
    ids and a mask of zeros except position 0 (the official convention).
    """
    mask = (torch.ones(B, T, dtype=torch.bool) if prompt_mask is None else prompt_mask.bool()).to(device)
    pos = torch.cumsum(mask.long(), dim=1) - 1
    pos2 = torch.cat((pos, torch.zeros_like(pos)), dim=0)
    mask2 = torch.cat((mask, torch.zeros_like(mask)), dim=0)
    mask2[B:, 0] = True
    return mask2, pos2


def last_scale_tokens(pipe, h, h_BlC, idx_Bl, t, seed, *, residual_diffusion, diffusion_steps,
                      diffusion_temperature, residual_latents, trace, diffusion_noise_fn, sample_fn):
    """The last scale's tokens (B, L, Cvae): code embeddings plus the diffusion residual.

    h (2B, L, C) is the last transformer pass's hidden state; the residual MLP is
    conditioned on decoder_norm(h + word_embed(codebook[idx])) for both CFG halves
    and guided with the same t as the stage. sample_fn is the reference
    `sample_residual` or the fast one (same contract).
    """
    if not residual_diffusion:
        return h_BlC
    tr, dev = pipe.transformer, pipe.device
    B, L = idx_Bl.shape
    Cvae = h_BlC.shape[-1]
    codebook = pipe.tokenizer.quantize.embedding.weight
    discrete = tr.word_embed(codebook[idx_Bl])
    z = tr.decoder_norm(h + torch.cat([discrete, discrete], dim=0)).reshape(2 * B * L, -1)  # (2BL, C)
    if trace is not None:
        trace["diffusion/z"] = z.clone()
    x_init = None if residual_latents is None else residual_latents.reshape(B * L, Cvae)
    if diffusion_noise_fn is None:
        # Drawn on the CPU so a seed gives the same residual on every device.
        noise_gen = torch.Generator(device="cpu").manual_seed(seed + 1)
        diffusion_noise_fn = lambda shape: torch.randn(*shape, generator=noise_gen).to(dev)  # noqa: E731
    resid = sample_fn(tr.diffloss.net, z, t, pipe.schedule(diffusion_steps), temperature=diffusion_temperature,
                      x_init_NC=x_init, noise_fn=diffusion_noise_fn)
    resid = resid.float().view(B, L, Cvae)
    if trace is not None:
        trace["residual"] = resid.clone()
    return h_BlC + resid


def to_pil(images_B3HW: torch.Tensor):
    from PIL import Image

    # Truncation, as the official sampler saves its PNGs (x*255 then astype(uint8)).
    arr = images_B3HW.detach().float().clamp(0, 1).mul(255).to(torch.uint8)
    arr = arr.permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a, mode="RGB") for a in arr]
