"""hart_fast.ops attention ops vs their references.

* ms_attention / ms_attention_block_causal vs SDPA: fp32 to 2e-5, absolute and
  relative (the online softmax sums in another order than SDPA); fp16 / bf16
  by the flash-attention rule (python_tests/numerics.py): error vs the
  fp32-upcast reference at most 2x the error of the reference evaluated in
  the low dtype, plus 32 fp32 ulps of the output's magnitude for cases where
  that error is ~0 (the fp32 sums over up to ~10^4 keys in another order).
* qkv_rope_cache rounds exactly where the reference does, so without the l2
  norm it must be bitwise equal in every dtype; with the l2 norm the norm's
  sum order may differ (1-ulp denominators), checked by the 2x rule and a
  high bitwise-equal fraction.
"""

from __future__ import annotations

import pytest
import torch

import hart_fast.ops as ops
from hart_fast.ops import (
    attention,
    ms_attention,
    ms_attention_block_causal,
    ms_attention_block_causal_reference,
    ms_attention_reference,
    qkv_rope_cache,
    qkv_rope_cache_reference,
)

from numerics import assert_close_ulps, assert_mostly_equal, assert_within_2x_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rnd(g, *shape, dtype=torch.float32, device="cpu", mul=1.0):
    return (torch.randn(*shape, generator=g) * mul).to(device=device, dtype=dtype)


def assert_attn_close(out, ref_fn, args, dtype):
    """ref_fn(*args) in dtype vs fp32-upcast: the 2x rule for fp16/bf16, 2e-5 for fp32."""
    up = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    ref32 = ref_fn(*up)
    assert out.dtype == dtype and out.shape == ref32.shape and out.is_contiguous()
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref32, atol=2e-5, rtol=2e-5)
        return
    assert_within_2x_error(out, ref_fn(*args), ref32, ulps=32, ulp_dtype=torch.float32)


