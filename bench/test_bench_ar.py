"""The AR loop (all stages, no residual diffusion, no decode): fast path vs reference.

CPU runs a small stand-in of the same structure; CUDA runs the real 0.7B / 1024px
shape at batch 1 and 8 (random weights). `pytest bench/ --benchmark-only`.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from hart_shapes import REAL_LLM, REAL_TOK, SMALL_LLM, SMALL_TOK, random_pipeline, random_prompts  # noqa: E402

NO_CUDA = "no CUDA device on this machine (the real-shape AR benchmark runs on the GPU device machine)"

CASES = [
    pytest.param("cpu", torch.float32, SMALL_LLM, SMALL_TOK, 1, id="cpu-small-b1"),
    pytest.param("cuda", torch.float16, REAL_LLM, REAL_TOK, 1, id="cuda-0.7b-b1",
                 marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)),
    pytest.param("cuda", torch.float16, REAL_LLM, REAL_TOK, 8, id="cuda-0.7b-b8",
                 marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)),
]


@pytest.mark.parametrize("path", ["fast", "reference"])
@pytest.mark.parametrize("device,dtype,llm,tok,B", CASES)
def test_ar_loop(benchmark, device, dtype, llm, tok, B, path):
    pipe = random_pipeline(llm, tok, device, dtype, fast=path == "fast")
    ctx, mask = random_prompts(pipe, B)

    def run():
        out = pipe.generate(ctx, mask, residual_diffusion=False, output_type="latent", seed=0)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    run()  # warm-up: allocations, CUDA-graph capture
    out = benchmark.pedantic(run, rounds=3, iterations=1)
    assert out.shape[0] == B and torch.isfinite(out).all()
