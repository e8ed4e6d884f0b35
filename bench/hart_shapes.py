"""Random-weight HART pipelines at the real shapes, and timing helpers, for benchmarks.

No checkpoint is needed: the real 0.7B / 1024px configuration is built with
random weights (the kernels' speed does not depend on the values).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List

import torch

from hart_fast.config import TokenizerConfig, TransformerConfig
from hart_fast.demo import randomize_
from hart_fast.model.tokenizer import HartTokenizer
from hart_fast.model.transformer import HartTransformer
from hart_fast.pipeline import HartPipeline

REAL_LLM = dict(
    context_token=300, context_dim=1536, depth=24, embed_dim=1536, num_heads=24, mlp_ratio=4.0,
    patch_nums=[1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64], attn_type="llama", mlp_type="gpt2",
    disable_aln=True, shared_aln=False, use_timestep_embed=True, sep_aln_pooling_mode="max",
    use_context_norm=True, diff_width=1024, diff_depth=6, num_sampling_steps="8",
)
REAL_TOK = dict(vocab_size=4096, z_channels=32, ch=160, ch_mult=[1, 1, 2, 2, 4],
                v_patch_nums=[1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64], quantizer_type="var_hybrid")
# A CPU-sized stand-in with the same structure (every kernel path, small widths).
SMALL_LLM = {**REAL_LLM, "context_token": 32, "context_dim": 64, "depth": 2, "embed_dim": 128, "num_heads": 2,
             "patch_nums": [1, 2, 3, 4, 6, 8, 12, 16], "diff_width": 64, "diff_depth": 2}
SMALL_TOK = {**REAL_TOK, "vocab_size": 256, "z_channels": 8, "ch": 32, "ch_mult": [1, 2],
             "v_patch_nums": [1, 2, 3, 4, 6, 8, 12, 16]}

# Qwen2-VL-1.5B-Instruct's language model, HART's text encoder (issue 13: 28
# layers, hidden 1536, 12 heads / 2 KV heads, intermediate 8960).
QWEN2_1_5B = dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                  intermediate_size=8960, vocab_size=151_936)
SMALL_QWEN = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=2048)


def random_text_encoder(shape: dict, device, dtype, max_length: int, **options):
    """A QwenTextEncoder of `shape` with random weights and a word-level tokenizer:
    every word of the system prompt is one token (Qwen2's own tokenizer makes about
    that many of it), so the encoder runs the official sequence lengths."""
    import re

    from transformers import Qwen2Config, Qwen2Model

    from hart_fast.demo import word_tokenizer
    from hart_fast.text_encoder import LLM_SYSTEM_PROMPT, QwenTextEncoder

    words = sorted(set(re.findall(r"[A-Za-z]+", LLM_SYSTEM_PROMPT)))
    tok = word_tokenizer(words)
    cfg = Qwen2Config(**shape, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2Model(cfg).to(dtype)  # random init; the speed does not depend on the values
    return QwenTextEncoder(model, tok, max_length=max_length, **options)


def long_prompts(B: int, words: int = 400) -> List[str]:
    """B prompts longer than 300 tokens (truncated to the context, as a long user prompt is)."""
    from hart_fast.text_encoder import LLM_SYSTEM_PROMPT

    vocab = LLM_SYSTEM_PROMPT.split()
    return [" ".join(vocab[(b + i) % len(vocab)] for i in range(words)) for b in range(B)]


# The most recently built (transformer, tokenizer), keyed by configuration:
# building and randomising the 0.7B model takes ~10 s on the CPU, which a GPU
# session pays out of its device time for every pipeline a report creates.
_MODULES: Dict[str, tuple] = {}


def random_pipeline(llm: dict, tok: dict, device, dtype, fast: bool, seed: int = 0) -> HartPipeline:
    """A pipeline with random weights; pipelines of the same configuration share
    their modules (only the fast/reference choice and the engine differ)."""
    key = repr((sorted(llm.items()), sorted(tok.items()), str(device), str(dtype), seed))
    if key not in _MODULES:
        _MODULES.clear()  # keep one real-size model alive at a time
        tcfg, kcfg = TransformerConfig.from_dict(dict(llm)), TokenizerConfig.from_dict(dict(tok))
        tr = HartTransformer(tcfg, kcfg.Cvae, kcfg.vocab_size)
        tk = HartTokenizer(kcfg, with_encoder=False)
        randomize_(tr, seed)
        randomize_(tk, seed + 1)
        _MODULES[key] = (tr, tk)
    tr, tk = _MODULES[key]
    return HartPipeline(tr, tk, device=device, dtype=dtype, fast=fast)


def random_prompts(pipe: HartPipeline, B: int, seed: int = 0):
    cfg = pipe.config
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(B, cfg.context_token, cfg.context_dim, generator=g)
    mask = torch.arange(cfg.context_token)[None] < torch.randint(1, cfg.context_token + 1, (B, 1), generator=g)
    return ctx.to(pipe.device, pipe.dtype), mask.to(pipe.device)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], device, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of fn over `repeats` runs, device-synchronised, in ms."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def ar_stage_times(pipe: HartPipeline, B: int, repeats: int = 5) -> Dict[str, float]:
    """Transformer-pass time (ms, median) of the stages before the last, and of the last.

    Runs only the transformer passes over a prepared static state (the KV cache
    filled by the previous stages), which is what the issue's targets measure.
    """
    ctx, mask = random_prompts(pipe, B)
    # One real generation fills every buffer (and captures CUDA graphs on CUDA).
    pipe.generate(ctx, mask, residual_diffusion=False, output_type="latent", seed=0)
    S = pipe.config.num_stages
    if pipe.fast:
        eng = pipe.engine
        st = eng.state(2 * B)

        def stages(lo, hi):
            for si in range(lo, hi):
                eng._run_stage(st, si)
    else:
        tr = pipe.transformer
        trace: dict = {}
        pipe.generate(ctx, mask, guidance_scale=4.5, seed=0, residual_diffusion=False, output_type="latent",
                      trace=trace)
        from hart_fast.model.transformer import KVCache

        cfg = tr.cfg
        cache = KVCache(cfg.depth, 2 * B, cfg.num_heads, cfg.total_tokens, cfg.head_dim, pipe.device, pipe.dtype)
        pos = torch.cumsum(mask.long(), 1) - 1
        pos2 = torch.cat((pos, torch.zeros_like(pos)))
        mask2 = torch.cat((mask, torch.zeros_like(mask)))
        mask2[B:, 0] = True
        with torch.inference_mode():
            mods, head_mod = tr.modulations(tr.condition(ctx), mask2)
        xs = [trace[f"stage{si:02d}/x"] for si in range(S)]
        starts = [s for s, _ in tr.stage_slices()]

        def stages(lo, hi):
            with torch.inference_mode():
                for si in range(lo, hi):
                    h = tr.forward_stage(xs[si], si, mods, tr.stage_rope(si, pos2), cache, starts[si])
                    tr.logits(h, head_mod)

    return {
        "stages_before_last_ms": median_ms(lambda: stages(0, S - 1), pipe.device, repeats),
        "last_stage_ms": median_ms(lambda: stages(S - 1, S), pipe.device, repeats),
    }


def stage_times(pipe: HartPipeline, B: int, repeats: int = 5) -> List[Dict[str, float]]:
    """Per-stage transformer-pass time (ms, median) on the fast path: the
    CUDA-graph replay (what generation runs) and the same pass launched eagerly
    (the difference is launch overhead), with the achieved TFLOP/s of the replay."""
    if not pipe.fast:
        raise ValueError("stage_times times the fast engine; build the pipeline with fast=True")
    ctx, mask = random_prompts(pipe, B)
    pipe.generate(ctx, mask, residual_diffusion=False, output_type="latent", seed=0)  # fills buffers, graphs
    from floors import ar_stage_flops

    eng = pipe.engine
    st = eng.state(2 * B)
    rows = []
    for w in ar_stage_flops(pipe.transformer, B):
        si = w["stage"]
        with torch.inference_mode():
            replay = median_ms(lambda: eng._run_stage(st, si), pipe.device, repeats)
            eager = median_ms(lambda: eng._stage_forward(st, si), pipe.device, repeats)
        flop = (w["linear_GFLOP"] + w["attention_GFLOP"]) * 1e9
        rows.append({**w, "replay_ms": replay, "eager_ms": eager, "TFLOPs": flop / (replay * 1e-3) / 1e12})
    return rows


def kernel_profile(fn: Callable[[], object], device, top: int = 12) -> List[Dict[str, object]]:
    """The `top` kernels (CUDA) or ops (CPU) of one run of fn by self time,
    with their share of the total; the last row is the total.  fn runs once
    before the profiled run (allocations, lazy initialisation)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    fn()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        sync(device)

    def self_us(e) -> float:
        if cuda:
            return float(getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0))
        return float(e.self_cpu_time_total)

    events = [e for e in prof.key_averages() if self_us(e) > 0]
    if cuda:  # kernels and copies only (their CPU-side launch ops have no device self time)
        events = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")] or events
    total = sum(self_us(e) for e in events)
    events.sort(key=self_us, reverse=True)
    rows = [{"kernel": e.key[:72], "calls": e.count, "ms": self_us(e) / 1e3,
             "share_%": 100.0 * self_us(e) / total if total else 0.0} for e in events[:top]]
    rows.append({"kernel": f"total ({len(events)} distinct)", "calls": sum(e.count for e in events),
                 "ms": total / 1e3, "share_%": 100.0})
    return rows


def table(rows: List[Dict[str, object]]) -> str:
    """Rows as an aligned text table; columns are the union of the rows' keys (blank where absent)."""
    keys: List[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]

    def cell(r, k) -> str:
        v = r.get(k, "")
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    width = {k: max(len(k), *(len(cell(r, k)) for r in rows)) for k in keys}
    lines = [" | ".join(k.rjust(width[k]) for k in keys), "-|-".join("-" * width[k] for k in keys)]
    lines += [" | ".join(cell(r, k).rjust(width[k]) for k in keys) for r in rows]
    return "\n".join(lines)
