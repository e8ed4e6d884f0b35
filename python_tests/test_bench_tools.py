"""The benchmark tooling itself: FLOP counts behind bench/floors.py and the
GPU report (bench/report.py), checked on the CPU so a broken section or a
wrong count is found here rather than in scarce device time."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(__file__), os.pardir, "bench")
sys.path.insert(0, BENCH)

from floors import ar_stage_flops, diffusion_flops, floors, meta_model, vae_flops  # noqa: E402
from hart_shapes import SMALL_LLM, SMALL_TOK  # noqa: E402

# A small configuration with an FFN ratio and depth unlike the stand-in's, so the
# closed forms below are checked on more than one shape.
ODD_LLM = {**SMALL_LLM, "depth": 3, "embed_dim": 96, "num_heads": 3, "mlp_ratio": 2.0, "context_token": 7,
           "patch_nums": [1, 2, 3, 5], "diff_width": 48, "diff_depth": 3}
ODD_TOK = {**SMALL_TOK, "v_patch_nums": [1, 2, 3, 5]}


@pytest.mark.parametrize("llm,tok", [(SMALL_LLM, SMALL_TOK), (ODD_LLM, ODD_TOK)], ids=["stand-in", "odd"])
@pytest.mark.parametrize("B", [1, 3])
def test_ar_stage_flops_match_closed_form(llm, tok, B):
    """Counted FLOPs (depth-1/depth-2 extrapolation) equal the architecture's
    closed form: per layer qkv 3C^2 + proj C^2 + FFN 2 * ratio * C^2 weights,
    the head C x V, and 4 * l * kv * d per (row, head) of attention."""
    tr, _ = meta_model(llm, tok)
    C, H, depth, V = llm["embed_dim"], llm["num_heads"], llm["depth"], tok["vocab_size"]
    d = C // H
    layer_weights = 4 * C * C + 2 * int(llm["mlp_ratio"] * C) * C
    rows = ar_stage_flops(tr, B)
    sizes = [llm["context_token"]] + [pn * pn for pn in llm["patch_nums"][1:]]
    assert [r["stage"] for r in rows] == list(range(len(sizes)))
    kv = 0
    for r, l in zip(rows, sizes):
        kv += l
        n = 2 * B * l  # CFG-doubled rows
        assert r["rows"] == n and r["kv_len"] == kv
        assert r["linear_GFLOP"] * 1e9 == pytest.approx(2 * n * (depth * layer_weights + C * V), rel=1e-12)
        assert r["attention_GFLOP"] * 1e9 == pytest.approx(4 * n * kv * d * H * depth, rel=1e-12)


def test_diffusion_flops_match_closed_form():
    """Per step: input_proj over the N shared rows, then over 2N CFG rows the
    batched adaLN GEMM (3W per block + 2W final), two W x W linears per block
    and the output linear (2 Cvae: learned sigma); the time MLP is one row per
    step and cond_embed runs once."""
    llm, tok = ODD_LLM, ODD_TOK
    tr, _ = meta_model(llm, tok)
    B, steps = 2, 8
    W, depth, Cv, Cz = llm["diff_width"], llm["diff_depth"], tok["z_channels"], llm["embed_dim"]
    N = B * llm["patch_nums"][-1] ** 2
    freq = tr.diffloss.net.time_embed.mlp[0].in_features
    per_step = 2 * (N * Cv * W + 2 * N * W * (3 * W * depth + 2 * W) + 2 * N * 2 * W * W * depth
                    + 2 * N * W * 2 * Cv + freq * W + W * W)
    assert diffusion_flops(tr, B) == pytest.approx(steps * per_step + 2 * 2 * N * Cz * W, rel=1e-12)


def test_vae_flops_scale_with_batch():
    _, tk = meta_model(SMALL_LLM, SMALL_TOK)
    one, three = vae_flops(tk, 1, latent=8), vae_flops(tk, 3, latent=8)
    assert one > 0 and three == pytest.approx(3 * one, rel=1e-12)


def test_floors_rows_follow_from_counts_and_ceilings():
    import floors as fl

    rows = floors((1,), SMALL_LLM, SMALL_TOK)
    pixels = SMALL_TOK["v_patch_nums"][-1] * 2 ** (len(SMALL_TOK["ch_mult"]) - 1)
    assert [r["piece"] for r in rows] == [f"AR, {len(SMALL_LLM['patch_nums']) - 1} stages before the last",
                                          "AR, last stage", "residual diffusion, 8 steps",
                                          f"VAE decode, {pixels} x {pixels}"]
    tr, _ = meta_model(SMALL_LLM, SMALL_TOK)
    stages = ar_stage_flops(tr, 1)
    last = stages[-1]
    assert rows[1]["GFLOP"] == pytest.approx(last["linear_GFLOP"] + last["attention_GFLOP"])
    assert rows[2]["floor_ms"] == pytest.approx(diffusion_flops(tr, 1) / 1e9 / fl.DIFFUSION_GEMM_TFLOPS)
    for r in rows:  # no floor can be below the work at the datasheet peak
        assert r["floor_ms"] >= r["GFLOP"] / fl.PEAK_TFLOPS


def test_report_runs_every_section_on_cpu(tmp_path):
    """bench/report.py --device cpu --small: every section runs and returns rows
    (a section that raises makes the report exit 1 and records the traceback)."""
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCH, "report.py"), "--device", "cpu", "--small", "--quick",
         "--repeats", "1", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    import report as rp

    assert set(report["sections"]) == set(rp.SECTION_ORDER.split(","))
    for name, rows in report["sections"].items():
        assert isinstance(rows, list) and rows, (name, rows)
    stages = report["sections"]["stages"]
    assert [r["stage"] for r in stages] == list(range(len(SMALL_LLM["patch_nums"])))
    assert all(r["replay_ms"] > 0 and r["eager_ms"] > 0 for r in stages)
    totals = [r for r in report["sections"]["profile"] if r["kernel"].startswith("total")]
    assert len(totals) == 6 and all(r["share_%"] == 100.0 and r["ms"] > 0 for r in totals)
    # Our attention kernel is timed under its real backend name (a typo once made it NaN).
    attention = report["sections"]["attention"]
    assert all(r["ours_ms"] == r["ours_ms"] for r in attention)
    for r in attention[:-1]:  # the cached-stage rows name their fastest backend
        assert r["best"] == min(("ours", "sdpa"), key=lambda n: r[f"{n}_ms"])


def test_a_model_folders_tokenizer_is_scored_as_loaded():
    """bench/tokenizer_variants.py --model scores the folder's tokenizer: what score()
    gives for that tokenizer loaded by hand, shape split by size included."""
    from hart_fast.demo import DEMO_DIR
    from hart_fast.loading import load_models
    from hart_fast.train.scenes import heldout_prompts
    from tokenizer_variants import score, score_model

    got = score_model(DEMO_DIR, n=16)
    _, tok, _ = load_models(DEMO_DIR)
    want = score(tok.float(), tok.cfg.v_patch_nums, n=16)
    assert got == {"model": DEMO_DIR, **want}
    # The two sizes' shape scores average, weighted by their counts, to the shape score.
    n_small = sum(sc.objects[0].size == "small" for sc in heldout_prompts(16))
    assert 0 < n_small < 16
    for kind in ("with_residual", "codes_only"):
        k = got[kind]
        mixed = (n_small * k["shape_small"] + (16 - n_small) * k["shape_large"]) / 16
        assert mixed == pytest.approx(k["shape"], abs=0.1), k  # the scores are rounded to 0.1


def test_tokenizer_checkpoints_are_scored_with_their_saved_weights(tmp_path):
    """bench/tokenizer_variants.py --checkpoint scores the weights in the file: a
    checkpoint of a tokenizer after two training steps scores what that tokenizer
    scores in memory, and not what a fresh one does."""
    import torch

    from hart_fast.eval.judge import ATTRIBUTES
    from hart_fast.train import recipe
    from hart_fast.train.common import train_loop
    from hart_fast.train.tokenizer import TokenizerStep
    from tokenizer_variants import score, score_checkpoint

    pn = recipe.DEMO_TOKENIZER["v_patch_nums"]
    tok = recipe.build_tokenizer(recipe.DEMO_TOKENIZER, 3)
    step = TokenizerStep(tok, recipe.refine_images_fn(1, 2, 64), pn, object_weight=4.0)
    train_loop(run_dir=str(tmp_path), modules={"tokenizer": tok}, step_fn=step, steps=2, lr=1e-3, warmup=1,
               seed=0, desc="t", ckpt_every=2, log_every=1, progress=False)
    got = score_checkpoint(str(tmp_path / "checkpoint.pt"), n=8)
    assert got["step"] == 2
    want = score(tok, pn, n=8)
    assert got["with_residual"] == want["with_residual"] and got["codes_only"] == want["codes_only"]
    fresh = score(recipe.build_tokenizer(recipe.DEMO_TOKENIZER, 0), pn, n=8)
    assert fresh["with_residual"]["psnr"] != got["with_residual"]["psnr"]
    for kind in ("with_residual", "codes_only"):
        assert set(got[kind]) == {"psnr", "object_mse", *ATTRIBUTES, "all", "shape_small", "shape_large"}
        assert torch.isfinite(torch.tensor(got[kind]["psnr"]))
