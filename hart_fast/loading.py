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
