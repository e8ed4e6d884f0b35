"""`hart-fast serve`: an HTTP image API with dynamic batching (FastAPI + uvicorn).

    POST /v1/images/generations   {"prompt": "...", "n": 1, "seed": 0, "guidance_scale": 4.5,
                                   "speed": "exact" | "balanced" | "fastest",
                                   "response_format": "b64_json" | "png"}
    GET  /healthz                 {"status": "ok", ...}
    GET  /metrics                 Prometheus text: queue depth, batch sizes, latency
    GET  /                        a small page: prompt box, settings, gallery

Requests are validated before they queue (pydantic: 422 naming the field; a
refused prompt, by the `--prompt-filter module:function` hook, 400 with the
reason).  They wait in a bounded queue (full: 429 with Retry-After); one batcher
groups up to `max_batch` images of compatible requests (the same settings)
arriving within `max_wait_ms` into one pipeline call, run in a worker thread.
Every image draws from its own random streams, so a request's images do not
depend on what it was batched with.  If a batched call fails, each request of
the batch is retried alone, so one bad request never fails the others.  A client
that disconnects before its request runs frees its slot; on shutdown (SIGTERM)
the server stops taking requests (503) and finishes the ones it holds.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Literal, Optional, Sequence, Tuple

from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from hart_fast.options import MAX_SEED
from hart_fast.prompt_filter import check_prompt, load_prompt_filter

log = logging.getLogger("hart_fast")

MAX_PROMPT_CHARS = 4000
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ImageRequest(BaseModel):
    """The body of POST /v1/images/generations (the shape image APIs use)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    n: int = Field(1, ge=1, le=8)
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED - 8)
    guidance_scale: float = Field(4.5, ge=0.0, le=100.0, allow_inf_nan=False)
    speed: Literal["exact", "balanced", "fastest"] = "exact"  # hart_fast.speed presets
    response_format: Literal["b64_json", "png"] = "b64_json"

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt must not be blank")
        return v

    def settings_key(self) -> Tuple:
        """Requests with the same key can share a pipeline call."""
        return (self.guidance_scale, self.speed)


# A generate function: (prompts, seeds, guidance_scale, speed) -> PIL images, one per row.
GenerateFn = Callable[[Sequence[str], Sequence[int], float, str], List]


def pipeline_generate_fn(model=None, text_encoder=None, device="cpu", dtype="float32") -> GenerateFn:
    """The real generate function: one pipeline (and text encoder), loaded once."""
    from hart_fast.api import GenerationSettings, load_pipeline, load_text_encoder

    pipe = load_pipeline(model, device, dtype)
    encoder = load_text_encoder(text_encoder, pipe, GenerationSettings())

    def generate(prompts, seeds, guidance_scale, speed="exact"):
        with warnings.catch_warnings():  # truncation is reported per request (warnings_for)
            warnings.simplefilter("ignore", UserWarning)
            embeds, mask = encoder(list(prompts))
        return pipe.generate(embeds, mask, seed=list(seeds), guidance_scale=guidance_scale, more_smooth=True,
                             output_type="pil", speed=speed)

    note = getattr(encoder, "truncation_note", None)
    generate.warnings_for = (lambda prompt: [w for w in [note(prompt)] if w]) if note else (lambda prompt: [])
    return generate


# ---------------------------------------------------------------------------------
# Metrics (Prometheus text format, no client library needed for three series)
# ---------------------------------------------------------------------------------
class _Histogram:
    def __init__(self, buckets):
        self.buckets, self.counts, self.sum, self.n = tuple(buckets), [0] * len(buckets), 0.0, 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.sum += v
        self.n += 1

    def lines(self, name: str) -> List[str]:
        out = [f"# TYPE {name} histogram"]
        out += [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.n}"]
        return out