def attn_inputs(B, H, lq, S, d, dtype, device, seed=0, q_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = rnd(g, B, H, lq, d, dtype=dtype, device=device, mul=q_scale)
    k = rnd(g, B, H, S, d, dtype=dtype, device=device)
    v = rnd(g, B, H, S, d, dtype=dtype, device=device)
    return q, k, v


# ---------------------------------------------------------------------------
# ms_attention
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [16, 32, 64, 128])
@pytest.mark.parametrize("B,H,lq,S,kv_len", [(1, 1, 1, 1, 1), (2, 3, 5, 70, 67), (1, 2, 33, 200, 129), (2, 1, 64, 64, 64)])
def test_ms_attention_shapes(kernel_device, dtype, d, B, H, lq, S, kv_len):
    q, k, v = attn_inputs(B, H, lq, S, d, dtype, kernel_device, seed=d + lq, q_scale=2.0)
    scale = d**-0.5
    out = ms_attention(q, k, v, kv_len, scale)
    assert_attn_close(out, ms_attention_reference, (q, k, v, kv_len, scale), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lq,kv_len", [(1, 1000), (4, 1000), (256, 600)])
def test_ms_attention_hart_stage_shapes(kernel_device, dtype, lq, kv_len):
    # HART: 24 heads x 64, CFG-doubled batch; kv kept <= 1000 for CPU runtime.
    q, k, v = attn_inputs(2, 24, lq, kv_len + 10, 64, dtype, kernel_device, seed=lq)
    out = ms_attention(q, k, v, kv_len, 0.25 / 8)
    assert_attn_close(out, ms_attention_reference, (q, k, v, kv_len, 0.25 / 8), dtype)


def test_ms_attention_long_cache(kernel_device):
    # The last stage of HART 1024px reads a 9,750-key cache.
    q, k, v = attn_inputs(1, 2, 4, 9750, 64, torch.float32, kernel_device, seed=5, q_scale=3.0)
    out = ms_attention(q, k, v, 9750, 0.125)
    assert_attn_close(out, ms_attention_reference, (q, k, v, 9750, 0.125), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_ms_attention_non_contiguous(kernel_device, dtype):
    # As the model produces q: a permuted view of the (B, l, 3, H, d) projection,
    # and caches read through a strided slice.
    g = torch.Generator().manual_seed(1)
    B, l, H, d = 2, 9, 3, 32
    qkv = rnd(g, B, l, 3, H, d, dtype=dtype, device=kernel_device)
    q = qkv.permute(2, 0, 3, 1, 4)[0]  # (B, H, l, d), non-contiguous
    assert not q.is_contiguous()
    big_k = rnd(g, B, H, 50, 2 * d, dtype=dtype, device=kernel_device)
    big_v = rnd(g, B, H, 50, 2 * d, dtype=dtype, device=kernel_device)
    k, v = big_k[..., :d], big_v[..., d:]  # strided rows
    out = ms_attention(q, k, v, 40, 0.2)
    assert_attn_close(out, ms_attention_reference, (q, k, v, 40, 0.2), dtype)
    # A strided head dim is copied internally.
    out2 = ms_attention(q, big_k[..., ::2], big_v[..., 1::2], 40, 0.2)
    assert_attn_close(out2, ms_attention_reference, (q, big_k[..., ::2], big_v[..., 1::2], 40, 0.2), dtype)


def test_ms_attention_empty(kernel_device):
    q, k, v = attn_inputs(2, 3, 0, 10, 16, torch.float32, kernel_device)
    assert ms_attention(q, k, v, 10, 0.3).shape == (2, 0, 48)
    q, k, v = attn_inputs(0, 3, 4, 10, 16, torch.float32, kernel_device)
    assert ms_attention(q, k, v, 10, 0.3).shape == (0, 4, 48)
    lvl = torch.zeros(0, dtype=torch.int64, device=kernel_device)
    q, k, v = attn_inputs(1, 2, 0, 0, 16, torch.float32, kernel_device)
    assert ms_attention_block_causal(q, k, v, lvl, 0.3).shape == (1, 0, 32)


def test_ms_attention_extreme_scores(kernel_device):
    # Large logits stress the running-max rescaling (no overflow / NaN).
    q, k, v = attn_inputs(1, 2, 7, 300, 16, torch.float32, kernel_device, seed=9, q_scale=30.0)
    out = ms_attention(q, k, v, 300, 1.0)
    assert torch.isfinite(out).all()
    assert_attn_close(out, ms_attention_reference, (q, k, v, 300, 1.0), torch.float32)


def test_ms_attention_cuda_matches_cpu(cuda_kernel_device):
    for lq in (1, 4, 100):  # split-KV path and plain path
        q, k, v = attn_inputs(2, 4, lq, 3000, 64, torch.float32, "cpu", seed=lq)
        cpu = ms_attention(q, k, v, 2900, 0.125)
        gpu = ms_attention(q.cuda(), k.cuda(), v.cuda(), 2900, 0.125).cpu()
        torch.testing.assert_close(gpu, cpu, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------
# ms_attention_block_causal
# ---------------------------------------------------------------------------
def hart_levels(context, patch_nums, device):
    lvl = [0] * context
    for si, pn in enumerate(patch_nums[1:], start=1):
        lvl += [si] * (pn * pn)
    return torch.tensor(lvl, dtype=torch.int64, device=device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [16, 64])
def test_block_causal_hart_levels(kernel_device, dtype, d):
    level = hart_levels(7, (1, 2, 3, 4, 6), kernel_device)  # L = 7 + 4 + 9 + 16 + 36 = 72
    L = level.numel()
    q, k, v = attn_inputs(2, 3, L, L, d, dtype, kernel_device, seed=d, q_scale=2.0)
    out = ms_attention_block_causal(q, k, v, level, d**-0.5)
    assert_attn_close(out, ms_attention_block_causal_reference, (q, k, v, level, d**-0.5), dtype)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_block_causal_random_levels(kernel_device, seed):
    g = torch.Generator().manual_seed(seed)
    L = 97
    level = torch.sort(torch.randint(0, 6, (L,), generator=g)).values.to(kernel_device)
    q, k, v = attn_inputs(1, 2, L, L, 32, torch.float32, kernel_device, seed=seed)
    out = ms_attention_block_causal(q, k, v, level, 0.3)
    assert_attn_close(out, ms_attention_block_causal_reference, (q, k, v, level, 0.3), torch.float32)


def test_block_causal_matches_forward_full_mask():
    # The model's own levels and mask (HartTransformer.lvl_1L, block_causal_bias)
    # are the ones the tests above use and the kernel implements.
    from hart_fast.config import TransformerConfig
    from hart_fast.model.transformer import HartTransformer
    from hart_fast.ops.attention import block_causal_mask

    from tiny_models import TINY_LLM

    cfg = TransformerConfig.from_dict({**TINY_LLM, "context_token": 5, "patch_nums": [1, 2, 3]})
    tr = HartTransformer(cfg, 4, 32)
    level = hart_levels(5, (1, 2, 3), "cpu")
    assert torch.equal(tr.lvl_1L[0], level)
    mask = tr.block_causal_bias("cpu")
    assert torch.equal(block_causal_mask(level), mask)
    assert mask[4, 5].item() == float("-inf") and mask[5, 4].item() == 0.0  # context does not see scale 1


# ---------------------------------------------------------------------------
# qkv_rope_cache
# ---------------------------------------------------------------------------
def rope_inputs(B, l, H, d, S, dtype, device, *, bias=True, l2=False, rope_batch=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = rnd(g, B, l, 3 * H * d, dtype=dtype, device=device, mul=2.0)
    qkv_bias = rnd(g, 3 * H * d, dtype=dtype, device=device, mul=0.5) if bias else None
    rb = B if rope_batch is None else rope_batch
    ang = torch.rand(rb, l, d, generator=g) * 20
    cos, sin = ang.cos().to(device), ang.sin().to(device)
    k_cache = rnd(g, B, H, S, d, dtype=dtype, device=device)
    v_cache = rnd(g, B, H, S, d, dtype=dtype, device=device)
    scale_mul = (torch.rand(H, generator=g) * 10 + 1).to(device) if l2 else None
    return qkv, qkv_bias, cos, sin, k_cache, v_cache, scale_mul


def run_both(args, start):
    qkv, bias, cos, sin, kc, vc, sm = args
    kc1, vc1, kc2, vc2 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    q1 = qkv_rope_cache(qkv, bias, cos, sin, kc1, vc1, start, sm)
    q2 = qkv_rope_cache_reference(qkv, bias, cos, sin, kc2, vc2, start, sm)
    return (q1, kc1, vc1), (q2, kc2, vc2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [16, 64, 128])
@pytest.mark.parametrize("bias", [True, False])
def test_qkv_rope_cache_bitwise(kernel_device, dtype, d, bias):
    args = rope_inputs(2, 13, 3, d, 40, dtype, kernel_device, bias=bias, seed=d)
    (q1, k1, v1), (q2, k2, v2) = run_both(args, start=21)
    assert q1.is_contiguous() and q1.shape == (2, 3, 13, d) and q1.dtype == dtype
    assert torch.equal(q1, q2)
    assert torch.equal(k1, k2)  # includes the untouched positions
    assert torch.equal(v1, v2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_qkv_rope_cache_l2_norm(kernel_device, dtype):
    args = rope_inputs(2, 30, 4, 64, 30, dtype, kernel_device, l2=True, seed=3)
    (q1, k1, v1), (q2, k2, v2) = run_both(args, start=0)
    assert torch.equal(v1, v2)
    for a, b in ((q1, q2), (k1, k2)):
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-6)
        else:
            assert_mostly_equal(a, b, 0.97)
            # One-ulp denominator differences propagate as one-ulp output differences.
            assert_close_ulps(a, b, 2, dtype=dtype)


def test_qkv_rope_cache_shared_tables_and_empty(kernel_device):
    args = rope_inputs(3, 5, 2, 32, 12, torch.bfloat16, kernel_device, rope_batch=1)
    (q1, k1, v1), (q2, k2, v2) = run_both(args, start=7)
    assert torch.equal(q1, q2) and torch.equal(k1, k2) and torch.equal(v1, v2)
    empty = rope_inputs(3, 0, 2, 32, 12, torch.float32, kernel_device)
    (q1, k1, _), (_, k2, _) = run_both(empty, start=12)
    assert q1.shape == (3, 2, 0, 32) and torch.equal(k1, k2)


def test_qkv_rope_cache_cuda_matches_cpu(cuda_kernel_device):
    for dtype in DTYPES:
        args = rope_inputs(2, 17, 3, 64, 40, dtype, "cpu", l2=True)
        (qc, kc, vc), _ = run_both(args, start=3)
        gargs = tuple(a.cuda() if a is not None else None for a in args)
        (qg, kg, vg), _ = run_both(gargs, start=3)
        # RoPE is bitwise; the l2 sums may differ in order (warp tree vs sequential),
        # and a one-ulp denominator moves x*cos + rot(x)*sin by ~ulp(|x|) in absolute terms.
        # (RoPE output elements cancel, so the ulps are of the largest |x|.)
        for g_, c_ in ((qg, qc), (kg, kc)):
            assert_close_ulps(g_, c_, 4, dtype=dtype, scale="max")
        assert torch.equal(vg.cpu(), vc)


# ---------------------------------------------------------------------------
# End to end: a stage sequence through LlamaAttention with a KVCache
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("l2", [False, True])
def test_stage_sequence_matches_llama_attention(kernel_device, l2):
    from hart_fast.config import TransformerConfig
    from hart_fast.model.transformer import KVCache, LlamaAttention, rope_2d

    torch.manual_seed(0)
    cfg = TransformerConfig(embed_dim=64, num_heads=4, depth=1, attn_l2_norm=l2)
    attn = LlamaAttention(cfg).to(kernel_device)
    with torch.no_grad():
        attn.q_bias.normal_(0, 0.3)
        attn.v_bias.normal_(0, 0.3)
        if l2:
            attn.scale_mul_1H11.uniform_(0.5, 5.0)  # exercises clamp_max(log 100)
    H, d, C = attn.H, attn.d, cfg.embed_dim
    B, stages = 2, [3, 1, 4, 9, 16]  # context then pn^2 tokens
    total = sum(stages)
    cache = KVCache(1, B, H, total, d, kernel_device, torch.float32)
    k_cache = torch.zeros(B, H, total, d, device=kernel_device)
    v_cache = torch.zeros_like(k_cache)
    bias = torch.cat((attn.q_bias, attn.zero_k_bias, attn.v_bias)).detach()
    scale_mul = attn.scale_mul_1H11.clamp_max(attn.max_scale_mul).exp().detach() if l2 else None
    start = 0
    with torch.no_grad():
        for si, l in enumerate(stages):
            x = torch.randn(B, l, C, device=kernel_device)
            pos = torch.rand(B, l, 2, device=kernel_device) * 16
            rope = rope_2d(pos, d)
            expected = attn(x, rope, cache, 0, start)
            qkv = torch.nn.functional.linear(x, attn.qkv_proj.weight)  # bias goes to our op
            q = qkv_rope_cache(qkv, bias, rope[0], rope[1], k_cache, v_cache, start, scale_mul)
            o = ms_attention(q, k_cache, v_cache, start + l, attn.scale)
            got = attn.proj(o)
            torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5, msg=f"stage {si}")
            torch.testing.assert_close(k_cache, cache.k[0], atol=2e-6, rtol=2e-6)
            torch.testing.assert_close(v_cache, cache.v[0], atol=2e-6, rtol=2e-6)
            start += l


# ---------------------------------------------------------------------------
# Backend dispatch, fallback, errors, opcheck
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["auto", "ours", "sdpa"])
def test_attention_backends(device, backend):
    q, k, v = attn_inputs(2, 3, 5, 40, 64, torch.float32, device, seed=2)
    out = attention(q, k, v, 33, 0.1, backend=backend)
    torch.testing.assert_close(out, ms_attention_reference(q, k, v, 33, 0.1), atol=2e-5, rtol=2e-5)


def test_attention_backend_errors():
    q, k, v = attn_inputs(1, 1, 2, 4, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="backend"):
        attention(q, k, v, 4, 0.1, backend="xformers")
    import importlib

    attn_mod = importlib.import_module("hart_fast.ops.attention")
    if not attn_mod.HAS_FLASH_ATTN:
        with pytest.raises(ValueError, match="flash_attn"):
            attention(q, k, v, 4, 0.1, backend="flash")


def test_auto_backend_choice(monkeypatch):
    import importlib

    attn_mod = importlib.import_module("hart_fast.ops.attention")
    assert attn_mod._choose_backend(torch.empty(1, 1, 4096, 16), 9750) == "ours"  # CPU: always ours

    class FakeCuda:  # only .device.type and .shape are consulted
        def __init__(self, shape):
            self.shape = shape
            self.device = torch.device("cuda")

    assert attn_mod._choose_backend(FakeCuda((2, 24, 16, 64)), 329) == "ours"
    assert attn_mod._choose_backend(FakeCuda((2, 24, 16, 64)), 9750) == "sdpa"
    assert attn_mod._choose_backend(FakeCuda((2, 24, 25, 64)), 354) == "sdpa"
    assert attn_mod._choose_backend(FakeCuda((32, 24, 4, 64)), 304) == "sdpa"
    inf = float("inf")
    monkeypatch.setattr(attn_mod, "CUDA_CROSSOVER", ((inf, inf, inf, "ours"),))
    assert attn_mod._choose_backend(FakeCuda((32, 24, 4096, 64)), 9750) == "ours"
    # HART_FAST_ATTENTION overrides "auto" on every device; "auto" there means no override.
    monkeypatch.setenv("HART_FAST_ATTENTION", "sdpa")
    assert attn_mod._choose_backend(FakeCuda((2, 24, 16, 64)), 329) == "sdpa"
    assert attn_mod._choose_backend(torch.empty(1, 1, 4, 16), 10) == "sdpa"
    monkeypatch.setenv("HART_FAST_ATTENTION", "auto")
    assert attn_mod._choose_backend(torch.empty(1, 1, 4, 16), 10) == "ours"
    monkeypatch.setenv("HART_FAST_ATTENTION", "cudnn")
    with pytest.raises(ValueError, match=r"HART_FAST_ATTENTION='cudnn' is not an attention backend"):
        attn_mod._choose_backend(torch.empty(1, 1, 4, 16), 10)


def test_env_override_reaches_the_engine(tmp_path, monkeypatch):
    # The whole fast loop follows the override: SDPA everywhere gives the same codes.
    from hart_fast.pipeline import HartPipeline

    from tiny_models import random_prompts, write_model

    d = write_model(str(tmp_path / "m"))
    pipe = HartPipeline.from_pretrained(d, fast=True)
    ctx, mask = random_prompts(2, pipe.config.context_token, pipe.config.context_dim, seed=1)
    calls = []
    real = ops.ms_attention_reference
    import importlib

    attn_mod = importlib.import_module("hart_fast.ops.attention")
    monkeypatch.setattr(attn_mod, "ms_attention_reference", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("HART_FAST_ATTENTION", "sdpa")
    pipe.generate(ctx, mask, seed=0, output_type="latent", residual_diffusion=False)
    assert len(calls) == pipe.config.depth * pipe.config.num_stages


def test_fallback_without_extension(monkeypatch):
    monkeypatch.setattr(ops, "HAS_EXTENSION", False)
    q, k, v = attn_inputs(1, 2, 3, 10, 16, torch.float32, "cpu")
    assert torch.equal(ms_attention(q, k, v, 8, 0.3), ms_attention_reference(q, k, v, 8, 0.3))
    lvl = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 2])
    q2, k2, v2 = attn_inputs(1, 2, 10, 10, 16, torch.float32, "cpu")
    assert torch.equal(
        ms_attention_block_causal(q2, k2, v2, lvl, 0.3), ms_attention_block_causal_reference(q2, k2, v2, lvl, 0.3)
    )
    args = rope_inputs(1, 3, 2, 16, 5, torch.float32, "cpu", l2=True)
    (q1, k1, v1), (q2_, k2_, v2_) = run_both(args, start=1)
    assert torch.equal(q1, q2_) and torch.equal(k1, k2_) and torch.equal(v1, v2_)


def test_errors():
    q, k, v = attn_inputs(1, 2, 3, 10, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="kv_len"):
        ms_attention(q, k, v, 11, 0.1)
    with pytest.raises(ValueError, match="kv_len"):
        ms_attention(q, k, v, 0, 0.1)
    with pytest.raises(TypeError, match="k_cache"):
        ms_attention(q, k.half(), v, 5, 0.1)
    with pytest.raises(ValueError, match="head dim"):
        ms_attention(q[..., :8], k[..., :8], v[..., :8], 5, 0.1)
    with pytest.raises(ValueError, match="v_cache"):
        ms_attention(q, k, v[:, :1], 5, 0.1)
    with pytest.raises(TypeError, match="q"):
        ms_attention(q.long(), k, v, 5, 0.1)
    with pytest.raises(TypeError, match="kv_len"):
        ms_attention(q, k, v, 5.0, 0.1)
    with pytest.raises(ValueError, match="scale"):
        ms_attention(q, k, v, 5, float("nan"))
    lvl = torch.tensor([0, 1, 1])
    qq, kk, vv = attn_inputs(1, 2, 3, 3, 16, torch.float32, "cpu")
    with pytest.raises(TypeError, match="level"):
        ms_attention_block_causal(qq, kk, vv, lvl.int(), 0.1)
    with pytest.raises(ValueError, match="non-decreasing"):
        ms_attention_block_causal(qq, kk, vv, torch.tensor([1, 0, 1]), 0.1)
    with pytest.raises(ValueError, match="level"):
        ms_attention_block_causal(qq, kk, vv, torch.tensor([0, 1]), 0.1)
    qkv, bias, cos, sin, kc, vc, sm = rope_inputs(1, 3, 2, 16, 5, torch.float32, "cpu", l2=True)
    with pytest.raises(ValueError, match="start"):
        qkv_rope_cache(qkv, bias, cos, sin, kc, vc, 3, sm)
    with pytest.raises(TypeError, match="k_cache"):
        qkv_rope_cache(qkv, bias, cos, sin, kc.half(), vc, 0, sm)
    with pytest.raises(TypeError, match="cos"):
        qkv_rope_cache(qkv, bias, cos.double(), sin, kc, vc, 0, sm)
    with pytest.raises(ValueError, match="qkv_bias"):
        qkv_rope_cache(qkv, bias[:-1], cos, sin, kc, vc, 0, sm)
    with pytest.raises(ValueError, match="scale_mul"):
        qkv_rope_cache(qkv, bias, cos, sin, kc, vc, 0, sm[:1])
    with pytest.raises(ValueError, match="qkv"):
        qkv_rope_cache(qkv[..., :-2], bias, cos, sin, kc, vc, 0, sm)


def test_kernel_errors_without_wrapper(requires_extension):
    # The compiled ops validate on their own too (e.g. when called via torch.ops).
    q, k, v = attn_inputs(1, 2, 3, 10, 24, torch.float32, "cpu")
    with pytest.raises(ValueError, match="head dim"):
        torch.ops.hart_fast.ms_attention(q, k, v, 5, 0.1)
    q, k, v = attn_inputs(1, 2, 3, 10, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="kv_len"):
        torch.ops.hart_fast.ms_attention(q, k, v, 11, 0.1)
    kc = torch.zeros(1, 2, 10, 16).transpose(2, 3).contiguous().transpose(2, 3)
    qkv, bias, cos, sin, _, vc, _ = rope_inputs(1, 3, 2, 16, 10, torch.float32, "cpu")
    with pytest.raises(ValueError, match="contiguous"):
        torch.ops.hart_fast.qkv_rope_cache(qkv, bias, cos, sin, kc, vc, 0, None)


def test_opcheck(kernel_device):
    q, k, v = attn_inputs(1, 2, 3, 10, 16, torch.float32, kernel_device)
    torch.library.opcheck(torch.ops.hart_fast.ms_attention, (q, k, v, 7, 0.3))
    lvl = torch.tensor([0, 1, 1, 2, 2, 2, 2, 2, 2, 2], device=kernel_device)
    q2, k2, v2 = attn_inputs(1, 2, 10, 10, 16, torch.bfloat16, kernel_device)
    torch.library.opcheck(torch.ops.hart_fast.ms_attention_block_causal, (q2, k2, v2, lvl, 0.3))
    qkv, bias, cos, sin, kc, vc, sm = rope_inputs(1, 3, 2, 16, 5, torch.float32, kernel_device, l2=True)
    torch.library.opcheck(torch.ops.hart_fast.qkv_rope_cache, (qkv, bias, cos, sin, kc, vc, 1, sm))


def test_portable_cpu_loops(requires_extension):
    # The AVX2/FMA micro-kernels are chosen at run time; the portable loops
    # (other CPUs) are forced with HART_FAST_CPU_NO_AVX2, read once per process.
    import os
    import subprocess
    import sys

    code = (
        "import torch, hart_fast.ops as o\n"
        "g = torch.Generator().manual_seed(0)\n"
        "for lq, d in ((1, 64), (7, 16), (37, 128)):\n"
        "    q, k, v = (torch.randn(2, 3, n, d, generator=g) for n in (lq, 90, 90))\n"
        "    torch.testing.assert_close(o.ms_attention(q, k, v, 77, 0.2), o.ms_attention_reference(q, k, v, 77, 0.2), atol=2e-5, rtol=2e-5)\n"
        "lvl = torch.tensor([0] * 5 + [1] * 9 + [2] * 20)\n"
        "q, k, v = (torch.randn(1, 2, 34, 32, generator=g) for _ in range(3))\n"
        "torch.testing.assert_close(o.ms_attention_block_causal(q, k, v, lvl, 0.3), o.ms_attention_block_causal_reference(q, k, v, lvl, 0.3), atol=2e-5, rtol=2e-5)\n"
    )
    env = dict(os.environ, HART_FAST_CPU_NO_AVX2="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
