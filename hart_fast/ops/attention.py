"""HART's attention pieces: fused qkv/RoPE/cache write, multi-scale attention
over a KV cache, the training-time block-causal attention, and a backend
dispatcher.

Shapes: B = batch (CFG-doubled), l / lq = tokens of the current stage, H =
heads, d = head dim, S = cache length, L = full sequence length.

Numerics:
  * qkv_rope_cache rounds at exactly the points of the reference (bias add,
    F.normalize, .mul(scale_mul), x*cos + rotate_half(x)*sin, each in
    qkv.dtype), so its RoPE is bit-exact; only the l2 norm's sum may be
    ordered differently (one-ulp differences in rare elements).
  * ms_attention / ms_attention_block_causal accumulate in fp32 with an
    online softmax; results agree with SDPA to fp32 rounding noise (fp32) and
    satisfy the 2x-error rule for fp16 / bf16 (the output is rounded once).

Performance (measured; see bench/ and CUDA_CROSSOVER below):
  * CPU (2 cores, fp32, B=2, H=24, d=64): lq 1 / kv 2000 2.8 ms vs SDPA
    3.4 ms; lq 64 / kv 1500 at parity; lq 256 / kv 1000 1.35x slower than
    SDPA (AVX2/FMA micro-kernels chosen at run time; plain SSE2 loops
    otherwise).  "auto" picks ours on CPU, as specified.
  * CUDA: the split-KV decode path (lq <= 16) beats SDPA on HART's small
    stages at batch 1 (+CFG); the SIMT tile kernel (lq > 16, and the
    block-causal op) is 4-30x slower than SDPA's tensor-core kernels on an
    H200 (block-causal L = 9750, B = 2: 56 ms vs 5.2 ms for SDPA with the
    additive mask), so the fast path should keep SDPA for those on CUDA.
  * A Triton flash-attention backend (hart_fast/ops/triton_attention.py,
    backend="triton") targets those large stages with tensor cores; it is
    not timed on a GPU yet, so CUDA_CROSSOVER does not route to it.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from hart_fast.ops._checks import check_float_dtype, check_same_device, check_tensor, use_compiled

_HEAD_DIMS = (16, 32, 64, 128)


def _name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


# ---------------------------------------------------------------------------
# References (ground truth + fallback)
# ---------------------------------------------------------------------------
def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _apply_rope(x_BHld, cos_Bld, sin_Bld):
    cos = cos_Bld.to(x_BHld.dtype).unsqueeze(1)  # (B, 1, l, d)
    sin = sin_Bld.to(x_BHld.dtype).unsqueeze(1)
    return x_BHld * cos + _rotate_half(x_BHld) * sin


def qkv_rope_cache_reference(
    qkv: torch.Tensor,  # (B, l, 3*H*d)
    qkv_bias: torch.Tensor | None,  # (3*H*d,), qkv.dtype
    cos: torch.Tensor,  # (B | 1, l, d) float32
    sin: torch.Tensor,  # (B | 1, l, d) float32
    k_cache: torch.Tensor,  # (B, H, S, d), written at [:, :, start:start+l]
    v_cache: torch.Tensor,  # (B, H, S, d)
    start: int,
    scale_mul: torch.Tensor | None = None,  # (H,) (or (1, H, 1, 1)); enables the l2 norm
) -> torch.Tensor:  # q (B, H, l, d) contiguous, qkv.dtype
    """LlamaAttention.forward up to the cache write (hart_fast/model/transformer.py)."""
    B, l, _ = qkv.shape
    H, d = k_cache.shape[1], k_cache.shape[3]
    if qkv_bias is not None:
        qkv = qkv + qkv_bias
    q, k, v = qkv.view(B, l, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, l, d) each
    if scale_mul is not None:
        # Multiply in qkv.dtype: what the official code does with parameters in that dtype.
        sm = scale_mul.reshape(1, H, 1, 1).to(qkv.dtype)
        q = F.normalize(q, dim=-1).mul(sm)
        k = F.normalize(k, dim=-1)
    q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
    k_cache[:, :, start : start + l] = k
    v_cache[:, :, start : start + l] = v
    return q.contiguous()


def ms_attention_reference(
    q: torch.Tensor,  # (B, H, lq, d)
    k_cache: torch.Tensor,  # (B, H, S, d), S >= kv_len
    v_cache: torch.Tensor,  # (B, H, S, d)
    kv_len: int,
    scale: float,
) -> torch.Tensor:  # (B, lq, H*d), q.dtype
    B, H, lq, d = q.shape
    out = F.scaled_dot_product_attention(q, k_cache[:, :, :kv_len], v_cache[:, :, :kv_len], scale=scale)
    return out.transpose(1, 2).reshape(B, lq, H * d)


def block_causal_mask(level: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(L, L) additive mask: 0 where level[j] <= level[i], -inf elsewhere."""
    zero = torch.zeros((), device=level.device, dtype=dtype)
    return torch.where(level[:, None] >= level[None, :], zero, torch.full_like(zero, -torch.inf))