@dataclass
class Metrics:
    batch_sizes: _Histogram = field(default_factory=lambda: _Histogram(BATCH_BUCKETS))
    latency: _Histogram = field(default_factory=lambda: _Histogram(LATENCY_BUCKETS))
    responses: Dict[int, int] = field(default_factory=dict)

    def count(self, code: int) -> None:
        self.responses[code] = self.responses.get(code, 0) + 1

    def render(self, queue_depth: int) -> str:
        lines = ["# TYPE hart_fast_queue_depth gauge", f"hart_fast_queue_depth {queue_depth}"]
        lines += self.batch_sizes.lines("hart_fast_batch_images")
        lines += self.latency.lines("hart_fast_request_latency_seconds")
        lines.append("# TYPE hart_fast_responses_total counter")
        lines += [f'hart_fast_responses_total{{code="{c}"}} {n}' for c, n in sorted(self.responses.items())]
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------
# The batcher
# ---------------------------------------------------------------------------------
@dataclass
class _Job:
    req: ImageRequest
    seeds: List[int]
    future: asyncio.Future


class QueueFull(Exception):
    pass


class Batcher:
    """Groups queued requests into pipeline calls (see the module docstring)."""

    def __init__(self, generate_fn: GenerateFn, max_batch: int = 8, max_wait_ms: float = 20.0, max_queue: int = 64,
                 metrics: Optional[Metrics] = None):
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and max_wait_ms >= 0")
        self.generate_fn, self.max_batch, self.max_wait = generate_fn, max_batch, max_wait_ms / 1000
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=max_queue)
        self.metrics = metrics or Metrics()
        self._pending: List[_Job] = []   # taken from the queue but not yet batched (other settings)
        self._lock = threading.Lock()    # one pipeline call at a time
        self._task: Optional[asyncio.Task] = None
        self.busy = False

    def depth(self) -> int:
        return self.queue.qsize() + len(self._pending)

    def submit(self, req: ImageRequest, seeds: List[int]) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait(_Job(req, seeds, fut))
        except asyncio.QueueFull:
            raise QueueFull() from None
        return fut

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def drain_and_stop(self) -> None:
        """Finish every queued request, then stop."""
        while self.depth() or self.busy:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()

    async def _next_job(self, timeout: Optional[float]) -> Optional[_Job]:
        if self._pending:
            return self._pending.pop(0)
        try:
            if timeout is None:
                return await self.queue.get()
            return await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._next_job(None)
            if first.future.done():  # the client went away before its turn
                continue
            self.busy = True
            batch, images = [first], first.req.n
            deadline = loop.time() + self.max_wait
            deferred: List[_Job] = []
            while images < self.max_batch:
                job = await self._next_job(max(0.0, deadline - loop.time()))
                if job is None:
                    break
                if job.future.done():
                    continue
                if job.req.settings_key() != first.req.settings_key() or images + job.req.n > self.max_batch:
                    deferred.append(job)
                    if loop.time() >= deadline:
                        break
                    continue
                batch.append(job)
                images += job.req.n
            self._pending = deferred + self._pending
            await self._execute(batch)
            self.busy = False

    async def _execute(self, batch: List[_Job]) -> None:
        prompts = [j.req.prompt for j in batch for _ in range(j.req.n)]
        seeds = [s for j in batch for s in j.seeds]
        g, speed = batch[0].req.guidance_scale, batch[0].req.speed
        self.metrics.batch_sizes.observe(len(prompts))
        try:
            images = await asyncio.to_thread(self._call, prompts, seeds, g, speed)
        except Exception as e:  # noqa: BLE001  (any failure: retry each request alone)
            if len(batch) == 1:
                if not batch[0].future.done():
                    batch[0].future.set_exception(e)
                return
            log.warning("hart_fast serve: a batch of %d requests failed (%s); retrying each alone", len(batch), e)
            for job in batch:
                await self._execute([job])
            return
        k = 0
        for job in batch:
            if not job.future.done():
                job.future.set_result(images[k:k + job.req.n])
            k += job.req.n

    def _call(self, prompts, seeds, g, speed):
        with self._lock:
            return self.generate_fn(prompts, seeds, g, speed)


