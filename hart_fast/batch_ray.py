"""The Ray runner of `hart-fast batch`: the run's batches on a pool of Ray actors.

Ray Data maps the batches (formed by the driver, hart_fast.batch) over an actor
pool (`ActorPoolStrategy`): one actor per GPU (`num_gpus=1`), or `workers` CPU
actors on a machine without GPUs; each actor loads the model once
(hart_fast.batch.Generator) and writes its PNGs; the driver alone appends the
manifest, as results arrive.  An actor that dies is restarted and its batch
retried by Ray; since a batch's manifest lines are written only once its result
reaches the driver, a batch redone is never recorded twice.

CPU actors run torch with one thread each (results then do not depend on how
many actors share the machine); use as many workers as cores.  Ray is optional
(`pip install ".[ray]"`): hart_fast.batch runs in-process and says so without it.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Callable, Iterator, List, Optional, Sequence

import numpy as np


def ray_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None and importlib.util.find_spec("ray.data") is not None


def _connect(address: str) -> None:
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # Ray 2.60 writes a token file otherwise
    if ray.is_initialized():
        return
    if address == "auto":
        try:
            ray.init(address="auto", log_to_driver=False)
            return
        except ConnectionError:
            pass
        # No cluster running: start a local one.  More logical CPUs than cores so the
        # data tasks never starve behind the actors (seen hanging on 2 cores).
        ray.init(num_cpus=max(4, 2 * (os.cpu_count() or 1)), log_to_driver=False, include_dashboard=False)
    else:
        ray.init(address=address, log_to_driver=False)


class _Actor:
    """One model per actor; called with a batch of serialized WorkItem lists."""

    def __init__(self, make_generator: Callable, cpu_threads: Optional[int]):
        import torch

        from hart_fast.cpu_memory import keep_freed_memory

        if cpu_threads:
            torch.set_num_threads(cpu_threads)
        keep_freed_memory()  # a worker process of ours (hart_fast.cpu_memory)
        self.gen = make_generator()

    def __call__(self, batch):
        from hart_fast.batch import WorkItem

        out = []
        for payload in batch["items"]:
            items = [WorkItem(d["index"], d["prompt"], d["seed"], tuple(tuple(p) for p in d["settings"]))
                     for d in json.loads(payload)]
            out.append(json.dumps(self.gen(items)))
        return {"records": np.array(out, dtype=object)}


def run_on_ray(batches: Sequence[Sequence], *, address: str, workers: Optional[int],
               make_generator: Callable) -> Iterator[List[dict]]:
    """Yield the manifest records of each batch as its result arrives (any order)."""
    import ray
    import ray.data

    _connect(address)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver has its own bar
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    size = workers or (gpus if gpus else 2)
    if size < 1:
        raise ValueError(f"workers must be >= 1, got {size}")
    if not batches:
        return
    payloads = [{"items": json.dumps([{"index": it.index, "prompt": it.prompt, "seed": it.seed,
                                       "settings": [list(p) for p in it.settings]} for it in b])} for b in batches]
    ds = ray.data.from_items(payloads, override_num_blocks=len(payloads))
    remote = dict(num_gpus=1) if gpus else dict(num_cpus=0.5)
    ds = ds.map_batches(
        _Actor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=min(size, len(payloads))),
        fn_constructor_kwargs={"make_generator": make_generator, "cpu_threads": None if gpus else 1},
        max_restarts=-1, max_task_retries=-1, **remote,
        # The driver's hart_fast settings (e.g. HART_FAST_ATTENTION) hold on every worker.
        runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith("HART_FAST_")}},
    )
    for row in ds.iter_rows():
        yield json.loads(row["records"])


__all__ = ["ray_available", "run_on_ray"]
