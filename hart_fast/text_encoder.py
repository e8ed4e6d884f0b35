"""Text conditioning: prompts -> (prompt_embeds (B, T, D) float32, prompt_mask (B, T) bool).

The official HART conditions on the last hidden state of a Qwen2 LLM
(Qwen2-VL-1.5B-Instruct's language model). Tokenisation, padding, mask and the
optional system prompt follow the official `encode_prompts`:

- every prompt is tokenised on its own to exactly `max_length` tokens
  (padding "max_length", truncation on), so the mask is `ids != pad_token_id`;
- with the system prompt on, its tokens (truncated to `max_length`) are put in
  front of every prompt with an all-ones mask for the encoder pass only, and only
  the prompt positions of the last hidden state are kept;
- the hidden states are returned in float32.

The system prompt is the same for every prompt and, the pass being causal, its
keys and values do not depend on what follows it: they are computed once per
encoder (device, dtype) and every call runs only the prompt tokens on top of
that cache (`cache_system_prompt`, on by default; the same arithmetic as the
official concatenated pass, tested against it). `offload=True` keeps the LLM's
weights on the CPU between calls and moves them to the compute device for each
one, so the AR loop and the decode run without them (for small GPUs).

Any callable `prompts -> embeds` or `prompts -> (embeds, mask)` may stand in for
the Qwen2 encoder; see `as_text_encoder`.
"""

from __future__ import annotations

import copy
import inspect
import os
import warnings
from typing import Callable, Optional, Sequence, Tuple, Union

import torch

# The official model's fixed system prompt (hart/utils/constants.py). It is an input
# of the trained model, so it must stay byte-identical; note the literal backslash-n
# at the end, which the official source also has.
LLM_SYSTEM_PROMPT = (
    'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions '
    "suitable for image generation.\n"
    "\n"
    "Examples:\n"
    "- User Prompt: A cat sleeping -> A small, fluffy white cat curled up in a round shape, sleeping "
    "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.\n"
    "- User Prompt: A busy city street -> A bustling city street scene at dusk, featuring glowing street "
    "lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering "
    "glass skyscrapers.\n"
    "\n"
    "Please generate only the enhanced description for the prompt below and DO NOT include any additional "
    'sentences. Start your response with "Enhanced Prompt:".\n'
    "\n"
    "User Prompt:\\n"
)

Encoded = Tuple[torch.Tensor, torch.Tensor]


def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "the Qwen2 text encoder needs the 'transformers' package (a dependency of hart-fast): pip install transformers "
            "(or pass precomputed prompt_embeds / your own text_encoder callable)"
        ) from e


