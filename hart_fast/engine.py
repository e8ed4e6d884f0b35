"""The fast backend of the generation loop: HART's stages on hart_fast's kernels.

The loop itself is hart_fast.generation (shared with the reference backend,
hart_fast.reference); this module supplies its steps on the fast path:

- Static state per batch size: the KV cache (both CFG halves, the whole
  sequence) and the per-stage input/output buffers are allocated once and reused
  by every later call with the same batch size.
- Per block: fused RMSNorm + AdaLN modulate, each gated residual add fused
  into the norm that follows it (`add_rms_norm_modulate`: the attention
  output's add into the FFN's norm, the FFN output's add into the next block's
  attention norm; the last block's add is a Triton epilogue on CUDA), the qkv
  projection's epilogue fused with RoPE and the cache append (`qkv_rope_cache`),
  and attention over the cache by the backend the kernel plan fixed for the
  stage (hart_fast.kernel_plan: our kernel, SDPA, flash-attn or Triton).  RoPE
  tables are computed once per call.
- On CUDA each stage's transformer pass (all blocks + the head) is captured in a
  CUDA graph per batch size and replayed: the small stages are launch-bound.
  Sampling, the VQ glue and the residual diffusion run between the replays, with
  no host synchronisation anywhere in the loop.
- CFG + top-k in one kernel (`cfg_top_k_filter`), the VQ glue fused
  (`next_scale_input_fast`), the residual diffusion restructured
  (`sample_residual_fast`).
- Memory: the static state of a batch size is large at the real shape (the KV
  cache alone is 2.9 GB at batch 1 in fp16, 23 GB at batch 8).  On CUDA the
  states of every batch size seen are kept (their graphs are worth keeping)
  until an allocation runs out of memory: then the others are freed and the
  allocation retried (`state`, and `HartPipeline.generate` around a whole run or
  decode).  On the CPU, where there are no graphs and allocation is cheap, only
  the most recent batch size's state is kept.  `release` frees them on request.

Which kernel serves which op is decided once, when the engine is built
(`self.plan`); an op a kernel does not cover runs its reference, never fails.
"""

from __future__ import annotations

import gc
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from hart_fast import ops
from hart_fast.generation import first_rows
from hart_fast.kernel_plan import KernelPlan
from hart_fast.model.diffusion_fast import release_graph, sample_residual_fast
from hart_fast.model.transformer import AdaLNSelfAttn, FFN, HartTransformer, LlamaMLP
from hart_fast.ops.triton_epilogues import gated_residual, gated_residual_reference
from hart_fast.ops.vq_glue import next_scale_input_fast
from hart_fast.pruning import gather_tokens, pivotal_tokens, restore
from hart_fast.sampling import filter_top_k_top_p_


class _BlockWeights:
    """A block's weights in the form the fused path wants (views, no copies), and its
    projections as callables: float (F.linear on the weights), or int8 / fp8
    (hart_fast.quantize) for the `weights` lever of that name."""

    def __init__(self, block: AdaLNSelfAttn, weights: str = "float"):
        a = block.attn
        self.block = block
        self.norm_w = block.ln_wo_grad.weight
        self.eps = block.ln_wo_grad.eps
        self.qkv_w = a.qkv_proj.weight
        self.qkv_b = torch.cat((a.q_bias, a.zero_k_bias, a.v_bias))
        self.scale = a.scale
        self.H, self.d = a.H, a.d
        self.scale_mul = (
            a.scale_mul_1H11.clamp_max(a.max_scale_mul).exp().reshape(-1).contiguous() if a.attn_l2_norm else None
        )
        self.ffn = block.ffn
        if weights == "float":
            self.qkv = lambda h: F.linear(h, self.qkv_w, self.qkv_b)
            self.proj = a.proj
            self.ffn_fn = lambda h: _ffn(block.ffn, h)
            return
        from hart_fast.quantize import QUANTIZED

        quantized, from_linear = QUANTIZED[weights]
        self.qkv = quantized(self.qkv_w, self.qkv_b)
        self.proj = from_linear(a.proj)
        if isinstance(block.ffn, FFN):
            fc1, fc2 = from_linear(block.ffn.fc1), from_linear(block.ffn.fc2)
            self.ffn_fn = lambda h: fc2(F.gelu(fc1(h), approximate="tanh"))
        else:
            gate, up, down = (from_linear(block.ffn.gate_proj), from_linear(block.ffn.up_proj),
                              from_linear(block.ffn.down_proj))
            self.ffn_fn = lambda h: down(F.silu(gate(h)) * up(h))


def _ffn(ffn, h):
    if isinstance(ffn, FFN):
        return ffn.fc2(F.gelu(ffn.fc1(h), approximate="tanh"))
    assert isinstance(ffn, LlamaMLP)
    return ffn.down_proj(F.silu(ffn.gate_proj(h)) * ffn.up_proj(h))