# ---------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------
def _png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def create_app(generate_fn: GenerateFn, *, max_batch: int = 8, max_wait_ms: float = 20.0, max_queue: int = 64,
               prompt_filter: Optional[Callable[[str], Optional[str]]] = None, model_label: str = "hart",
               retry_after_s: int = 1):
    """The FastAPI app around generate_fn (pipeline_generate_fn for the real model)."""
    metrics = Metrics()
    state = {"accepting": True, "batcher": None}

    def batcher() -> Batcher:
        # Started by the lifespan, or on the first request where the host runs no
        # lifespan (some ASGI hosts); always inside the serving event loop.
        if state["batcher"] is None:
            b = Batcher(generate_fn, max_batch, max_wait_ms, max_queue, metrics)
            b.start()
            state["batcher"] = b
        return state["batcher"]

    @asynccontextmanager
    async def lifespan(app):
        batcher()
        yield
        state["accepting"] = False  # SIGTERM: refuse new work, finish what is held
        await state["batcher"].drain_and_stop()

    app = FastAPI(title="hart_fast", lifespan=lifespan)

    def error(code: int, message: str, headers=None):
        metrics.count(code)
        return JSONResponse({"error": {"message": message, "code": code}}, status_code=code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        parts = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
            parts.append(f"{where}: {e.get('msg')}")
        return error(422, "; ".join(parts))

    @app.get("/healthz")
    async def healthz():
        b = state["batcher"]
        return {"status": "ok" if state["accepting"] else "draining", "model": model_label,
                "queue_depth": b.depth() if b else 0}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics_endpoint():
        b = state["batcher"]
        return metrics.render(b.depth() if b else 0)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return _PAGE.replace("{{model}}", model_label)

    @app.post("/v1/images/generations")
    async def generations(req: ImageRequest, request: Request):
        t0 = time.perf_counter()
        if not state["accepting"]:
            return error(503, "the server is shutting down")
        if req.response_format == "png" and req.n != 1:
            return error(422, "n: response_format 'png' returns one image; use n=1 or 'b64_json'")
        reason = check_prompt(prompt_filter, req.prompt)
        if reason is not None:
            return error(400, f"prompt refused: {reason}")
        notes = getattr(generate_fn, "warnings_for", lambda prompt: [])(req.prompt)  # e.g. truncation
        base = req.seed if req.seed is not None else int.from_bytes(os.urandom(6), "big")
        seeds = [base + i for i in range(req.n)]
        try:
            fut = batcher().submit(req, seeds)
        except QueueFull:
            return error(429, "the queue is full; retry later", headers={"Retry-After": str(retry_after_s)})
        watcher = asyncio.create_task(_cancel_on_disconnect(request, fut))
        try:
            images = await fut
        except asyncio.CancelledError:
            fut.cancel()  # the batcher skips it: the slot is free
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this handler itself was cancelled (the client went away)
            return error(499, "client closed the request")
        except Exception as e:  # noqa: BLE001
            return error(500, f"generation failed: {e}")
        finally:
            watcher.cancel()
        metrics.latency.observe(time.perf_counter() - t0)
        metrics.count(200)
        if req.response_format == "png":
            headers = {"X-Seed": str(seeds[0]), **({"X-Warning": "; ".join(notes)} if notes else {})}
            return Response(_png_bytes(images[0]), media_type="image/png", headers=headers)
        return {"created": int(time.time()), "model": model_label, "warnings": notes,
                "data": [{"b64_json": base64.b64encode(_png_bytes(img)).decode(), "seed": s}
                         for img, s in zip(images, seeds)]}

    return app


async def _cancel_on_disconnect(request, fut: asyncio.Future) -> None:
    while not fut.done():
        if await request.is_disconnected():
            fut.cancel()  # frees the slot: the batcher skips a done future
            return
        await asyncio.sleep(0.05)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>hart_fast</title>
<style>body{font-family:sans-serif;margin:2em;max-width:60em}#gallery img{width:192px;margin:4px;
image-rendering:pixelated}input[type=text]{width:30em}</style></head>
<body><h1>hart_fast</h1><p>Model: {{model}}</p>
<form id="f"><input type="text" id="prompt" placeholder="a red apple" required>
n <input type="number" id="n" value="1" min="1" max="8"> seed <input type="number" id="seed" min="0">
cfg <input type="number" id="cfg" value="4.5" min="0" step="0.5">
speed <select id="speed"><option>exact</option><option>balanced</option><option>fastest</option></select>
<button type="submit">Generate</button></form>
<p id="status"></p><div id="gallery"></div>
<script>
document.getElementById('f').addEventListener('submit', async (e) => {
  e.preventDefault();
  const body = {prompt: document.getElementById('prompt').value, n: +document.getElementById('n').value,
                guidance_scale: +document.getElementById('cfg').value,
                speed: document.getElementById('speed').value};
  const seed = document.getElementById('seed').value; if (seed !== '') body.seed = +seed;
  const status = document.getElementById('status'); status.textContent = 'generating...';
  const r = await fetch('/v1/images/generations', {method: 'POST', headers: {'Content-Type': 'application/json'},
                                                    body: JSON.stringify(body)});
  const j = await r.json();
  if (!r.ok) { status.textContent = 'error: ' + j.error.message; return; }
  status.textContent = '';
  for (const d of j.data) { const img = document.createElement('img'); img.alt = body.prompt + ' (seed ' + d.seed + ')';
    img.src = 'data:image/png;base64,' + d.b64_json; document.getElementById('gallery').prepend(img); }
});
</script></body></html>
"""


class LazyGenerate:
    """pipeline_generate_fn, loaded on first use: what a Ray Serve replica ships (the
    model loads in the replica, once, not in the driver)."""

    def __init__(self, model=None, text_encoder=None, device="cpu", dtype="float32"):
        self.args, self.fn = (model, text_encoder, device, dtype), None
        self._lock = threading.Lock()

    def __call__(self, prompts, seeds, g, speed="exact"):
        with self._lock:
            if self.fn is None:
                self.fn = pipeline_generate_fn(*self.args)
        return self.fn(prompts, seeds, g, speed)

    def __getstate__(self):
        return {"args": self.args}

    def __setstate__(self, st):
        self.args, self.fn, self._lock = st["args"], None, threading.Lock()


def serve(model=None, text_encoder=None, device="cpu", dtype="float32", host="127.0.0.1", port=8000,
          max_batch=8, max_wait_ms=20.0, max_queue=64, prompt_filter: Optional[str] = None) -> None:
    """Load the model and run the HTTP server until SIGINT / SIGTERM (graceful)."""
    import uvicorn

    from hart_fast.api import model_name, resolve_model_path

    fn = pipeline_generate_fn(model, text_encoder, device, dtype)
    app = create_app(fn, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
                     prompt_filter=load_prompt_filter(prompt_filter),
                     model_label=model_name(resolve_model_path(model)))
    uvicorn.run(app, host=host, port=port, log_level="info")


def ray_serve_application(model=None, text_encoder=None, device="cpu", dtype="float32", max_batch=8,
                          max_wait_ms=20.0, max_queue=64, prompt_filter: Optional[str] = None,
                          replicas: Optional[int] = None, generate_fn: Optional[GenerateFn] = None):
    """The same app as a Ray Serve deployment: one replica per GPU (or `replicas` CPU
    replicas), each with its own model and batcher.  Returns the bound application
    for `ray.serve.run`."""
    import ray
    from ray import serve as ray_serve

    from hart_fast.api import model_name, resolve_model_path

    gpus = int(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0
    n = replicas or (gpus or 1)
    fn = generate_fn or LazyGenerate(model, text_encoder, device, dtype)
    app = create_app(fn, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
                     prompt_filter=load_prompt_filter(prompt_filter),
                     model_label=model_name(resolve_model_path(model)))
    options = {"num_gpus": 1} if gpus else {"num_cpus": 0.5}

    @ray_serve.deployment(num_replicas=n, ray_actor_options=options, max_ongoing_requests=max_queue + max_batch)
    @ray_serve.ingress(app)
    class HartImages:
        pass

    return HartImages.bind()


def serve_on_ray(address: str = "auto", host="127.0.0.1", port=8000, **kwargs) -> None:
    """`hart-fast serve --ray`: run ray_serve_application on a cluster until interrupted."""
    import ray
    from ray import serve as ray_serve

    from hart_fast.batch_ray import _connect

    _connect(address)
    ray_serve.start(http_options={"host": host, "port": port})
    ray_serve.run(ray_serve_application(**kwargs), blocking=True)
    ray.shutdown()


__all__ = ["Batcher", "ImageRequest", "LazyGenerate", "Metrics", "create_app", "load_prompt_filter",
           "pipeline_generate_fn", "ray_serve_application", "serve", "serve_on_ray"]
