"""`hart-fast serve`: validation before the queue, dynamic batching, 429, filter, metrics,
one bad request never failing its batch, and a real uvicorn server on loopback."""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

import hart_fast
from hart_fast.serve import create_app, load_prompt_filter, pipeline_generate_fn

from tiny_models import write_model
from hart_fast.demo import write_text_encoder


class FakeGenerate:
    """Records the batches it is called with; images encode (prompt length, seed)."""

    def __init__(self, delay=0.0, fail_on=None):
        self.calls, self.delay, self.fail_on = [], delay, fail_on
        self.speeds = []  # the speed of every call, in order

    def __call__(self, prompts, seeds, g, speed="exact"):
        self.calls.append((list(prompts), list(seeds), g))
        self.speeds.append(speed)
        if self.fail_on is not None and self.fail_on in prompts:
            raise RuntimeError(f"cannot draw {self.fail_on!r}")
        time.sleep(self.delay)
        return [Image.new("RGB", (4, 4), (len(p) % 256, s % 256, int(g * 10) % 256)) for p, s in zip(prompts, seeds)]


def _pixel(b64):
    return Image.open(io.BytesIO(base64.b64decode(b64))).getpixel((0, 0))


def _run(app, coro_fn):
    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                return await coro_fn(client)

    return asyncio.run(main())


def test_batches_compatible_requests_and_answers_each_with_its_own_images():
    gen = FakeGenerate(delay=0.05)
    app = create_app(gen, max_batch=8, max_wait_ms=200)

    async def go(c):
        bodies = [{"prompt": "a" * (i + 1), "n": 1 + i % 2, "seed": 10 * i} for i in range(5)]
        rs = await asyncio.gather(*[c.post("/v1/images/generations", json=b) for b in bodies])
        return bodies, rs, await c.get("/metrics")

    bodies, rs, metrics = _run(app, go)
    for b, r in zip(bodies, rs):
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        assert [d["seed"] for d in data] == [b["seed"] + k for k in range(b["n"])]
        assert [_pixel(d["b64_json"])[:2] for d in data] == [(len(b["prompt"]), s % 256) for s in
                                                             (b["seed"] + k for k in range(b["n"]))]
    assert max(len(p) for p, _, _ in gen.calls) > 1  # requests shared a pipeline call
    assert sum(len(p) for p, _, _ in gen.calls) == sum(b["n"] for b in bodies) == 7
    assert all(len(p) <= 8 for p, _, _ in gen.calls)
    text = metrics.text
    assert "hart_fast_queue_depth 0" in text and 'hart_fast_responses_total{code="200"} 5' in text
    assert f"hart_fast_batch_images_count {len(gen.calls)}" in text


def test_incompatible_settings_are_not_mixed():
    gen = FakeGenerate(delay=0.02)
    app = create_app(gen, max_batch=8, max_wait_ms=100)

    async def go(c):
        bodies = [{"prompt": "x", "guidance_scale": g, "seed": 1} for g in (1.0, 2.0, 1.0, 2.0)]
        return await asyncio.gather(*[c.post("/v1/images/generations", json=b) for b in bodies])

    rs = _run(app, go)
    assert all(r.status_code == 200 for r in rs)
    assert all(len({g}) == 1 for _, _, g in gen.calls) and {g for _, _, g in gen.calls} == {1.0, 2.0}


def test_one_bad_request_never_fails_the_others_in_its_batch():
    gen = FakeGenerate(fail_on="boom")
    app = create_app(gen, max_batch=8, max_wait_ms=200)

    async def go(c):
        bodies = [{"prompt": p, "seed": 3} for p in ("fine", "boom", "also fine")]
        return await asyncio.gather(*[c.post("/v1/images/generations", json=b) for b in bodies])

    ok1, bad, ok2 = _run(app, go)
    assert ok1.status_code == 200 and ok2.status_code == 200
    assert bad.status_code == 500 and "cannot draw 'boom'" in bad.json()["error"]["message"]


@pytest.mark.parametrize("body,field", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": 3}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": 9}, "n"),
    ({"prompt": "x", "n": "two"}, "n"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "guidance_scale": -3}, "guidance_scale"),
    ({"prompt": "x", "colour": "red"}, "colour"),
    ({"prompt": "x", "response_format": "jpeg"}, "response_format"),
    ({"prompt": "x", "speed": "ludicrous"}, "speed"),
    ({"prompt": "x" * 5000}, "prompt"),
    ({"prompt": "x", "n": 2, "response_format": "png"}, "n"),
])
def test_bad_input_is_a_422_naming_the_field_and_leaves_the_server_healthy(body, field):
    gen = FakeGenerate()
    app = create_app(gen)

    async def go(c):
        return await c.post("/v1/images/generations", json=body), await c.get("/healthz")

    r, health = _run(app, go)
    assert r.status_code == 422 and r.json()["error"]["message"].startswith(field), r.text
    assert health.json()["status"] == "ok" and not gen.calls


