"""The Triton flash-attention kernels (hart_fast/ops/triton_attention.py) vs SDPA.

Tolerances, as for the other attention kernels (test_ops_attention.py):
fp32 within 2e-5 of SDPA (both products run in full fp32 precision, no TF32);
fp16 / bf16 by the flash-attention rule, error vs the fp32-upcast reference at
most 2x the error of the reference evaluated in the low dtype (+1e-5). The
kernel rounds the softmax probabilities to the input dtype before P @ V, as
flash-attention does; the measured ratio on the interpreter shapes was <= 1.34.

On the CPU the kernels run under Triton's interpreter (fp32 / fp16 only, small
shapes: it is slow), and are compiled ahead of time for sm_90 to check that they
lower for Hopper with wgmma tensor-core instructions (and, for the epilogue,
without FMA contraction); on a GPU the CUDA tests cover HART's real stage shapes.
"""

from __future__ import annotations

import pytest
import torch

from hart_fast.ops import attention, ms_attention_block_causal_reference, ms_attention_reference
from hart_fast.ops.triton_attention import ms_attention_block_causal_triton, ms_attention_triton

from test_ops_attention import assert_attn_close, attn_inputs  # noqa: E402
from triton_interpreter import run_with_triton_interpreter  # noqa: E402

NO_CUDA = "no CUDA device on this machine (the Triton kernels' GPU tests run on the device machine)"
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)

HART_LEVELS = [1, 4, 9, 16, 25, 49]  # tokens per scale of a small HART-like sequence


def hart_levels(sizes, device="cpu"):
    return torch.cat([torch.full((n,), i, dtype=torch.int64) for i, n in enumerate(sizes)]).to(device)


def test_interpreter_matches_sdpa():
    run_with_triton_interpreter("""
        import torch
        from hart_fast.ops import attention, ms_attention_reference, ms_attention_block_causal_reference
        from hart_fast.ops.triton_attention import ms_attention_triton, ms_attention_block_causal_triton
        from test_ops_attention import assert_attn_close, attn_inputs
        from test_ops_triton_attention import HART_LEVELS, hart_levels

        for dtype in (torch.float32, torch.float16):
            # (B, H, lq, S, kv_len, d): one query, a few, more than a query tile, ragged tiles.
            for B, H, lq, S, kv, d in [(1, 1, 1, 1, 1, 16), (2, 3, 5, 70, 67, 64), (1, 2, 33, 200, 129, 32),
                                       (2, 1, 64, 64, 64, 128), (1, 2, 130, 300, 300, 64)]:
                q, k, v = attn_inputs(B, H, lq, S, d, dtype, "cpu", seed=lq + d, q_scale=2.0)
                scale = d ** -0.5
                out = ms_attention_triton(q, k, v, kv, scale)
                assert_attn_close(out, ms_attention_reference, (q, k, v, kv, scale), dtype)
                torch.testing.assert_close(attention(q, k, v, kv, scale, backend="triton"), out, atol=0, rtol=0)
            # The cache views the engine passes: q and k/v with batch/head strides of a bigger buffer.
            q, k, v = attn_inputs(2, 4, 9, 40, 16, dtype, "cpu", seed=7)
            out = ms_attention_triton(q[:, 1:3], k[:, 1:3], v[:, 1:3], 31, 0.25)
            assert_attn_close(out, ms_attention_reference, (q[:, 1:3], k[:, 1:3], v[:, 1:3], 31, 0.25), dtype)

            level = hart_levels(HART_LEVELS)
            L = level.numel()
            q, k, v = attn_inputs(2, 2, L, L, 16, dtype, "cpu", seed=11)
            out = ms_attention_block_causal_triton(q, k, v, level, 0.3)
            assert_attn_close(out, ms_attention_block_causal_reference, (q, k, v, level, 0.3), dtype)
        print("OK")
    """)


def test_refused_where_it_cannot_run():
    # In this process TRITON_INTERPRET is unset: CPU tensors have no Triton backend.
    q, k, v = attn_inputs(1, 1, 2, 4, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="backend 'triton' cannot run on cpu tensors"):
        ms_attention_triton(q, k, v, 4, 0.25)
    with pytest.raises(ValueError, match="backend 'triton' cannot run on cpu tensors"):
        attention(q, k, v, 4, 0.25, backend="triton")


def test_argument_checks_shared_with_ms_attention():
    q, k, v = attn_inputs(1, 2, 3, 8, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"ms_attention_triton: expected 1 <= kv_len <= S \(8\)"):
        ms_attention_triton(q, k, v, 9, 0.25)
    with pytest.raises(ValueError, match="ms_attention_block_causal_triton: expected level of shape"):
        ms_attention_block_causal_triton(q, q, q, torch.zeros(2, dtype=torch.int64), 0.25)


def test_interpreter_refuses_bf16():
    run_with_triton_interpreter("""
        import torch
        from hart_fast.ops.triton_attention import ms_attention_triton
        q = torch.zeros(1, 1, 2, 16, dtype=torch.bfloat16)
        try:
            ms_attention_triton(q, q, q, 2, 0.25)
        except ValueError as e:
            assert "float32 and float16 only" in str(e), e
        else:
            raise AssertionError("bf16 ran under the interpreter")
        print("OK")
    """)


