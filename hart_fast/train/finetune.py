"""Training on a folder of captioned images, and fine-tuning an official HART folder.

    hart-fast train finetune --init MODEL_DIR --data IMAGES --out NEW_MODEL_DIR [--work RUN]

The data folder follows one of the two common conventions:
- `metadata.jsonl`: one JSON object per line with `file_name` (relative to the
  folder) and `text` (or `caption`);
- `image.png` + `image.txt` side by side (jpg / jpeg / webp too).

Every image must have the model's resolution. Everything is checked before any
training starts, and the output folder is written atomically at the end, so a
bad input leaves nothing behind. Text embeddings come from the same text-encoder
path generation uses (the model's `text_encoder/`, or --text-encoder), with the
same max length and system prompt.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")


class DatasetError(ValueError):
    """A training-data folder that cannot be used; the message names the file."""


def read_caption_folder(folder: str) -> List[Tuple[str, str]]:
    """[(image path, caption)] of a data folder, in a stable order."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise DatasetError(f"training data folder not found: {folder!r}")
    meta = os.path.join(folder, "metadata.jsonl")
    pairs: List[Tuple[str, str]] = []
    if os.path.isfile(meta):
        with open(meta) as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DatasetError(f"{meta}, line {n}: not JSON ({e.msg})") from e
                if not isinstance(row, dict) or "file_name" not in row:
                    raise DatasetError(f"{meta}, line {n}: needs a 'file_name' and a 'text' (or 'caption')")
                text = row.get("text", row.get("caption"))
                if not isinstance(text, str) or not text.strip():
                    raise DatasetError(f"{meta}, line {n}: no caption for {row['file_name']!r} "
                                       f"(a non-empty 'text' or 'caption' is needed)")
                path = os.path.join(folder, row["file_name"])
                if not os.path.isfile(path):
                    raise DatasetError(f"{meta}, line {n}: image {path!r} does not exist")
                pairs.append((path, text.strip()))
    else:
        names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTS))
        for name in names:
            path = os.path.join(folder, name)
            txt = os.path.splitext(path)[0] + ".txt"
            if not os.path.isfile(txt):
                raise DatasetError(f"caption file missing for {path!r}: expected {txt!r} "
                                   f"(or a metadata.jsonl in {folder!r})")
            with open(txt, encoding="utf-8") as f:
                text = f.read().strip()
            if not text:
                raise DatasetError(f"caption file {txt!r} is empty")
            pairs.append((path, text))
    if not pairs:
        raise DatasetError(f"no captioned images in {folder!r}: expected {', '.join(IMAGE_EXTS)} files with "
                           f"a .txt caption each, or a metadata.jsonl")
    return pairs