def test_speed_reaches_the_pipeline_and_splits_batches():
    gen = FakeGenerate(delay=0.05)
    app = create_app(gen, max_batch=8, max_wait_ms=100)

    async def go(c):
        import asyncio

        return await asyncio.gather(
            c.post("/v1/images/generations", json={"prompt": "a", "seed": 1, "speed": "fastest"}),
            c.post("/v1/images/generations", json={"prompt": "b", "seed": 2}),
            c.post("/v1/images/generations", json={"prompt": "c", "seed": 3, "speed": "fastest"}))

    rs = _run(app, go)
    assert all(r.status_code == 200 for r in rs)
    # Requests of different speeds never share a pipeline call; the same speed may.
    by_speed = {}
    for (prompts, _, _), speed in zip(gen.calls, gen.speeds):
        by_speed.setdefault(speed, []).extend(prompts)
    assert sorted(by_speed["fastest"]) == ["a", "c"] and by_speed["exact"] == ["b"]


def test_body_that_is_not_json_is_a_4xx_with_a_message():
    app = create_app(FakeGenerate())

    async def go(c):
        return await c.post("/v1/images/generations", content=b"not json{",
                            headers={"Content-Type": "application/json"})

    r = _run(app, go)
    assert r.status_code == 422 and "JSON" in r.json()["error"]["message"]


def test_full_queue_answers_429_with_retry_after():
    gen = FakeGenerate(delay=0.3)
    app = create_app(gen, max_batch=1, max_wait_ms=0, max_queue=1)

    async def go(c):
        return await asyncio.gather(*[c.post("/v1/images/generations", json={"prompt": f"p{i}", "seed": i})
                                      for i in range(4)])

    rs = _run(app, go)
    codes = sorted(r.status_code for r in rs)
    assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
    limited = next(r for r in rs if r.status_code == 429)
    assert limited.headers["Retry-After"] == "1" and "queue is full" in limited.json()["error"]["message"]


def refuse_apples(prompt):
    return "no apples" if "apple" in prompt else None


def test_prompt_filter_refuses_with_400_and_the_reason():
    flt = load_prompt_filter("test_serve:refuse_apples")
    app = create_app(FakeGenerate(), prompt_filter=flt)

    async def go(c):
        return (await c.post("/v1/images/generations", json={"prompt": "a red apple"}),
                await c.post("/v1/images/generations", json={"prompt": "a pear", "seed": 1}))

    refused, ok = _run(app, go)
    assert refused.status_code == 400 and "prompt refused: no apples" in refused.json()["error"]["message"]
    assert ok.status_code == 200
    with pytest.raises(ValueError, match="module:function"):
        load_prompt_filter("nocolon")
    with pytest.raises(ValueError, match="no_such_module"):
        load_prompt_filter("no_such_module:f")


def test_png_response_and_page():
    app = create_app(FakeGenerate(), model_label="tiny")

    async def go(c):
        return (await c.post("/v1/images/generations", json={"prompt": "abc", "seed": 5, "response_format": "png"}),
                await c.get("/"))

    png, page = _run(app, go)
    assert png.headers["content-type"] == "image/png" and png.headers["X-Seed"] == "5"
    assert Image.open(io.BytesIO(png.content)).getpixel((0, 0))[:2] == (3, 5)
    assert page.status_code == 200 and "<form" in page.text and "tiny" in page.text


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = write_model(str(tmp_path_factory.mktemp("serve") / "m"))
    write_text_encoder(f"{d}/text_encoder", 24, seed=1)
    return d


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_uvicorn_server_on_loopback_serves_the_model(model):
    import uvicorn

    app = create_app(pipeline_generate_fn(model), max_batch=4, max_wait_ms=50, model_label="tiny")
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        assert server.started
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            assert c.get("/healthz").json()["status"] == "ok"
            r = c.post("/v1/images/generations", json={"prompt": "a red apple", "seed": 9, "n": 2})
            assert r.status_code == 200
            imgs = [np.asarray(Image.open(io.BytesIO(base64.b64decode(d["b64_json"])))) for d in r.json()["data"]]
            # The same image as the library gives for that prompt and seed.
            alone = np.asarray(hart_fast.generate("a red apple", model=model, seed=9))
            assert imgs[0].shape == alone.shape and np.abs(imgs[0].astype(int) - alone.astype(int)).max() <= 1
            # The tiny model reads 6 tokens: this prompt (11 byte tokens) is truncated with a
            # warning, as generate does; a short one is not.
            assert "11 tokens long; the model reads 6, so it is truncated" in r.json()["warnings"][0]
            short = c.post("/v1/images/generations", json={"prompt": "abc", "seed": 1})
            assert short.status_code == 200 and short.json()["warnings"] == []
            assert c.post("/v1/images/generations", content=b"{").status_code == 422
            assert c.get("/healthz").json()["status"] == "ok"
            assert "hart_fast_request_latency_seconds_count 2" in c.get("/metrics").text
    finally:
        server.should_exit = True  # what SIGTERM does: finish what is held, then stop
        thread.join(timeout=30)
    assert not thread.is_alive()


