"""The fast path's kernel plan (one choice per op per model, fallbacks with reasons),
`hart-fast info` printing it, and options refused before anything is written."""

from __future__ import annotations

import io
import sys

import pytest
import torch

import hart_fast
from hart_fast import cli
from hart_fast.kernel_plan import KERNEL_HEAD_DIMS, KernelPlan
from hart_fast.pipeline import HartPipeline

from numerics import assert_close_ulps
from tiny_models import random_prompts, write_model

D24 = {"embed_dim": 48, "num_heads": 2, "disable_aln": False}  # head dim 24, AdaLN on (the model)


def run_cli(args):
    old = sys.stdin
    sys.stdin = io.StringIO("")
    try:
        return cli.main(args)
    finally:
        sys.stdin = old


@pytest.mark.parametrize("d", [8, 12, 16, 24, 32, 40, 64, 96, 128])
def test_attention_falls_back_for_uncovered_head_dims(d):
    plan = KernelPlan(d, "cpu", torch.float32)
    choice = plan.choices["attention"]
    if d in KERNEL_HEAD_DIMS:
        assert (choice.impl, choice.fallback) == ("ours", False)
        assert plan.attention_backend(16, 8, 100) == "ours"
    else:
        assert (choice.impl, choice.fallback) == ("sdpa", True)
        assert f"head dim {d}" in choice.reason
        assert plan.attention_backend(16, 8, 100) == "sdpa"


def test_forced_backend_that_cannot_run_falls_back_with_its_reason(monkeypatch):
    monkeypatch.setenv("HART_FAST_ATTENTION", "ours")
    plan = KernelPlan(24, "cpu", torch.float32)
    assert plan.attention_backend(4, 2, 10) == "sdpa"
    assert "HART_FAST_ATTENTION=ours cannot run" in plan.choices["attention"].reason
    monkeypatch.setenv("HART_FAST_ATTENTION", "triton")
    plan = KernelPlan(64, "cpu", torch.bfloat16)
    assert plan.attention_backend(4, 2, 10) == "sdpa" and plan.choices["attention"].fallback
    monkeypatch.setenv("HART_FAST_ATTENTION", "sdpa")
    assert KernelPlan(64, "cpu", torch.float32).attention_backend(4, 2, 10) == "sdpa"
    monkeypatch.setenv("HART_FAST_ATTENTION", "cudnn")
    with pytest.raises(ValueError, match="HART_FAST_ATTENTION='cudnn' is not an attention backend"):
        KernelPlan(64, "cpu", torch.float32)


def test_without_the_extension_every_op_falls_back(monkeypatch):
    from hart_fast import ops

    monkeypatch.setattr(ops, "HAS_EXTENSION", False)
    plan = KernelPlan(64, "cpu", torch.float32)
    assert all(c.fallback for c in plan.choices.values())
    assert all("not built" in c.reason for c in plan.choices.values())


def test_default_path_runs_head_dim_24_and_matches_the_reference(tmp_path):
    d = write_model(str(tmp_path / "m"), llm_overrides=D24)
    fast, ref = HartPipeline.from_pretrained(d), HartPipeline.from_pretrained(d, fast=False)
    assert fast.fast and fast.config.head_dim == 24
    ctx, mask = random_prompts(2, fast.config.context_token, fast.config.context_dim, seed=3)
    greedy = lambda si, lg: lg.argmax(-1)  # noqa: E731
    a = fast.generate(ctx, mask, token_sampler=greedy, residual_diffusion=False, output_type="latent")
    b = ref.generate(ctx, mask, token_sampler=greedy, residual_diffusion=False, output_type="latent")
    assert_close_ulps(a, b, 64, scale="max")  # 64 fp32 ulps of the latent's scale: association only
    # The choice was made once, when the engine was built, and every stage uses it.
    st = fast.engine.states[4]
    assert st.attn_backend == ["sdpa"] * fast.config.num_stages