# ---------------------------------------------------------------------------
# On the GPU: HART's real stage shapes (24 heads x 64, CFG-doubled batch)
# ---------------------------------------------------------------------------
@cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("B,lq,kv_len", [(2, 1, 301), (2, 16, 330), (2, 49, 403), (2, 81, 484), (2, 256, 1000),
                                         (2, 2304, 5654), (2, 4096, 9750), (16, 441, 1580)])
def test_cuda_hart_stage_shapes(dtype, B, lq, kv_len):
    q, k, v = attn_inputs(B, 24, lq, kv_len + 7, 64, dtype, "cuda", seed=lq, q_scale=2.0)
    out = ms_attention_triton(q, k, v, kv_len, 0.125)
    assert_attn_close(out, ms_attention_reference, (q, k, v, kv_len, 0.125), dtype)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lq", [49, 300], ids=lambda n: f"lq{n}")
def test_cuda_strided_views_and_head_dims(dtype, lq):
    # q a strided view (heads 1..3 of 5), k / v caches longer than kv_len, d != 64.
    for d in (32, 128):
        q5, k, v = attn_inputs(2, 5, lq, 700, d, dtype, "cuda", seed=d + lq)
        q = q5[:, 1:4]
        k, v = k[:, 1:4], v[:, 1:4]
        out = ms_attention_triton(q, k, v, 650, d ** -0.5)
        assert_attn_close(out, ms_attention_reference, (q, k, v, 650, d ** -0.5), dtype)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_block_causal_hart_sequence(dtype):
    sizes = [300] + [p * p for p in (2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36)]
    level = hart_levels(sizes, "cuda")
    L = level.numel()
    q, k, v = attn_inputs(2, 24, L, L, 64, dtype, "cuda", seed=3)
    out = ms_attention_block_causal_triton(q, k, v, level, 0.125)
    assert_attn_close(out, ms_attention_block_causal_reference, (q, k, v, level, 0.125), dtype)


@cuda_only
def test_cuda_graph_capture():
    q, k, v = attn_inputs(2, 24, 256, 1100, 64, torch.float16, "cuda", seed=5)
    eager = ms_attention_triton(q, k, v, 1000, 0.125)  # also compiles before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ms_attention_triton(q, k, v, 1000, 0.125)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


# ---------------------------------------------------------------------------
# Without a GPU: the kernels compile for Hopper, with tensor-core instructions
# ---------------------------------------------------------------------------
def _compile_for_sm90(fn, signature, constexprs, num_warps, **options):
    """Ahead-of-time compile of a @triton.jit function for sm_90 (no device needed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": 3, **options})


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("block_causal", [False, True], ids=["cached", "block_causal"])
def test_compiles_for_hopper_with_wgmma(dtype, block_causal):
    # Checks in CI what only a GPU session could otherwise show: the kernel lowers
    # for sm_90 (ptxas included) and its products use Hopper's wgmma tensor-core
    # instructions rather than a SIMT fallback.
    import hart_fast.ops.triton_attention as ta

    ptr = "*" + dtype
    sig = {"Q": ptr, "K": ptr, "V": ptr, "Out": ptr, "KvEnd": "*i32", "qk_scale": "fp32", "kv_len": "i32",
           "lq": "i32", "H": "i32"}
    sig.update({name: "i64" for name in ("sq_b", "sq_h", "sq_m", "sk_b", "sk_h", "sk_n", "sv_b", "sv_h", "sv_n",
                                         "so_b", "so_m")})
    block_m, block_n, warps, _ = ta._launch_config(4096, 64, torch.float16)
    compiled = _compile_for_sm90(ta._build_kernel(), sig, {"HEAD_D": 64, "BLOCK_M": block_m, "BLOCK_N": block_n,
                                                           "BLOCK_CAUSAL": block_causal, "IEEE": False}, warps)
    assert "wgmma" in compiled.asm["ptx"]
    assert len(compiled.asm["cubin"]) > 0


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_gated_residual_compiles_for_hopper(dtype):
    import hart_fast.ops.triton_epilogues as te

    ptr = "*" + dtype
    sig = {"x_ptr": ptr, "g_ptr": ptr, "h_ptr": ptr, "out_ptr": ptr, "n_cols": "i32", "g_div": "i32",
           "sx": "i64", "sg": "i64", "sh": "i64", "so": "i64"}
    # As launched: no FMA contraction, so `x + round(gate * h)` keeps torch's two
    # roundings (Triton turns them into a correctly rounded multiply and add in the
    # storage type, which equal torch's fp32 compute-then-round: fp32 has the
    # 2p + 2 bits that make that double rounding innocuous for fp16 and bf16).
    ptx = _compile_for_sm90(te._build_kernel(), sig, {"BLOCK": 1024}, 4, enable_fp_fusion=False).asm["ptx"]
    assert "fma.rn" not in ptx and "mul.rn" in ptx and "add.rn" in ptx
    fused = _compile_for_sm90(te._build_kernel(), sig, {"BLOCK": 1024}, 4).asm["ptx"]
    assert "fma.rn" in fused  # what the default would have done
