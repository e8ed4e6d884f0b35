"""Triton flash-attention kernels for HART's large stages (CUDA; CPU via the interpreter).

Why Triton here: the big stages (hundreds to 4,096 queries over up to 9,750
keys) are tensor-core work. Our hand-written CUDA kernels are SIMT (see
hart_fast/ops/attention.py: 2-30x slower than SDPA there), and a Hopper
kernel in CUDA needs wgmma/TMA code that cannot be checked without the GPU.
Triton lowers ``tl.dot`` to the tensor-core instructions of the card it runs on
(wgmma on sm_90), and its interpreter (``TRITON_INTERPRET=1``) runs the same
kernel on the CPU, so the kernel is tested in CI.

Two kernels, one body:

* ``ms_attention_triton(q, k_cache, v_cache, kv_len, scale)``: the queries of a
  stage against the first ``kv_len`` cached keys, no mask (HART's inference);
* ``ms_attention_block_causal_triton(q, k, v, level, scale)``: the training-time
  pass; query i sees key j iff ``level[j] <= level[i]``. Levels are sorted, so a
  query tile only visits keys up to the end of its last query's level
  (``kv_end``), skipping the masked upper part instead of computing it.

Both return (B, lq, H*d) in q's dtype, like their C++/CUDA siblings, and take
the same arguments (checked by the same functions).

Numerics: online softmax in fp32 with base-2 exponentials (``scale * log2(e)``
folded into the scores), fp32 accumulation; for fp16 / bf16 inputs the
probabilities are rounded to the input dtype before the P @ V product (as
flash-attention and SDPA's flash backend do), for fp32 inputs both products run
in full fp32 (``input_precision="ieee"``: no TF32). Tests hold the results to
SDPA with the tolerances of the other attention kernels.

Performance: not measured yet (no GPU in the session that wrote it); "auto"
does not pick it until ``CUDA_CROSSOVER`` gets a measured "triton" row
(``bench/report.py``'s attention section times it next to ours and SDPA).
"""

from __future__ import annotations

import math
import os

import torch

from hart_fast.ops.attention import check_block_causal_args, check_ms_attention_args
from hart_fast.ops.triton_epilogues import launch_device, triton_available

_KERNEL = None
_LOG2E = 1.0 / math.log(2.0)


def _build_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _attn_fwd(Q, K, V, Out, KvEnd, qk_scale, kv_len, lq, H,
                  sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_m,
                  HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_CAUSAL: tl.constexpr, IEEE: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_D)
        m_ok = offs_m < lq
        q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_m + offs_d[None, :],
                    mask=m_ok[:, None], other=0.0)
        if BLOCK_CAUSAL:
            # Keys [0, kv_end[i]) are visible to query i; kv_end is non-decreasing.
            q_end = tl.load(KvEnd + offs_m, mask=m_ok, other=0)
            hi = tl.load(KvEnd + tl.minimum(pid_m * BLOCK_M + BLOCK_M, lq) - 1)
        else:
            hi = kv_len
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, HEAD_D), dtype=tl.float32)
        k_base = K + b * sk_b + h * sk_h
        v_base = V + b * sv_b + h * sv_h
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_ok = offs_n < hi
            k = tl.load(k_base + offs_n[:, None] * sk_n + offs_d[None, :], mask=n_ok[:, None], other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = s * qk_scale
            if BLOCK_CAUSAL:
                visible = offs_n[None, :] < q_end[:, None]
            else:
                visible = n_ok[None, :]
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # Rows with nothing visible yet keep m = -inf; use 0 as the shift there.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_shift[:, None])
            alpha = tl.math.exp2(m_i - m_shift)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            v = tl.load(v_base + offs_n[:, None] * sv_n + offs_d[None, :], mask=n_ok[:, None], other=0.0)
            if IEEE:
                acc += tl.dot(p, v, input_precision="ieee")
            else:
                acc += tl.dot(p.to(v.dtype), v)
            m_i = m_new
        # l_i > 0 for every stored row (a query always sees a key); padded rows are 0.
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_ptr = Out + b * so_b + offs_m[:, None] * so_m + h * HEAD_D + offs_d[None, :]
        tl.store(o_ptr, out.to(Out.dtype.element_ty), mask=m_ok[:, None])

    return _attn_fwd


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _launch_config(lq: int, d: int, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): flash-attention's usual Hopper
    shapes for the big stages, smaller query tiles for small stages."""
    if lq >= 128 and dtype != torch.float32:
        block_m, warps = 128, 8
    elif lq > 32:
        block_m, warps = 64, 4
    else:
        block_m, warps = 16, 4
    block_n = 64 if d <= 64 else 32
    return block_m, block_n, warps, 3


def _launch(q, k, v, kv_len: int, scale: float, kv_end=None) -> torch.Tensor:
    global _KERNEL
    if not triton_available(q.device):
        raise ValueError(
            f"attention backend 'triton' cannot run on {q.device} tensors: it needs a CUDA device and the "
            f"triton package (or TRITON_INTERPRET=1 to run Triton's CPU interpreter)."
        )
    if _interpreting() and q.dtype == torch.bfloat16:
        raise ValueError("attention backend 'triton': the Triton interpreter supports float32 and float16 only.")
    if _KERNEL is None:
        _KERNEL = _build_kernel()
    B, H, lq, d = q.shape
    if q.stride(-1) != 1:
        q = q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    out = torch.empty(B, lq, H * d, device=q.device, dtype=q.dtype)
    if B * H * lq == 0:
        return out
    block_m, block_n, warps, stages = _launch_config(lq, d, q.dtype)
    grid = ((lq + block_m - 1) // block_m, B * H)
    opts = {} if _interpreting() else {"num_warps": warps, "num_stages": stages}
    with launch_device(q):
        _KERNEL[grid](
            q, k, v, out, kv_end if kv_end is not None else out, float(scale) * _LOG2E, kv_len, lq, H,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1),
            HEAD_D=d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_CAUSAL=kv_end is not None,
            IEEE=q.dtype == torch.float32, **opts,
        )
    return out


def ms_attention_triton(
    q: torch.Tensor,  # (B, H, lq, d)
    k_cache: torch.Tensor,  # (B, H, S, d)
    v_cache: torch.Tensor,  # (B, H, S, d)
    kv_len: int,
    scale: float,
) -> torch.Tensor:  # (B, lq, H*d), q.dtype
    """softmax(scale * q k^T) v over keys [0, kv_len) of the caches, as ms_attention."""
    check_ms_attention_args("ms_attention_triton", q, k_cache, v_cache, kv_len, scale)
    return _launch(q, k_cache, v_cache, kv_len, scale)


def ms_attention_block_causal_triton(
    q: torch.Tensor,  # (B, H, L, d)
    k: torch.Tensor,  # (B, H, L, d)
    v: torch.Tensor,  # (B, H, L, d)
    level: torch.Tensor,  # (L,) int64, non-decreasing
    scale: float,
) -> torch.Tensor:  # (B, L, H*d), q.dtype
    """Block-causal attention as ms_attention_block_causal, skipping invisible key tiles."""
    check_block_causal_args("ms_attention_block_causal_triton", q, k, v, level, scale)
    # kv_end[i] = number of keys with level <= level[i] (levels sorted): no host sync.
    kv_end = torch.searchsorted(level, level, right=True).to(torch.int32)
    return _launch(q, k, v, q.shape[2], scale, kv_end)


__all__ = ["ms_attention_triton", "ms_attention_block_causal_triton"]
