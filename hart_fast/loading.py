"""Reading the official HART folders: weights files and strict state-dict loading.

A model folder holds `llm/` (transformer + diffusion MLP, optional
`ema_model.bin`) and `tokenizer/` (the autoencoder, keys under `vae.`, the
discriminator under `disc.`). Weights come as `model.safetensors` (memory-mapped),
`pytorch_model.bin` (memory-mapped where the file format allows) or sharded
with an `*.index.json`. Every mismatch is an error that names the key and file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Tuple

import torch
import torch.nn as nn

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class CheckpointError(ValueError):
    """A weights file that is missing, unreadable or does not match the config."""


def _load_single(path: str) -> Dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise CheckpointError(f"weights file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            # safetensors maps the file; tensors are views until copied into the model.
            return load_file(path, device="cpu")
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            # Legacy (non-zip) torch files cannot be memory-mapped.
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:  # truncated zip, bad header, pickle refusal, ...
        raise CheckpointError(f"cannot read weights file {path}: {type(e).__name__}: {e}") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return sd


def read_weights(folder: str) -> Tuple[Dict[str, torch.Tensor], str]:
    """The state dict of a folder and the file it came from (for error messages)."""
    for name in WEIGHT_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if not name.endswith(".index.json"):
            return _load_single(path), path
        try:
            with open(path, "r", encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except Exception as e:
            raise CheckpointError(f"cannot read shard index {path}: {type(e).__name__}: {e}") from e
        sd: Dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            part = _load_single(os.path.join(folder, shard))
            for key, value in part.items():
                if weight_map.get(key) != shard:
                    raise CheckpointError(
                        f"key '{key}' is in shard {shard} but the index {path} does not place it there"
                    )
                sd[key] = value
        missing = sorted(set(weight_map) - set(sd))
        if missing:
            raise CheckpointError(f"keys listed in {path} are missing from their shards: {missing[:5]}")
        return sd, path
    raise CheckpointError(
        f"no weights found in {folder}: expected one of {', '.join(WEIGHT_FILES)}"
    )


def load_strict(
    module: nn.Module,
    state: Dict[str, torch.Tensor],
    source: str,
    ignored: Iterable[str] = (),
    optional: Iterable[str] = (),
) -> None:
    """Copy `state` into `module`, refusing missing/unexpected keys and shape mismatches.

    `ignored`: file keys that are accepted and not used (training buffers).
    `optional`: module keys that may be absent from the file (derivable buffers),
    which then keep their constructed value.
    """
    ignored, optional = set(ignored), set(optional)
    expected = module.state_dict()
    unexpected = sorted(k for k in state if k not in expected and k not in ignored)
    if unexpected:
        raise CheckpointError(
            f"unexpected key '{unexpected[0]}' in {source} ({len(unexpected)} unexpected in all); "
            "the config does not describe these weights"
        )
    missing = sorted(k for k in expected if k not in state and k not in optional)
    if missing:
        raise CheckpointError(
            f"missing key '{missing[0]}' in {source} ({len(missing)} missing in all)"
        )
    for key, target in expected.items():
        if key not in state:
            continue
        src = state[key]
        if tuple(src.shape) != tuple(target.shape):
            raise CheckpointError(
                f"shape mismatch for '{key}' in {source}: file has {tuple(src.shape)}, "
                f"the config implies {tuple(target.shape)}"
            )
        if src.dtype.is_floating_point != target.dtype.is_floating_point:
            raise CheckpointError(f"dtype mismatch for '{key}' in {source}: file has {src.dtype}, expected {target.dtype}")
    with torch.no_grad():
        params = dict(module.named_parameters())
        buffers = dict(module.named_buffers())
        for key in expected:
            if key not in state:
                continue
            dst = params.get(key, buffers.get(key))
            dst.copy_(state[key])


def resolve_folders(model_dir: str) -> Tuple[str, Optional[str]]:
    """(llm_dir, tokenizer_dir or None when config.vae_path must decide)."""
    if model_dir is None:
        raise ValueError("model_dir is None: pass the path of a HART model folder (holding llm/ and tokenizer/)")
    model_dir = os.fspath(model_dir)
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(
            f"HART model folder not found: {model_dir!r}. Pass the path of a local folder "
            "holding llm/ and tokenizer/ (for example a copy of mit-han-lab/hart-0.7b-1024px); "
            "hart_fast never downloads weights"
        )
    if os.path.isfile(os.path.join(model_dir, "llm", "config.json")):
        return os.path.join(model_dir, "llm"), None
    if os.path.isfile(os.path.join(model_dir, "config.json")):
        with open(os.path.join(model_dir, "config.json"), "r", encoding="utf-8") as f:
            try:
                mt = json.load(f).get("model_type")
            except Exception:
                mt = None
        if mt == "hart_transformer_t2i":
            return model_dir, None
    raise FileNotFoundError(
        f"{model_dir!r} is not a HART model folder: expected {os.path.join(model_dir, 'llm', 'config.json')} "
        f"and {os.path.join(model_dir, 'tokenizer', 'config.json')}"
    )


def tokenizer_folder(llm_dir: str, vae_path) -> str:
    """The official rule: vae_path null means the sibling folder `tokenizer/`."""
    if vae_path is None:
        path = os.path.join(os.path.dirname(os.path.abspath(llm_dir)), "tokenizer")
    else:
        path = vae_path if os.path.isabs(vae_path) else os.path.join(os.path.dirname(os.path.abspath(llm_dir)), vae_path)
        if not os.path.isdir(path) and os.path.isdir(vae_path):
            path = vae_path
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"tokenizer folder not found: {path!r} (from vae_path={vae_path!r} in "
            f"{os.path.join(llm_dir, 'config.json')}); it must be a local folder with config.json "
            "and weights, hart_fast never downloads"
        )
    return path


@dataclass
class ModelInfo:
    model_dir: str
    llm_dir: str
    tokenizer_dir: str
    weights_file: str
    used_ema: bool


def load_models(model_dir: str, use_ema: Optional[bool] = None):
    """Build and strictly load (transformer, tokenizer, ModelInfo) on CPU in float32."""
    from hart_fast.config import TokenizerConfig, TransformerConfig
    from hart_fast.model.tokenizer import HartTokenizer
    from hart_fast.model.transformer import HartTransformer

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