def test_info_prints_the_plan_with_the_fallback(tmp_path, capsys):
    d = write_model(str(tmp_path / "m"), llm_overrides=D24)
    assert run_cli(["info", d, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "2 heads x 24" in out
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("attention"))
    assert "fallback (sdpa)" in line and "head dim 24" in line
    assert "rms_norm_modulate" in out and "kernel" in out


@pytest.mark.parametrize("cfg", [-3.0, -1e-9])
def test_negative_guidance_is_refused_in_python(tmp_path, cfg):
    d = write_model(str(tmp_path / "m"))
    pipe = HartPipeline.from_pretrained(d)
    ctx, mask = random_prompts(1, pipe.config.context_token, pipe.config.context_dim)
    with pytest.raises(ValueError, match=r"guidance_scale \(cfg\) must be >= 0"):
        pipe.generate(ctx, mask, guidance_scale=cfg)
    embeds = lambda prompts: torch.zeros(len(prompts), pipe.config.context_token, pipe.config.context_dim)  # noqa: E731
    with pytest.raises(ValueError, match="cfg"):
        hart_fast.generate("a cat", model=pipe, text_encoder=embeds, cfg=cfg)
    # 0 means no guidance and is fine.
    assert pipe.generate(ctx, mask, guidance_scale=0.0, seed=1).shape[0] == 1


def test_negative_guidance_is_refused_by_the_cli_and_nothing_is_written(tmp_path, capsys):
    d = write_model(str(tmp_path / "m"))
    out_dir = tmp_path / "out"
    png = tmp_path / "one.png"
    for out in (out_dir, png):
        code = run_cli(["generate", "a cat", "--cfg", "-3", "--model", d, "--device", "cpu", "--out", str(out), "-q"])
        assert code == cli.EXIT_USAGE
        err = capsys.readouterr().err
        assert "cfg" in err and "must be >= 0" in err
        assert not out.exists()


def test_cuda_rope_kernel_limit_falls_back_in_the_plan():
    # Planned for a CUDA device without needing one: the plan reads only the extension's flags.
    from hart_fast import ops

    plan = KernelPlan(160, "cuda", torch.float16)
    qkv = plan.choices["qkv_rope_cache (bias, l2 norm, RoPE, KV write)"]
    if not ops.HAS_CUDA_KERNELS:
        assert qkv.fallback and "without CUDA kernels" in qkv.reason
        return
    assert qkv.fallback and "head dim 160" in qkv.reason and not plan.use_compiled_qkv
    assert not KernelPlan(128, "cuda", torch.float16).choices["qkv_rope_cache (bias, l2 norm, RoPE, KV write)"].fallback
    assert KernelPlan(160, "cpu", torch.float32).use_compiled_qkv  # the C++ kernel has no limit


def test_seed_errors_are_clear(tmp_path):
    d = write_model(str(tmp_path / "m"))
    pipe = HartPipeline.from_pretrained(d)
    embeds = lambda prompts: torch.zeros(len(prompts), pipe.config.context_token, pipe.config.context_dim)  # noqa: E731
    with pytest.raises(ValueError, match="one seed per row is an option of HartPipeline.generate"):
        hart_fast.generate(["a", "b"], model=pipe, text_encoder=embeds, seed=[3])
    with pytest.raises(ValueError, match=r"seed must be <= 9223372036854775806 for 2 images"):
        hart_fast.generate(["a", "b"], model=pipe, text_encoder=embeds, seed=2**63 - 1)
    ctx, mask = random_prompts(2, pipe.config.context_token, pipe.config.context_dim)
    with pytest.raises(ValueError, match="seed must be <= 9223372036854775807"):
        pipe.generate(ctx[:1], mask[:1], seed=2**63)
    with pytest.raises(ValueError, match=r"seed\[1\] must be <= 9223372036854775807"):
        pipe.generate(ctx, mask, seed=[0, 2**63])
    with pytest.raises(ValueError, match="rows take seed \\+ b"):
        pipe.generate(ctx, mask, seed=2**63 - 1)