class StageState:
    """Static buffers of one batch size: KV cache, stage inputs, RoPE tables, graphs,
    and the attention backend of every stage (fixed by the plan from its shapes)."""

    def __init__(self, tr: HartTransformer, B2: int, device, dtype, plan: Optional[KernelPlan] = None):
        cfg = tr.cfg
        H, d, S = cfg.num_heads, cfg.head_dim, cfg.total_tokens
        self.k = [torch.empty(B2, H, S, d, device=device, dtype=dtype) for _ in range(cfg.depth)]
        self.v = [torch.empty(B2, H, S, d, device=device, dtype=dtype) for _ in range(cfg.depth)]
        slices = tr.stage_slices()
        self.x = [torch.empty(B2, e - s, cfg.embed_dim, device=device, dtype=dtype) for s, e in slices]
        self.cos = [torch.empty(B2, e - s, d, device=device, dtype=torch.float32) for s, e in slices]
        self.sin = [torch.empty(B2, e - s, d, device=device, dtype=torch.float32) for s, e in slices]
        plan = plan or KernelPlan.for_model(cfg, device, dtype)
        self.attn_backend = [plan.attention_backend(e - s, B2 * H, e) for s, e in slices]
        self.mods: Optional[List] = None
        self.head_mod: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        # Keyed by (stage, rows): rows is B2, or B2 // 2 once the unconditional half is dropped.
        self.graphs: Dict[Tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.out: Dict[Tuple[int, int], Tuple[torch.Tensor, torch.Tensor]] = {}


class FastEngine:
    """The fast backend (see hart_fast.generation): fused kernels, static buffers, CUDA graphs."""

    def __init__(self, transformer: HartTransformer, tokenizer, use_cuda_graphs: Optional[bool] = None,
                 weights: str = "float", states: Optional[Dict[int, "StageState"]] = None):
        self.tr, self.tok = transformer, tokenizer
        w = transformer.word_embed.weight
        self.device, self.dtype = w.device, w.dtype
        self.plan = KernelPlan.for_model(transformer.cfg, self.device, self.dtype)
        # weights "int8" / "fp8" (the int8_weights / fp8_weights speed levers,
        # hart_fast.quantize): the blocks' and the head's projections run as int8 or
        # fp8 GEMMs.  Int8Linear refuses weights off the CPU.
        if weights not in ("float", "int8", "fp8"):
            raise ValueError(f"weights must be 'float', 'int8' or 'fp8', got {weights!r}")
        self.weights = weights
        self.blocks = [_BlockWeights(b, weights) for b in transformer.blocks]
        if weights != "float":
            from hart_fast.quantize import QUANTIZED

            head_q = QUANTIZED[weights][1](transformer.head)
            self._logits = lambda h, mod: head_q(transformer.head_nm(h.float(), mod)).float()
        else:
            self._logits = transformer.logits
        on_cuda = self.device.type == "cuda"
        self.use_cuda_graphs = on_cuda if use_cuda_graphs is None else (use_cuda_graphs and on_cuda)
        # states: another engine's static state (KV cache, buffers) to share, so a
        # quantised engine beside the float one costs no second cache.  Only without
        # CUDA graphs: a graph replays the weights it was captured with.
        if states is not None and self.use_cuda_graphs:
            raise ValueError("an engine with CUDA graphs cannot share another engine's static state")
        self.states: Dict[int, StageState] = {} if states is None else states
        # Keep the state of every batch size seen (worth it for their graphs), or
        # only the latest one (see the module docstring).
        self.keep_all_states = self.use_cuda_graphs
        self._st: Optional[StageState] = None
        # The last block's gated residual add: the Triton epilogue where the plan has it.
        self._last_add = gated_residual if self.plan.use_triton_epilogue else gated_residual_reference
        self._qkv_rope_cache = ops.qkv_rope_cache if self.plan.use_compiled_qkv else ops.qkv_rope_cache_reference

    # -- one transformer pass over a stage ---------------------------------------
    def _block(self, bw: _BlockWeights, x, pending, mod, cos, sin, k_cache, v_cache, start: int,
               kv_len: int, attn_backend: str):
        """One block; returns (x, pending) where pending = (ffn_out, gamma2) is the
        block's last gated residual add, left for the next norm to fuse."""
        if mod is None:
            scale1 = shift1 = scale2 = shift2 = gamma1 = gamma2 = None
        else:
            gamma1, gamma2, scale1, scale2, shift1, shift2 = mod
        if pending is None:
            h = ops.rms_norm_modulate(x, bw.norm_w, scale1, shift1, bw.eps)
        else:  # the previous block's `x + ffn(h) * gamma2`, fused with this norm
            x, h = ops.add_rms_norm_modulate(x, pending[0], pending[1], bw.norm_w, scale1, shift1, bw.eps)
        qkv = bw.qkv(h)
        # qkv already carries its bias (inside F.linear, as the official code adds it).
        q = self._qkv_rope_cache(qkv, None, cos, sin, k_cache, v_cache, start, bw.scale_mul)
        a = bw.proj(ops.attention(q, k_cache, v_cache, kv_len, bw.scale, backend=attn_backend))
        x, h = ops.add_rms_norm_modulate(x, a, gamma1, bw.norm_w, scale2, shift2, bw.eps)
        return x, (bw.ffn_fn(h), gamma2)

    def _stage_forward(self, st: StageState, si: int, rows: Optional[int] = None):
        """The stage over the first `rows` rows of the static state: all of them, or
        the conditional half once the unconditional branch is dropped (views, so the
        cache the earlier stages wrote is what the conditional rows read)."""
        start, end = self.tr.stage_slices()[si]
        rows = st.x[si].shape[0] if rows is None else rows
        mods, head_mod, cos, sin = self._row_views(st, si, rows)
        x, pending = st.x[si][:rows], None
        for i, bw in enumerate(self.blocks):
            x, pending = self._block(bw, x, pending, mods[i], cos, sin, st.k[i][:rows], st.v[i][:rows], start, end,
                                     st.attn_backend[si])
        f, gamma2 = pending
        x = x + f if gamma2 is None else self._last_add(x, gamma2, f)
        return x, self._logits(x, head_mod)

    @staticmethod
    def _row_views(st: StageState, si: int, rows: int):
        """The modulations, head modulation and RoPE tables of stage si for the first
        `rows` rows (views: all rows, or the conditional half)."""
        full = rows == st.x[si].shape[0]
        mods = st.mods if full else first_rows(st.mods, rows)
        head_mod = st.head_mod if full else first_rows(st.head_mod, rows)
        return mods, head_mod, st.cos[si][:rows], st.sin[si][:rows]

    def _run_stage(self, st: StageState, si: int, rows: Optional[int] = None):
        rows = st.x[si].shape[0] if rows is None else rows
        if not self.use_cuda_graphs:
            return self._stage_forward(st, si, rows)
        key = (si, rows)  # a stage with and without its unconditional half: two graphs
        if key not in st.graphs:
            # Warm up on a side stream (allocator pools, lazy inits), then capture.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._stage_forward(st, si, rows)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                st.out[key] = self._stage_forward(st, si, rows)
            st.graphs[key] = graph
        st.graphs[key].replay()
        return st.out[key]

    # -- the pruning lever's stages (eager: which tokens run depends on the input) --
    def _block_unfused(self, bw: _BlockWeights, x, mod, cos, sin, k_cache, v_cache, start: int, attn_backend: str,
                       n_keep: Optional[int] = None, ref=None, pn: int = 0):
        """One block with plain residual adds; returns (x, (attention out, FFN out)),
        the outputs before their gates.  With n_keep, the attention and the FFN run
        on the pivotal tokens only and `ref` (the reference stage's outputs of this
        block) refills the rest (hart_fast.pruning); n_keep keys are cached at start."""
        g1, g2, s1, s2, h1, h2 = (None,) * 6 if mod is None else mod
        if n_keep is None:
            xa, ca, sa = x, cos, sin
        else:
            idx = pivotal_tokens(x, n_keep)
            xa, ca, sa = gather_tokens(x, idx), gather_tokens(cos, idx), gather_tokens(sin, idx)
        h = ops.rms_norm_modulate(xa, bw.norm_w, s1, h1, bw.eps)
        q = self._qkv_rope_cache(bw.qkv(h), None, ca, sa, k_cache, v_cache, start,
                                 bw.scale_mul)
        a = bw.proj(ops.attention(q, k_cache, v_cache, start + xa.shape[1], bw.scale, backend=attn_backend))
        if n_keep is not None:
            a = restore(ref[0], a, idx, pn)
        x = x + (a if g1 is None else a * g1)
        if n_keep is None:
            xf = x
        else:
            idx = pivotal_tokens(x, n_keep)
            xf = gather_tokens(x, idx)
        f = bw.ffn_fn(ops.rms_norm_modulate(xf, bw.norm_w, s2, h2, bw.eps))
        if n_keep is not None:
            f = restore(ref[1], f, idx, pn)
        return x + (f if g2 is None else f * g2), (a, f)

    def _prune_stage(self, st: StageState, si: int, x, rows: int):
        """The reference stage (recording its sub-layer outputs) or a pruned stage."""
        p = self.prune
        n_keep = p.keep.get(si)
        mods, head_mod, cos, sin = self._row_views(st, si, rows)
        recorded = []
        for i, bw in enumerate(self.blocks):
            x, outs = self._block_unfused(bw, x, mods[i], cos, sin, st.k[i][:rows], st.v[i][:rows], self.offset,
                                          st.attn_backend[si], n_keep,
                                          None if n_keep is None else self.ref_outputs[i], p.patch_nums[si])
            recorded.append(outs)
        if n_keep is None:
            self.ref_outputs = recorded
        return x, self._logits(x, head_mod)

    # -- static state per batch size ---------------------------------------------
    def state(self, B2: int) -> StageState:
        """The static state for B2 rows (CFG-doubled batch), built on first use."""
        st = self.states.pop(B2, None)
        if st is None:
            if not self.keep_all_states:
                self.states.clear()
            try:
                st = StageState(self.tr, B2, self.device, self.dtype, self.plan)
            except torch.OutOfMemoryError:
                if not self.release():
                    raise
                # Other batch sizes' buffers and graphs are freed: once more.
                st = StageState(self.tr, B2, self.device, self.dtype, self.plan)
        self.states[B2] = st  # insertion order = least recently used first
        return st

    def release(self, keep: Optional[int] = None) -> bool:
        """Free the static state (KV cache, stage buffers, CUDA graphs and their
        memory pools) of every batch size except ``keep`` (CFG-doubled rows), and,
        when nothing is kept, the residual diffusion's captured graph.  Returns
        whether anything was freed; later calls rebuild what they need."""
        dropped = [b for b in self.states if b != keep]
        for b in dropped:
            if self._st is self.states[b]:
                self._st = None
            del self.states[b]
        freed = bool(dropped)
        if keep is None:
            freed = release_graph(self.tr.diffloss.net) or freed
        if freed and self.device.type == "cuda":
            gc.collect()  # graphs and their pools go with the last reference
            torch.cuda.empty_cache()
        return freed

    @staticmethod
    def _set_static(dst_list, values):
        """Copy per-call tensors into static storage (graph inputs must keep their address)."""
        out = []
        for i, v in enumerate(values):
            if v is None:
                out.append(None)
                continue
            if dst_list is None or dst_list[i] is None:
                out.append(tuple(t.clone() for t in v))
            else:
                for d_, s_ in zip(dst_list[i], v):
                    d_.copy_(s_)
                out.append(dst_list[i])
        return out

    # -- the backend interface (hart_fast.generation) ----------------------------
    def begin(self, mods, head_mod, pos2, prune=None):
        tr = self.tr
        self.prune = prune          # a hart_fast.pruning.PrunePlan, or None
        self.offset = 0             # the cache's filled length: where the next stage writes
        self.ref_outputs = None     # per block, the reference stage's (attention, FFN) outputs
        self.stage_work = []        # (stage, rows, tokens per block) of every pass: what really ran
        st = self.state(pos2.shape[0])
        st.mods = self._set_static(st.mods, mods)
        st.head_mod = self._set_static([st.head_mod], [head_mod])[0]
        for si in range(tr.cfg.num_stages):  # RoPE tables of every stage, once per call
            cos, sin = tr.stage_rope(si, pos2)
            st.cos[si].copy_(cos)
            st.sin[si].copy_(sin)
        self._st = st
        self._rows = pos2.shape[0]

    def stage(self, si, x_2BlC):
        st, p, rows = self._st, self.prune, self._rows
        tokens = x_2BlC.shape[1]
        if p is not None and (si in p.keep or si == p.reference_stage):
            out = self._prune_stage(st, si, x_2BlC, rows)
            tokens = p.keep.get(si, tokens)
        else:
            # Stages before the pruned ones (always a suffix) write where the static graphs expect.
            assert self.offset == self.tr.stage_slices()[si][0]
            st.x[si][:rows].copy_(x_2BlC)  # into the static buffer the graph reads
            out = self._run_stage(st, si, rows)
        self.offset += tokens
        self.stage_work.append((si, rows, tokens))
        return out

    def drop_unconditional(self):
        self._rows = self._st.x[0].shape[0] // 2
        self.ref_outputs = first_rows(self.ref_outputs, self._rows)

    @staticmethod
    def guide(logits_2BlV, t, top_k, top_p):
        if t is None:  # conditional rows only: no CFG to fuse
            return filter_top_k_top_p_(logits_2BlV.clone(), top_k, top_p)
        return ops.cfg_top_k_filter(logits_2BlV, t, top_k, top_p)

    def next_scale_input(self, si, f_hat, h_BChw):
        return next_scale_input_fast(self.tok, si, self.tr.cfg.patch_nums, f_hat, h_BChw)

    def sample_residual(self, net, z, t, sched, *, temperature, x_init_NC, noise_fn):
        return sample_residual_fast(net, z, t, sched, temperature, x_init_NC, noise_fn,
                                    cuda_graph=self.use_cuda_graphs)


__all__ = ["FastEngine", "StageState"]
