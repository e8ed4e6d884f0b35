"""The Ray batch target (issue 12): 200 prompts on a local 2-worker cluster give the
same images as a one-worker run (compared by hash), and a run killed halfway and
resumed gives the same manifest.  Prints a table; the embedded demo model, CPU.

    python bench/ray_batch.py [--prompts 200] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time


def digests(out):
    recs = [json.loads(line) for line in open(os.path.join(out, "manifest.jsonl"))]
    by = {r["index"]: (r["prompt"], r["seed"], hashlib.sha256(open(os.path.join(out, r["file"]), "rb").read())
                       .hexdigest()) for r in recs}
    return by, len(recs)


def _lines(path):
    return sum(1 for _ in open(path)) if os.path.exists(path) else 0


def run(prompts, out, workers, batch_size, kill_at_lines=None):
    cmd = [sys.executable, "-m", "hart_fast", "batch", prompts, "--out", out, "--ray", "auto", "--workers",
           str(workers), "--batch-size", str(batch_size), "--device", "cpu", "-q"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True)
    if kill_at_lines is not None:
        manifest = os.path.join(out, "manifest.jsonl")
        while proc.poll() is None and _lines(manifest) < kill_at_lines:
            time.sleep(0.05)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and its local cluster, mid-run
            proc.wait()
            subprocess.run(["ray", "stop", "--force"], capture_output=True)  # what the kill orphaned
            return time.perf_counter() - t0, "killed"
    err = proc.communicate()[1]
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err}")
    return time.perf_counter() - t0, err.strip().splitlines()[-1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    root = tempfile.mkdtemp(prefix="hart-ray-bench-")
    prompts = os.path.join(root, "prompts.txt")
    colors, shapes = ("red", "green", "blue", "yellow", "purple"), ("circle", "square", "triangle", "star")
    with open(prompts, "w") as f:
        f.write("\n".join(f"a {colors[i % 5]} {shapes[i // 5 % 4]} number {i}" for i in range(args.prompts)))
    rows = []
    t2, _ = run(prompts, os.path.join(root, "two"), 2, args.batch_size)
    t1, _ = run(prompts, os.path.join(root, "one"), 1, args.batch_size)
    two, n_two = digests(os.path.join(root, "two"))
    one, n_one = digests(os.path.join(root, "one"))
    rows.append(("2 workers", f"{t2:.1f}", n_two, "reference"))
    rows.append(("1 worker", f"{t1:.1f}", n_one, "identical" if one == two else "DIFFERENT"))
    half = os.path.join(root, "killed")
    tk, _ = run(prompts, half, 2, args.batch_size, kill_at_lines=args.prompts // 2)
    partial = _lines(os.path.join(half, "manifest.jsonl"))
    tr, _ = run(prompts, half, 2, args.batch_size)
    resumed, n_res = digests(half)
    rows.append((f"killed at {tk:.0f} s ({partial} done), resumed", f"{tr:.1f}", n_res,
                 "identical" if resumed == two and n_res == args.prompts else "DIFFERENT"))
    print(f"| run ({args.prompts} prompts, batch {args.batch_size}, demo model, CPU) | seconds | manifest lines | "
          f"images vs 2 workers (sha256) |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(map(str, r)) + " |")


if __name__ == "__main__":
    main()
