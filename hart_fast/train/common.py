"""What every training run shares: seeding per step, the LR schedule, atomic
checkpoints with resume, a loss log and a progress bar.

A run is a folder: `checkpoint.pt` (model(s), optimizer, step; written to a
temporary file and renamed, so a kill never leaves half a checkpoint) and
`loss_log.jsonl` (one line per logged step). Rerunning with the same folder
resumes from the checkpoint; every step draws its batch and its randomness
from (seed, step), so a resumed run continues the same sequence of batches.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from typing import Callable, Dict, Optional

import torch

CHECKPOINT = "checkpoint.pt"
LOSS_LOG = "loss_log.jsonl"


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """A well-mixed 63-bit seed for (run seed, step, stream)."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(step) * 0xBF58476D1CE4E5B9 + int(stream) * 0x94D049BB133111EB)
    x ^= x >> 31
    return x % 2**63


def lr_at(step: int, total: int, peak: float, warmup: int, final_frac: float = 0.1) -> float:
    """Linear warmup then cosine decay to final_frac * peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def _atomic_write(path: str, suffix: str, write: Callable[[str], None]) -> None:
    """write(tmp) into a temporary file in path's folder, then rename it over `path`."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=d)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp's owner-only mode is not what a saved file should have
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file in the same folder, then rename over `path`."""
    _atomic_write(path, ".pt", lambda tmp: torch.save(obj, tmp))


def atomic_write_json(obj, path: str) -> None:
    """json.dump to a temporary file in the same folder, then rename over `path`."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)

    _atomic_write(path, ".json", write)


def seconds_per_step(modules: Dict[str, torch.nn.Module], step_fn: Callable[[int], Dict[str, torch.Tensor]],
                     steps: int = 10, warmup: int = 3) -> float:
    """Wall seconds of one training step (forward, backward, AdamW update) of step_fn,
    timed over `steps` after `warmup` throwaway ones; the modules' weights and the
    step_fn's state are put back afterwards, so a run that follows is unaffected."""
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    saved = {k: {n: t.detach().clone() for n, t in m.state_dict().items()} for k, m in modules.items()}
    saved_step = step_fn.state_dict() if hasattr(step_fn, "state_dict") else None
    dev = params[0].device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    opt = torch.optim.AdamW(params, lr=1e-5)
    for m in modules.values():
        m.train()
    try:
        for i in range(warmup + steps):
            if i == warmup:
                sync()
                t0 = time.perf_counter()
            loss = step_fn(i)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync()
        return (time.perf_counter() - t0) / steps
    finally:
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for k, m in modules.items():
                m.load_state_dict(saved[k])
        if saved_step is not None:
            step_fn.load_state_dict(saved_step)


def autocast_context(device: str, dtype: Optional[torch.dtype]):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def train_loop(*, run_dir: str, modules: Dict[str, torch.nn.Module], step_fn: Callable[[int], Dict[str, torch.Tensor]],
               steps: int, lr: float, warmup: int, seed: int, desc: str, ckpt_every: int = 100,
               log_every: int = 10, weight_decay: float = 0.0, grad_clip: float = 1.0,
               progress: bool = True, fp16: bool = False,
               on_step: Optional[Callable[[int, Dict[str, float]], None]] = None) -> Dict[str, float]:
    """Train `modules` (all their trainable parameters) for `steps` steps, resumably.

    step_fn(step) returns a dict of scalar tensors; its 'loss' is minimised, the
    rest are logged; fp16=True (float16 autocast) scales the loss against
    gradient underflow (torch.amp.GradScaler); a step_fn with state (state_dict / load_state_dict) has it
    checkpointed too. Returns the last logged losses.
    """
    from tqdm.auto import tqdm

    os.makedirs(run_dir, exist_ok=True)
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{desc}: nothing to train (no parameter requires grad)")
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    dev_type = params[0].device.type
    scaler = torch.amp.GradScaler(dev_type, enabled=fp16)
    ckpt_path = os.path.join(run_dir, CHECKPOINT)
    start = 0
    if os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ck.get("desc") != desc or sorted(ck["modules"]) != sorted(modules):
            raise ValueError(f"{ckpt_path} is a checkpoint of another run ({ck.get('desc')!r}); "
                             f"use another folder or remove it")
        try:
            for name, m in modules.items():
                m.load_state_dict(ck["modules"][name])
            opt.load_state_dict(ck["optimizer"])
            if hasattr(step_fn, "load_state_dict") and "step_state" in ck:
                step_fn.load_state_dict(ck["step_state"])
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"{ckpt_path} holds a model of another architecture than this run's; use another "
                             f"folder or remove it ({str(e).splitlines()[0]})") from e
        start = int(ck["step"])
    log_path = os.path.join(run_dir, LOSS_LOG)
    if start == 0 and os.path.exists(log_path):
        os.unlink(log_path)  # a fresh run: an old log would interleave
    elif start > 0 and os.path.exists(log_path):
        # Drop log lines past the checkpoint (written after it, before a kill).
        with open(log_path) as f:
            keep = [ln for ln in f if ln.strip() and json.loads(ln)["step"] < start]
        with open(log_path, "w") as f:
            f.writelines(keep)

    def save(step):
        atomic_save({"desc": desc, "step": step, "modules": {n: m.state_dict() for n, m in modules.items()},
                     "optimizer": opt.state_dict(),
                     "step_state": step_fn.state_dict() if hasattr(step_fn, "state_dict") else None}, ckpt_path)

    last: Dict[str, float] = {}
    for m in modules.values():
        m.train()
    bar = tqdm(range(start, steps), desc=desc, initial=start, total=steps, disable=not progress, dynamic_ncols=True)
    t0 = time.time()
    # Losses add up where they are computed and reach the host only at log and
    # checkpoint steps: a float() per step would make a GPU wait for every step.
    acc: Dict[str, torch.Tensor] = {}
    n_acc, window_start = 0, start
    for step in bar:
        torch.manual_seed(step_seed(seed, step, 1))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup)
        losses = step_fn(step)
        opt.zero_grad(set_to_none=True)
        scaler.scale(losses["loss"]).backward()
        if grad_clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        scaler.step(opt)
        scaler.update()
        for k, v in losses.items():
            v = v.detach().float()
            acc[k] = acc[k] + v if k in acc else v
        n_acc += 1
        log_now = (step + 1) % log_every == 0 or step + 1 == steps
        save_now = (step + 1) % ckpt_every == 0 or step + 1 == steps
        if log_now or save_now:
            vals = {k: float(v) / n_acc for k, v in acc.items()}
            if not math.isfinite(vals["loss"]):
                raise FloatingPointError(
                    f"{desc}: the loss is {vals['loss']} in steps {window_start}..{step}; lower the learning rate "
                    f"(the last checkpoint is step {(window_start // ckpt_every) * ckpt_every})")
        if log_now:
            last = vals
            acc, n_acc, window_start = {}, 0, step + 1
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": step, "lr": lr_at(step, steps, lr, warmup),
                                    "elapsed_s": round(time.time() - t0, 2), **last}) + "\n")
            bar.set_postfix({k: f"{v:.4g}" for k, v in last.items()})
            if on_step is not None:
                on_step(step, last)
        if save_now:
            save(step + 1)
    bar.close()
    for m in modules.values():
        m.eval()
    return last


def read_loss_log(run_dir: str):
    path = os.path.join(run_dir, LOSS_LOG)
    with open(path) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


__all__ = ["step_seed", "lr_at", "atomic_save", "atomic_write_json", "seconds_per_step", "autocast_context", "train_loop", "read_loss_log",
           "CHECKPOINT", "LOSS_LOG"]
