"""Load test of `hart-fast serve` over loopback (issue 12's targets), the embedded demo
model on the CPU.  Bounded in count and time; prints a table.

    python bench/serve_load.py [--clients 16] [--requests 96]

1. Throughput: `--clients` concurrent clients, each sending requests back to back,
   against a server with dynamic batching (--max-batch 16) and one without
   (--max-batch 1, one request at a time).  Target: batching >= 2.5x.
2. Latency at half the saturating load (open loop, Poisson arrivals at half the
   batched throughput of 1., 4x `--requests` of them so that the p99 is not the
   maximum): target p99 <= 3x p50.
3. 2x overload (open loop at twice that throughput, a queue of 16): every request
   answered (an image or a 429), none fails or hangs, the server's memory flat.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import statistics
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, max_batch: int, max_queue: int = 256, max_wait_ms: float = 20.0):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hart_fast", "serve", "--device", "cpu", "--port", str(self.port),
             "--max-batch", str(max_batch), "--max-queue", str(max_queue), "--max-wait-ms", str(max_wait_ms)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise SystemExit("the server did not start")

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self):
        self.proc.terminate()  # SIGTERM: graceful
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def body(i: int) -> dict:
    return {"prompt": f"a red circle number {i}", "seed": i, "n": 1}


async def closed_loop(url: str, clients: int, total: int):
    """`clients` workers sending back to back until `total` requests are done: images/s, latencies."""
    lat, codes, counter = [], [], iter(range(total))

    async def worker(c):
        for i in counter:
            t0 = time.perf_counter()
            r = await c.post("/v1/images/generations", json=body(i))
            lat.append(time.perf_counter() - t0)
            codes.append(r.status_code)

    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        await c.post("/v1/images/generations", json=body(10**6))  # warm-up
        t0 = time.perf_counter()
        await asyncio.gather(*[worker(c) for _ in range(clients)])
        wall = time.perf_counter() - t0
    return total / wall, lat, codes


async def open_loop(url: str, rate: float, total: int, seed: int = 0):
    """Poisson arrivals at `rate` requests/s: latencies of the 200s and all status codes."""
    rng = random.Random(seed)
    lat, codes = [], []

    async def one(c, i):
        t0 = time.perf_counter()
        try:
            r = await c.post("/v1/images/generations", json=body(i))
            codes.append(r.status_code)
            if r.status_code == 200:
                lat.append(time.perf_counter() - t0)
        except httpx.HTTPError as e:
            codes.append(type(e).__name__)

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=1000)) as c:
        tasks = []
        for i in range(total):
            tasks.append(asyncio.create_task(one(c, i)))
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=600)
    return lat, codes


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=96)
    args = ap.parse_args()
    rows = []
    one = Server(max_batch=1)
    try:
        thr1, lat1, codes1 = asyncio.run(closed_loop(one.url, args.clients, args.requests))
    finally:
        one.stop()
    srv = Server(max_batch=16)
    try:
        thr, lat, codes = asyncio.run(closed_loop(srv.url, args.clients, args.requests))
        rows.append(("one request at a time (--max-batch 1)", f"{args.clients} clients", f"{thr1:.1f}",
                     f"{statistics.median(lat1) * 1e3:.0f}", f"{pct(lat1, 0.99) * 1e3:.0f}", "all 200" if
                     set(codes1) == {200} else str(sorted(set(codes1)))))
        rows.append(("dynamic batching (--max-batch 16)", f"{args.clients} clients", f"{thr:.1f}",
                     f"{statistics.median(lat) * 1e3:.0f}", f"{pct(lat, 0.99) * 1e3:.0f}",
                     "all 200" if set(codes) == {200} else str(sorted(set(codes)))))
        # 4x the requests: the p99 of 96 latencies would be their maximum.
        half_lat, half_codes = asyncio.run(open_loop(srv.url, thr / 2, 4 * args.requests))
        rows.append(("half load, open loop", f"{thr / 2:.1f} req/s", "", f"{statistics.median(half_lat) * 1e3:.0f}",
                     f"{pct(half_lat, 0.99) * 1e3:.0f}",
                     f"p99/p50 {pct(half_lat, 0.99) / statistics.median(half_lat):.2f} ({len(half_lat)} requests)"))
    finally:
        srv.stop()
    small = Server(max_batch=16, max_queue=16)
    try:
        rss0 = small.rss_mb()
        over_lat, over_codes = asyncio.run(open_loop(small.url, 2 * thr, 2 * args.requests, seed=1))
        rss1 = small.rss_mb()
        over_lat2, over_codes2 = asyncio.run(open_loop(small.url, 2 * thr, 2 * args.requests, seed=2))
        rss2 = small.rss_mb()
    finally:
        small.stop()
    all_codes = over_codes + over_codes2
    answered = sum(1 for c in all_codes if c in (200, 429))
    rows.append(("2x overload, queue 16, two rounds", f"{2 * thr:.1f} req/s", "",
                 f"{statistics.median(over_lat) * 1e3:.0f}" if over_lat else "-", "",
                 f"{answered}/{len(all_codes)} answered ({all_codes.count(200)} images, {all_codes.count(429)} x 429);"
                 f" RSS {rss0:.0f} -> {rss1:.0f} -> {rss2:.0f} MB"))
    print(f"| load (demo model, CPU, {os.cpu_count()} cores) | offered | images/s | p50 ms | p99 ms | notes |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print(f"\nbatching speed-up: {thr / thr1:.2f}x")


if __name__ == "__main__":
    main()
