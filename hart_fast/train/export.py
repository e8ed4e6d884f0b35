"""Writing trained modules as an official-layout HART folder, atomically.

`root/llm/{config.json, model.safetensors}` and `root/tokenizer/{config.json,
model.safetensors}` (weights under `vae.`, with the discriminator key and the
EMA statistic the official files carry), plus `text_encoder/` when given. The
folder is assembled next to `root` and renamed into place, so a reader never
sees half a model and an old folder at `root` stays intact until the new one is
complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Optional

import torch

from hart_fast.demo import llm_state_dict, tokenizer_state_dict


def _cast(sd, dtype):
    return {k: (v.to(dtype) if v.is_floating_point() and v.isfinite().all() else v) for k, v in sd.items()}


def save_model_folder(root: str, transformer, tokenizer, llm_config: dict, tokenizer_config: dict, *,
                      store_dtype: torch.dtype = torch.float32, text_encoder_dir: Optional[str] = None,
                      readme: Optional[str] = None) -> str:
    """Write an official-layout folder at `root` (replacing one that is there); returns root."""
    from safetensors.torch import save_file

    root = os.path.abspath(root)
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}-", dir=parent)
    try:
        llm_d = {**llm_config, "model_type": "hart_transformer_t2i", "architectures": ["HARTForT2I"]}
        tok_d = {**tokenizer_config, "model_type": "hart_autoencoder_with_disc",
                 "architectures": ["HARTAutoEncoderWithDisc"]}
        for sub, d, sd in (("llm", llm_d, llm_state_dict(transformer)),
                           ("tokenizer", tok_d, tokenizer_state_dict(tokenizer))):
            os.makedirs(os.path.join(tmp, sub))
            with open(os.path.join(tmp, sub, "config.json"), "w") as f:
                json.dump(d, f, indent=2, sort_keys=True)
            save_file(_cast({k: v.cpu() for k, v in sd.items()}, store_dtype),
                      os.path.join(tmp, sub, "model.safetensors"))
        if text_encoder_dir is not None:
            shutil.copytree(text_encoder_dir, os.path.join(tmp, "text_encoder"))
        if readme is not None:
            with open(os.path.join(tmp, "README.md"), "w") as f:
                f.write(readme)
        # mkdtemp / safetensors leave owner-only modes; a model folder is for everyone to read.
        for d, _, files in os.walk(tmp):
            os.chmod(d, 0o755)
            for f in files:
                os.chmod(os.path.join(d, f), 0o644)
        old = None
        if os.path.exists(root):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}-old-", dir=parent)
            os.rmdir(old)
            os.replace(root, old)
        os.replace(tmp, root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def read_configs(model_dir: str):
    """(llm config dict, tokenizer config dict) of a folder, as stored (for writing back)."""
    from hart_fast.loading import resolve_folders, tokenizer_folder

    llm_dir, _ = resolve_folders(model_dir)
    with open(os.path.join(llm_dir, "config.json")) as f:
        llm = json.load(f)
    with open(os.path.join(tokenizer_folder(llm_dir, llm.get("vae_path")), "config.json")) as f:
        tok = json.load(f)
    return llm, tok


__all__ = ["save_model_folder", "read_configs"]