def ms_attention_block_causal_reference(
    q: torch.Tensor,  # (B, H, L, d)
    k: torch.Tensor,  # (B, H, L, d)
    v: torch.Tensor,  # (B, H, L, d)
    level: torch.Tensor,  # (L,) int64, non-decreasing
    scale: float,
) -> torch.Tensor:  # (B, L, H*d), q.dtype
    B, H, L, d = q.shape
    mask = block_causal_mask(level, q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).reshape(B, L, H * d)


# ---------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------
def _check_int(op: str, name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{op}: expected {name} to be an int, but got {type(v).__name__}.")


def _check_scale(op: str, scale) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{op}: expected scale to be a float, but got {type(scale).__name__}.")
    if not abs(float(scale)) < float("inf"):
        raise ValueError(f"{op}: expected a finite scale, but got {scale}.")


def _check_qkv_like(op: str, q, k, v, names=("q", "k", "v")) -> None:
    for n, t in zip(names, (q, k, v)):
        check_tensor(op, n, t)
    check_float_dtype(op, names[0], q)
    if q.dim() != 4:
        raise ValueError(f"{op}: expected {names[0]} to be 4-D (B, H, lq, d), but got shape {tuple(q.shape)}.")
    B, H, _, d = q.shape
    if d not in _HEAD_DIMS:
        raise ValueError(
            f"{op}: expected head dim 16, 32, 64 or 128, but got {names[0]} with shape {tuple(q.shape)}."
        )
    for n, t in zip(names[1:], (k, v)):
        check_same_device(op, n, t, q, names[0])
        if t.dtype != q.dtype:
            raise TypeError(
                f"{op}: expected {n} to have the same dtype as {names[0]} ({_name(q.dtype)}), but got "
                f"{n} with dtype {_name(t.dtype)}."
            )
        if t.dim() != 4 or t.shape[0] != B or t.shape[1] != H or t.shape[3] != d:
            raise ValueError(
                f"{op}: expected {n} of shape ({B}, {H}, S, {d}) to match {names[0]} {tuple(q.shape)}, "
                f"but got {n} with shape {tuple(t.shape)}."
            )


# ---------------------------------------------------------------------------
# Public ops
# ---------------------------------------------------------------------------
def qkv_rope_cache(
    qkv: torch.Tensor,
    qkv_bias: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    start: int,
    scale_mul: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bias add, optional l2 norm, RoPE of q/k, cache write of k/v; returns q.

    Same semantics as :func:`qkv_rope_cache_reference`.  k_cache / v_cache are
    written in place (they must have qkv's dtype and a contiguous head dim).
    """
    op = "qkv_rope_cache"
    for n, t in (("qkv", qkv), ("cos", cos), ("sin", sin), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(op, n, t)
    check_tensor(op, "qkv_bias", qkv_bias, allow_none=True)
    check_tensor(op, "scale_mul", scale_mul, allow_none=True)
    check_float_dtype(op, "qkv", qkv)
    _check_int(op, "start", start)
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"{op}: expected k_cache and v_cache of the same shape (B, H, S, d), but got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}."
        )
    B, H, S, d = k_cache.shape
    if d % 2 or qkv.dim() != 3 or qkv.shape[0] != B or qkv.shape[2] != 3 * H * d:
        raise ValueError(
            f"{op}: expected qkv of shape ({B}, l, {3 * H * d}) to match k_cache {tuple(k_cache.shape)} "
            f"(even head dim), but got qkv with shape {tuple(qkv.shape)}."
        )
    l = qkv.shape[1]
    if not 0 <= start <= S - l:
        raise ValueError(f"{op}: expected 0 <= start and start + l <= S ({S}), but got start={start}, l={l}.")
    for n, t in (("k_cache", k_cache), ("v_cache", v_cache), ("qkv_bias", qkv_bias)):
        if t is None:
            continue
        check_same_device(op, n, t, qkv, "qkv")
        if t.dtype != qkv.dtype:
            raise TypeError(
                f"{op}: expected {n} to have the same dtype as qkv ({_name(qkv.dtype)}), but got "
                f"{n} with dtype {_name(t.dtype)}."
            )
    if qkv_bias is not None and tuple(qkv_bias.shape) != (3 * H * d,):
        raise ValueError(f"{op}: expected qkv_bias of shape ({3 * H * d},), but got {tuple(qkv_bias.shape)}.")
    for n, t in (("cos", cos), ("sin", sin)):
        check_same_device(op, n, t, qkv, "qkv")
        check_float_dtype(op, n, t, (torch.float32,))
        if t.dim() != 3 or t.shape[0] not in (1, B) or t.shape[1:] != (l, d):
            raise ValueError(
                f"{op}: expected {n} of shape ({B}, {l}, {d}) (or batch 1), but got {tuple(t.shape)}."
            )
    if scale_mul is not None:
        check_same_device(op, "scale_mul", scale_mul, qkv, "qkv")
        check_float_dtype(op, "scale_mul", scale_mul)
        if scale_mul.numel() != H:
            raise ValueError(
                f"{op}: expected scale_mul with {H} elements (one per head), but got shape "
                f"{tuple(scale_mul.shape)}."
            )
    if not use_compiled(qkv):
        return qkv_rope_cache_reference(qkv, qkv_bias, cos, sin, k_cache, v_cache, start, scale_mul)
    if scale_mul is not None:
        # Rounded to qkv.dtype like the reference (the official parameter lives in that dtype).
        scale_mul = scale_mul.reshape(H).to(qkv.dtype).float()
    return torch.ops.hart_fast.qkv_rope_cache(qkv, qkv_bias, cos, sin, k_cache, v_cache, start, scale_mul)


def check_ms_attention_args(op: str, q, k_cache, v_cache, kv_len, scale) -> None:
    """The argument checks of every cached-attention implementation (C++/CUDA, Triton)."""
    _check_qkv_like(op, q, k_cache, v_cache, ("q", "k_cache", "v_cache"))
    _check_int(op, "kv_len", kv_len)
    _check_scale(op, scale)
    if not 1 <= kv_len <= k_cache.shape[2] or kv_len > v_cache.shape[2]:
        raise ValueError(
            f"{op}: expected 1 <= kv_len <= S ({k_cache.shape[2]}), but got kv_len={kv_len}."
        )


def check_block_causal_args(op: str, q, k, v, level, scale) -> None:
    """The argument checks of every block-causal attention implementation."""
    _check_qkv_like(op, q, k, v)
    _check_scale(op, scale)
    check_tensor(op, "level", level)
    check_same_device(op, "level", level, q, "q")
    L = q.shape[2]
    if k.shape[2] != L or v.shape[2] != L:
        raise ValueError(f"{op}: expected k and v with L = {L} keys, got {tuple(k.shape)} and {tuple(v.shape)}.")
    if level.dtype != torch.int64:
        raise TypeError(f"{op}: expected level to have dtype int64, but got {_name(level.dtype)}.")
    if tuple(level.shape) != (L,):
        raise ValueError(f"{op}: expected level of shape ({L},), but got {tuple(level.shape)}.")
    if level.device.type == "cpu" and L > 1 and bool((level[1:] < level[:-1]).any()):
        raise ValueError(f"{op}: expected level to be non-decreasing (keys sorted by scale).")


def ms_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_len: int, scale: float
) -> torch.Tensor:
    """softmax(scale * q k^T) v over keys [0, kv_len) of the caches: (B, lq, H*d)."""
    check_ms_attention_args("ms_attention", q, k_cache, v_cache, kv_len, scale)
    if not use_compiled(q):
        return ms_attention_reference(q, k_cache, v_cache, kv_len, scale)
    return torch.ops.hart_fast.ms_attention(q, k_cache, v_cache, kv_len, float(scale))


def ms_attention_block_causal(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, level: torch.Tensor, scale: float
) -> torch.Tensor:
    """Block-causal attention (a token sees its own and earlier scales): (B, L, H*d).

    level must be non-decreasing (checked on CPU; on CUDA the check would
    synchronise, so it is the caller's contract there).
    """
    check_block_causal_args("ms_attention_block_causal", q, k, v, level, scale)
    if not use_compiled(q):
        return ms_attention_block_causal_reference(q, k, v, level, scale)
    return torch.ops.hart_fast.ms_attention_block_causal(q, k, v, level, float(scale))


# ---------------------------------------------------------------------------
# Backend dispatch
# ---------------------------------------------------------------------------
try:  # optional, never required
    from flash_attn import flash_attn_func as _flash_attn_func  # type: ignore
except Exception:  # noqa: BLE001  (any import failure means "not available")
    _flash_attn_func = None

HAS_FLASH_ATTN = _flash_attn_func is not None

# CUDA crossover: rows (max queries per (b, h), max B*H, max kv_len, backend),
# first match wins, SDPA otherwise.  Must be (re)filled from device benchmarks
# (bench/attention_crossover.py and bench/test_bench_attention.py on the target
# GPU).  Measured on an H200, bf16, H=24, d=64:
#   HART 1024px stage sequence, kernel time back to back (attention_crossover.py):
#     B*H = 48 (batch 1 + CFG):   lq 4 / 9 / 16 (kv 304-329) -> ours 16-20 us vs SDPA
#                                 42-47 us; lq >= 25 -> SDPA (our SIMT tile kernel is
#                                 2-30x slower; SDPA uses tensor cores).
#     B*H = 768 (batch 16 + CFG): SDPA at every stage (lq 4: 64 us vs 41 us).
#   Per call with sync (test_bench_attention.py, B*H = 48): lq 4 / kv 1000 ours 36 us
#   vs 42 us; lq 9 / kv 1500 57 vs 47; lq 16 / kv 1500 67 vs 47; lq 1 / kv 9750
#   107 vs 60: our decode path loses on long caches.
# So our kernel (its split-KV decode path) is chosen only for few-query stages
# of small batches over short caches; backend="ours" forces it anywhere.
CUDA_CROSSOVER = ((16, 64, 1024, "ours"),)

BACKENDS = ("auto", "ours", "sdpa", "flash", "triton")


BACKEND_ENV = "HART_FAST_ATTENTION"  # overrides "auto" for every call, e.g. to time a backend end to end


def _choose_backend(q: torch.Tensor, kv_len: int) -> str:
    forced = os.environ.get(BACKEND_ENV, "").strip()
    if forced and forced != "auto":
        if forced not in BACKENDS:
            raise ValueError(
                f"{BACKEND_ENV}={forced!r} is not an attention backend; expected one of {', '.join(BACKENDS)}."
            )
        return forced
    if q.device.type != "cuda":
        return "ours"
    lq, bh = q.shape[2], q.shape[0] * q.shape[1]
    for max_lq, max_bh, max_kv, backend in CUDA_CROSSOVER:
        if lq <= max_lq and bh <= max_bh and kv_len <= max_kv:
            return backend
    return "sdpa"


def attention(
    q: torch.Tensor,  # (B, H, lq, d)
    k_cache: torch.Tensor,  # (B, H, S, d)
    v_cache: torch.Tensor,  # (B, H, S, d)
    kv_len: int,
    scale: float,
    backend: str = "auto",
) -> torch.Tensor:  # (B, lq, H*d)
    """Attention of one stage over the first kv_len cached keys, by backend.

    "ours": :func:`ms_attention`; "sdpa": PyTorch SDPA; "flash": flash-attn
    (only when importable); "triton": the Triton flash-attention kernel
    (hart_fast/ops/triton_attention.py; CUDA, or the CPU interpreter);
    "auto": ours on CPU, on CUDA by CUDA_CROSSOVER (our kernel for lq <= 16,
    B*H <= 64, kv_len <= 1024; SDPA otherwise; from H200 timings), unless the
    environment variable HART_FAST_ATTENTION names a backend for every call.
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention: expected backend to be one of {BACKENDS}, but got {backend!r}.")
    if backend == "auto":
        backend = _choose_backend(q, kv_len)
    if backend == "ours":
        return ms_attention(q, k_cache, v_cache, kv_len, scale)
    if backend == "sdpa":
        return ms_attention_reference(q, k_cache, v_cache, kv_len, scale)
    if backend == "triton":
        from hart_fast.ops.triton_attention import ms_attention_triton

        return ms_attention_triton(q, k_cache, v_cache, kv_len, scale)
    if _flash_attn_func is None:
        raise ValueError("attention: backend='flash' requested but flash_attn is not importable.")
    B, H, lq, d = q.shape
    out = _flash_attn_func(  # takes (B, l, H, d)
        q.transpose(1, 2), k_cache[:, :, :kv_len].transpose(1, 2), v_cache[:, :, :kv_len].transpose(1, 2),
        softmax_scale=scale,
    )
    return out.reshape(B, lq, H * d)