def test_shutdown_finishes_the_requests_it_holds():
    gen = FakeGenerate(delay=0.2)
    app = create_app(gen, max_batch=1, max_wait_ms=0)
    results = {}

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            async with app.router.lifespan_context(app):
                tasks = [asyncio.create_task(c.post("/v1/images/generations", json={"prompt": f"p{i}", "seed": i}))
                         for i in range(3)]
                await asyncio.sleep(0.05)  # all three are held; now the server is told to stop
            results["codes"] = [(await t).status_code for t in tasks]

    asyncio.run(main())
    assert results["codes"] == [200, 200, 200] and len(gen.calls) == 3


def test_queue_rejects_after_shutdown_begins():
    app = create_app(FakeGenerate())

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            cm = app.router.lifespan_context(app)
            await cm.__aenter__()
            await cm.__aexit__(None, None, None)
            return await c.post("/v1/images/generations", json={"prompt": "x"}), await c.get("/healthz")

    r, health = asyncio.run(main())
    assert r.status_code == 503 and health.json()["status"] == "draining"
    assert "shutting down" in r.json()["error"]["message"]


def test_prompt_filter_in_the_batch_path_and_the_cli(model, tmp_path, capsys):
    import sys

    from hart_fast import cli
    from hart_fast.batch import PromptFileError, run_batch

    prompts = tmp_path / "p.txt"
    prompts.write_text("a pear\na red apple\n")
    with pytest.raises(PromptFileError, match=r"prompt 2 \('a red apple'\) refused: no apples"):
        run_batch(str(prompts), str(tmp_path / "o"), model=model, prompt_filter="test_serve:refuse_apples")
    assert not (tmp_path / "o").exists()
    old, sys.stdin = sys.stdin, io.StringIO("")
    try:
        code = cli.main(["generate", "a pear", "an apple", "--model", model, "--device", "cpu", "-q",
                         "--out", str(tmp_path / "g"), "--prompt-filter", "test_serve:refuse_apples"])
    finally:
        sys.stdin = old
    assert code == cli.EXIT_USAGE and "prompt 2 ('an apple') refused: no apples" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()


def test_ray_serve_deployment_on_a_local_cluster(model):
    """`hart-fast serve --ray`: the same app on Ray Serve (CPU replicas here)."""
    import os

    import ray
    from ray import serve as ray_serve

    from hart_fast.serve import ray_serve_application

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    try:
        ray_serve.start(http_options={"host": "127.0.0.1", "port": port})
        ray_serve.run(ray_serve_application(model=model, replicas=2, max_batch=4), blocking=False)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
            assert c.get("/healthz").json()["status"] == "ok"
            r = c.post("/v1/images/generations", json={"prompt": "a red apple", "seed": 9})
            assert r.status_code == 200, r.text
            img = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))))
            alone = np.asarray(hart_fast.generate("a red apple", model=model, seed=9))
            assert np.abs(img.astype(int) - alone.astype(int)).max() <= 1
            bad = c.post("/v1/images/generations", json={"prompt": "x", "n": 0})
            assert bad.status_code == 422 and bad.json()["error"]["message"].startswith("n")
    finally:
        ray_serve.shutdown()
        if started:
            ray.shutdown()


def test_a_client_that_disconnects_frees_its_slot():
    gen = FakeGenerate(delay=0.3)
    app = create_app(gen, max_batch=1, max_wait_ms=0)

    async def go(c):
        first = asyncio.create_task(c.post("/v1/images/generations", json={"prompt": "first", "seed": 1}))
        await asyncio.sleep(0.05)  # "first" is running
        gone = asyncio.create_task(c.post("/v1/images/generations", json={"prompt": "gone", "seed": 2}))
        await asyncio.sleep(0.05)  # "gone" waits in the queue...
        gone.cancel()  # ... and its client disconnects
        last = await c.post("/v1/images/generations", json={"prompt": "last", "seed": 3})
        return (await first).status_code, last.status_code

    codes = _run(app, go)
    assert codes == (200, 200)
    assert [p for p, _, _ in gen.calls] == [["first"], ["last"]]  # "gone" never ran