class QwenTextEncoder:
    """A Qwen2 LLM used as HART's text encoder, loaded from a local folder only."""

    def __init__(self, model, tokenizer, max_length: int = 300, use_system_prompt: bool = True,
                 system_prompt: str = LLM_SYSTEM_PROMPT, name: str = "qwen2", cache_system_prompt: bool = True,
                 offload: bool = False):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.use_system_prompt = use_system_prompt
        self.system_prompt = system_prompt
        self.name = name
        self.cache_system_prompt = bool(cache_system_prompt)
        self._prefix = None  # ((device, dtype), system-prompt length, its key/value cache)
        # Transformers 5 renamed the forward's past_key_values argument (and output) to cache.
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.offload = bool(offload)
        self.compute_device = next(model.parameters()).device
        if self.offload:
            # One host copy of every weight, pinned when there is a GPU to copy to: a call
            # copies them in, and afterwards the module points back at the host copies
            # (nothing to copy out; the weights never change).
            pin = torch.cuda.is_available()
            self._host = [t.detach().cpu().pin_memory() if pin else t.detach().cpu() for t in self._tensors()]
            self._weights_to(torch.device("cpu"))
        if tokenizer.pad_token_id is None:
            raise ValueError(f"text encoder tokenizer at {name!r} has no pad token; HART masks padding by pad id")

    @classmethod
    def from_pretrained(cls, path: str, device="cpu", dtype=torch.float32, max_length: int = 300,
                        use_system_prompt: bool = True, cache_system_prompt: bool = True,
                        offload: bool = False) -> "QwenTextEncoder":
        _require_transformers()
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"text encoder folder not found: {path!r}. Pass the path of a local copy of "
                "Qwen2-VL-1.5B-Instruct (or any Qwen2 LLM folder with config.json, tokenizer and weights); "
                "hart_fast never downloads"
            )
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModel.from_pretrained(path, local_files_only=True, dtype=dtype)
        except OSError as e:
            raise FileNotFoundError(f"cannot load a text encoder from {path!r}: {e}") from e
        # Qwen2-VL folders hold the language model inside a VL wrapper; HART uses the LLM.
        if hasattr(model, "language_model") and not hasattr(model, "embed_tokens"):
            model = model.language_model
        return cls(model.to(device), tokenizer, max_length, use_system_prompt, name=path,
                   cache_system_prompt=cache_system_prompt, offload=offload)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        """Where the encoder computes (with offload, where its weights go for a call)."""
        return self.compute_device

    def _system_cache(self, dev: torch.device):
        """(length, key/value cache at batch 1) of the system prompt, made once per device and dtype."""
        key = (str(dev), next(self.model.parameters()).dtype)
        if self._prefix is None or self._prefix[0] != key:
            sys_ids = self._tokenize([self.system_prompt], "longest").to(dev)
            out = self.model(sys_ids, use_cache=True)
            cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
            self._prefix = (key, sys_ids.shape[1], cache)
        return self._prefix[1], self._prefix[2]

    def _tokenize(self, texts: Sequence[str], pad: str) -> torch.Tensor:
        rows = [
            self.tokenizer(t, return_tensors="pt", padding=pad, max_length=self.max_length, truncation=True)
            .input_ids[0]
            for t in texts
        ]
        return torch.stack(rows) if pad == "max_length" else rows[0].unsqueeze(0)

    def truncation_note(self, prompt: str) -> Optional[str]:
        """What warn_truncation says of one prompt, or None when it fits."""
        n = len(self.tokenizer(prompt, truncation=False).input_ids)
        if n <= self.max_length:
            return None
        return f"the prompt is {n} tokens long; the model reads {self.max_length}, so it is truncated"

    def warn_truncation(self, prompts: Sequence[str]) -> None:
        for i, p in enumerate(prompts):
            n = len(self.tokenizer(p, truncation=False).input_ids)
            if n > self.max_length:
                warnings.warn(
                    f"prompt {i} is {n} tokens long; the model reads {self.max_length}, so it is truncated "
                    f"(as the official tokenizer call does): {p[:60]!r}...",
                    stacklevel=3,
                )

    @torch.inference_mode()
    def __call__(self, prompts: Sequence[str]) -> Encoded:
        self.warn_truncation(prompts)
        if not self.offload:
            return self._encode(prompts)
        self._weights_to(self.compute_device)
        try:
            return self._encode(prompts)
        finally:
            self._weights_to(torch.device("cpu"))
            if self.compute_device.type == "cuda":
                torch.cuda.empty_cache()  # give the weights' blocks back for the AR loop and the decode

    def _tensors(self):
        return list(self.model.parameters()) + list(self.model.buffers())

    def _weights_to(self, dev: torch.device) -> None:
        for t, host in zip(self._tensors(), self._host):
            t.data = host if dev.type == "cpu" else host.to(dev, non_blocking=True)

    def _encode(self, prompts: Sequence[str]) -> Encoded:
        dev = self.compute_device
        ids = self._tokenize(prompts, "max_length").to(dev)               # (B, T)
        mask = ids != self.tokenizer.pad_token_id
        if not self.use_system_prompt:
            hidden = self.model(ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        elif self.cache_system_prompt:
            n_sys, prefix = self._system_cache(dev)
            cache = copy.deepcopy(prefix)  # the call extends its cache; the prefix stays
            cache.batch_repeat_interleave(ids.shape[0])
            sys_mask = torch.ones(ids.shape[0], n_sys, dtype=torch.bool, device=dev)
            out = self.model(ids, attention_mask=torch.cat([sys_mask, mask], 1), use_cache=True,
                             output_hidden_states=True, **{self._cache_arg: cache})
            hidden = out.hidden_states[-1]
        else:
            sys_ids = self._tokenize([self.system_prompt], "longest").to(dev).repeat(ids.shape[0], 1)
            sys_mask = torch.ones_like(sys_ids, dtype=torch.bool)
            out = self.model(torch.cat([sys_ids, ids], 1), attention_mask=torch.cat([sys_mask, mask], 1),
                             output_hidden_states=True)
            hidden = out.hidden_states[-1][:, sys_ids.shape[1]:]
        return hidden.float(), mask


class CallableTextEncoder:
    """Wraps a user callable: prompts -> embeds or (embeds, mask)."""

    def __init__(self, fn: Callable, name: Optional[str] = None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", type(fn).__name__)

    def __call__(self, prompts: Sequence[str]) -> Encoded:
        out = self.fn(list(prompts))
        if isinstance(out, tuple):
            if len(out) != 2:
                raise ValueError(f"text encoder {self.name!r} must return embeds or (embeds, mask), got {len(out)} values")
            embeds, mask = out
        else:
            embeds, mask = out, None
        if not isinstance(embeds, torch.Tensor) or embeds.dim() != 3:
            raise ValueError(
                f"text encoder {self.name!r} must return a (B, T, D) tensor, got "
                f"{getattr(embeds, 'shape', type(embeds).__name__)}"
            )
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
        return embeds.float(), mask.bool()


def as_text_encoder(encoder: Union[str, os.PathLike, Callable, None], device="cpu", dtype=torch.float32,
                    max_length: int = 300, use_system_prompt: bool = True, offload: bool = False):
    """A path (Qwen2 folder), a QwenTextEncoder, or any callable -> an encoder object."""
    if encoder is None:
        return None
    if isinstance(encoder, (str, os.PathLike)):
        return QwenTextEncoder.from_pretrained(encoder, device=device, dtype=dtype, max_length=max_length,
                                               use_system_prompt=use_system_prompt, offload=offload)
    if isinstance(encoder, (QwenTextEncoder, CallableTextEncoder)):
        return encoder
    if callable(encoder):
        return CallableTextEncoder(encoder)
    raise TypeError(f"text_encoder must be a folder path or a callable, got {type(encoder).__name__}")


__all__ = ["LLM_SYSTEM_PROMPT", "QwenTextEncoder", "CallableTextEncoder", "as_text_encoder"]