def load_images(pairs: Sequence[Tuple[str, str]], size: int) -> np.ndarray:
    """(N, size, size, 3) uint8; an unreadable file or one of another size is an error naming it."""
    from PIL import Image, UnidentifiedImageError

    out = np.empty((len(pairs), size, size, 3), dtype=np.uint8)
    for i, (path, _) in enumerate(pairs):
        try:
            with Image.open(path) as im:
                im.load()
                if im.size != (size, size):
                    raise DatasetError(f"{path!r} is {im.size[0]}x{im.size[1]}, but the model makes "
                                       f"{size}x{size} images; resize the data first")
                out[i] = np.asarray(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as e:
            raise DatasetError(f"cannot read image {path!r}: {e}") from e
    return out


def image_size(tok_cfg) -> int:
    """The pixel size of the tokenizer's images: last scale x the decoder's upsampling."""
    return tok_cfg.v_patch_nums[-1] * 2 ** (len(tok_cfg.ch_mult) - 1)


@torch.no_grad()
def encode_dataset(tok, images_u8, patch_nums, batch: int = 64, progress: bool = True
                   ) -> Dict[str, torch.Tensor]:
    """Codes, teacher-forcing inputs and last-scale rests of every image (CPU tensors).

    images_u8: uint8 (N, H, W, 3), an array or anything sliced into one, e.g. scenes
    rendered on the tokenizer's device chunk by chunk (the demo recipe)."""
    from tqdm.auto import tqdm

    from hart_fast.train.scenes import to_tensor_pm1
    from hart_fast.train.transformer import encode_images

    parts: Dict[str, List[torch.Tensor]] = {}
    for i in tqdm(range(0, len(images_u8), batch), desc="encode", disable=not progress):
        enc = encode_images(tok, to_tensor_pm1(images_u8[i:i + batch]), patch_nums)
        for k, v in enc.items():
            parts.setdefault(k, []).append(v.cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def encode_captions_of(data: Dict[str, torch.Tensor], captions: Sequence[str], encoder):
    """(data with a `caption` index per image, embeds (U, T, D), masks (U, T)): every
    distinct caption through the text encoder once."""
    from hart_fast.train.transformer import encode_captions

    uniq = sorted(set(captions))
    where = {c: i for i, c in enumerate(uniq)}
    embeds, masks = encode_captions(encoder, uniq)
    return dict(data, caption=torch.tensor([where[c] for c in captions])), embeds, masks


def train_transformer(tr, tok, data: Dict[str, torch.Tensor], captions: Sequence[str], encoder, run_dir: str, *,
                      steps, batch: int, lr: float, seed: int, cond_drop: float = 0.1, warmup: int = 100,
                      device="cpu", autocast_dtype=None, progress: bool = True):
    """Train tr (the AR transformer and its residual MLP) on encoded images with captions.

    steps: a count, or a function (modules, step_fn) -> count (the recipe plans it by
    timing the step function)."""
    from hart_fast.train.common import train_loop
    from hart_fast.train.transformer import TransformerStep

    data, embeds, masks = encode_captions_of(data, captions, encoder)
    tr.to(device)
    step = TransformerStep(tr, tok.quantize.embedding.weight.detach(), data, embeds, masks, batch, seed,
                           cond_drop=cond_drop, device=device, autocast_dtype=autocast_dtype)
    if callable(steps):  # planned from this step function (the recipe's time budget)
        steps = steps({"transformer": tr}, step)
    return train_loop(run_dir=run_dir, modules={"transformer": tr}, step_fn=step, steps=steps, lr=lr,
                      warmup=min(warmup, max(1, steps // 10)), seed=seed, desc="transformer", ckpt_every=100,
                      log_every=10, progress=progress, fp16=autocast_dtype == torch.float16)


def train_residual(tr, tok, data: Dict[str, torch.Tensor], captions: Sequence[str], encoder, run_dir: str, *,
                   steps: int, batch: int, lr: float, seed: int, guidance_max: float = 5.0, guided_weight: float = 1.0,
                   warmup: int = 20, device="cpu", autocast_dtype=None, progress: bool = True):
    """Train tr's residual MLP alone (the transformer frozen) on encoded images with
    captions, under both classifier-free-guidance conditions and their guided
    combination (`hart_fast.train.transformer.ResidualStep`)."""
    from hart_fast.train.common import train_loop
    from hart_fast.train.transformer import ResidualStep

    data, embeds, masks = encode_captions_of(data, captions, encoder)
    tr.to(device)
    # Only the MLP is handed to the optimizer; ResidualStep runs the transformer under no_grad.
    step = ResidualStep(tr, tok.quantize.embedding.weight.detach(), data, embeds, masks, batch, seed,
                        guidance_max=guidance_max, guided_weight=guided_weight, device=device,
                        autocast_dtype=autocast_dtype)
    return train_loop(run_dir=run_dir, modules={"diffusion": tr.diffloss.net}, step_fn=step, steps=steps, lr=lr,
                      warmup=min(warmup, max(1, steps // 10)), seed=seed, desc="residual", ckpt_every=100,
                      log_every=10, progress=progress, fp16=autocast_dtype == torch.float16)


def finetune(init_dir: str, data_dir: str, out_dir: str, *, work_dir: Optional[str] = None, steps: int = 500,
             batch: int = 16, lr: float = 2e-4, seed: int = 0, text_encoder: Optional[str] = None,
             device: str = "cpu", autocast_dtype=None, store_dtype=torch.float32, progress: bool = True) -> str:
    """Fine-tune the transformer (and residual MLP) of `init_dir` on a captioned image folder;
    write the result to `out_dir` in the official layout. Returns out_dir."""
    from hart_fast.config import TokenizerConfig
    from hart_fast.loading import load_models
    from hart_fast.text_encoder import as_text_encoder
    from hart_fast.train.export import read_configs, save_model_folder

    if os.path.abspath(out_dir) == os.path.abspath(init_dir):
        raise ValueError(f"--out {out_dir!r} is the --init folder; write the fine-tuned model elsewhere")
    tr, tok, info = load_models(init_dir)
    llm_cfg, tok_cfg = read_configs(init_dir)
    if not tok.has_encoder:
        raise DatasetError(f"{info.tokenizer_dir}: the tokenizer has no encoder weights (a decode-only folder), "
                           f"so it cannot encode training images; fine-tune from a folder with the full autoencoder")
    size = image_size(TokenizerConfig.from_dict(dict(tok_cfg)))
    pairs = read_caption_folder(data_dir)
    images = load_images(pairs, size)
    te_path = text_encoder or os.path.join(init_dir, "text_encoder")
    if not os.path.isdir(te_path):
        raise FileNotFoundError(f"no text encoder for {init_dir!r}: pass --text-encoder (the Qwen2 folder "
                                f"generation uses with this model)")
    encoder = as_text_encoder(te_path, max_length=tr.cfg.context_token)
    if getattr(encoder, "hidden_size", tr.cfg.context_dim) != tr.cfg.context_dim:
        raise ValueError(f"text encoder {te_path!r} has hidden size {encoder.hidden_size}, but {init_dir!r} "
                         f"expects context_dim {tr.cfg.context_dim}: they are of different architectures")
    work_dir = work_dir or os.path.join(os.path.dirname(os.path.abspath(out_dir)),
                                        f".{os.path.basename(os.path.abspath(out_dir))}-run")
    data = encode_dataset(tok, images, tr.cfg.patch_nums, progress=progress)
    train_transformer(tr, tok, data, [c for _, c in pairs], encoder, os.path.join(work_dir, "transformer"),
                      steps=steps, batch=batch, lr=lr, seed=seed, device=device, autocast_dtype=autocast_dtype,
                      progress=progress)
    te_copy = te_path if os.path.abspath(te_path) == os.path.abspath(os.path.join(init_dir, "text_encoder")) else None
    return save_model_folder(out_dir, tr.cpu().float(), tok, llm_cfg, tok_cfg, store_dtype=store_dtype,
                             text_encoder_dir=te_copy)


__all__ = ["DatasetError", "read_caption_folder", "load_images", "image_size", "encode_dataset",
           "encode_captions_of", "train_transformer", "train_residual", "finetune", "IMAGE_EXTS"]
