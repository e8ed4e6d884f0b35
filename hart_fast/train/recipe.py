"""The recipe of the embedded demo model: a small HART trained on procedural scenes.

    python -m hart_fast.train.recipe --work runs/demo       # or: hart-fast train demo --work runs/demo

Five stages, each resumable from its folder under --work (rerun the same command
after a kill and it carries on):

1. `tokenizer/`: the hybrid tokenizer on freshly rendered captioned scenes, then
   `tokenizer_objects/`: the same tokenizer refined on crowded scenes
   (`scenes.dense_scene`) with object pixels weighted up in the loss -- after
   the first phase it draws backgrounds well but objects as blurred, miscoloured
   blobs, because a captioned scene is mostly background (both phases now train on
   the object-weighted stream by default, with the weight widened past the objects'
   edges, an edge loss in the first phase, in bfloat16 on CPUs that have it natively);
2. `transformer/`: the AR transformer and the residual-diffusion MLP together, on
   the scenes' codes (encoded once with the trained tokenizer) and the frozen text
   encoder's states of their captions;
3. `residual/`: the residual-diffusion MLP alone, the transformer frozen, trained
   on the same target under the caption and the unconditional input and on the
   guided combination of the two (inference guides the MLP; trained only jointly,
   its guided draws came out too large and shifted object colours);
4. `decoder/` (with --decoder-steps N, off by default): the decoder refined alone (encoder and codebook frozen,
   so no code changes and the stages before stay valid), both hybrid paths on
   both kinds of scene -- last, so that folders made before it can add it;
5. `model/`: the official-layout folder (llm/, tokenizer/, text_encoder/), which
   `hart_fast.HartPipeline.from_pretrained` and the official loader read.

Every batch and every random draw comes from (seed, step), so a rerun from scratch
reproduces the same model up to floating-point reduction order.

On a GPU (`--profile gpu`: larger batches, bfloat16 autocast, scenes rendered on
the device, the object-weighted stream in both tokenizer phases) the steps of each stage come from a time budget (`--budget-min`):
each stage first times a few throwaway steps, then takes its share of the
budget. The steps chosen are written to WORK/plan.json; a resumed or repeated run
reads them from there, so it trains the same number of steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional, Sequence

import torch

from hart_fast.train.common import atomic_write_json, seconds_per_step, step_seed, train_loop

DEMO_TOKENIZER = dict(
    vocab_size=512, z_channels=16, ch=64, ch_mult=[1, 1, 1, 1], v_patch_nums=[1, 2, 3, 4, 6, 8],
    quantizer_type="var_hybrid", share_quant_resi=4, quant_resi=0.5,
)
DEMO_TRANSFORMER = dict(
    context_token=24, context_dim=64, depth=4, embed_dim=128, num_heads=4, mlp_ratio=4.0,
    patch_nums=[1, 2, 3, 4, 6, 8], attn_type="llama", mlp_type="gpt2", disable_aln=False,
    shared_aln=False, use_timestep_embed=True, sep_aln_pooling_mode="max", use_context_norm=True,
    diff_width=128, diff_depth=3, num_sampling_steps="8", vae_path=None, cond_drop_rate=0.1,
    diffusion_batch_mul=2,
)


@dataclasses.dataclass
class Recipe:
    seed: int = 0
    image_size: int = 64
    # 3,500 + 1,500 tokenizer steps since the sixth model (2,000 + 1,000 before): in
    # bfloat16 on a CPU with native bfloat16 they take the time the 3,000 took in float32.
    tok_steps: int = 3500
    tok_batch: int = 8
    tok_lr: float = 1e-3
    tok_warmup: int = 50
    tok_refine_steps: int = 1500
    tok_refine_lr: float = 3e-4
    tok_object_weight: float = 4.0
    # On the object-weighted stream: the object mask widened by this many pixels (a
    # max-pool), so the background between a small star's points, where a blurred
    # reconstruction bleeds colour, weighs as much as the object; and an L1 loss on
    # the error's pixel-to-pixel differences (each weighted by the object weight),
    # which a blurred edge pays for and a flat region does not (BENCHMARKS.md, "Sixth
    # model"). A "plain" first phase uses neither, as it uses no object weight.
    tok_mask_dilate: int = 2
    tok_edge_weight: float = 1.0
    # The edge term of phase 2 alone; the default is the embedded (sixth) model's. The
    # edge term sharpens small shapes but pulls colours off (a probe: 400 steps
    # without it after the sixth model's tokenizer, codes' object colour 94.5% ->
    # 98.4%), so the seventh model trained phase 2 with 0 (`--tok-refine-edge-weight
    # 0`): its tokenizer's colours came back, its generated images did not improve
    # overall (BENCHMARKS.md, "Seventh model"), so it is not embedded.
    tok_refine_edge_weight: float = 1.0
    # Autocast of the tokenizer stage on a CPU: "auto" is bfloat16 where the CPU has it
    # natively (AVX512-BF16 / AMX: twice the float32 step rate there) and float32
    # elsewhere; "bfloat16" or "none" force it. A GPU profile's `autocast` wins.
    tok_cpu_autocast: str = "auto"
    # Phase 1's stream: "objects" (phase 2's half-crowded, object-weighted stream from
    # the start, which learns the objects far sooner: BENCHMARKS.md, tokenizer variants)
    # or "plain" (captioned scenes, no object weight, mask or edge term: the first
    # embedded model's first phase).
    tok_phase1: str = "objects"
    # 24,000 scenes and 8,000 steps (the fourth embedded model): at 8,000 / 3,000 the
    # transformer still underfit (its loss falling at the end; BENCHMARKS.md, "Fourth
    # model"); the same ~11 passes over the scenes as then.
    tr_scenes: int = 24000
    tr_steps: int = 8000
    tr_batch: int = 32
    tr_lr: float = 1e-3
    # The residual MLP alone afterwards, the transformer frozen, trained under both
    # guidance conditions (BENCHMARKS.md, "The residual under guidance"); 0: no such stage.
    res_steps: int = 400
    res_scenes: int = 4000
    res_lr: float = 1e-3
    res_guidance_max: float = 5.0
    res_guided_weight: float = 1.0
    # The tokenizer's decoder refined alone last (the `decoder/` stage), the encoder,
    # codebook and phi convs frozen, so every scene keeps its codes and residual and
    # the transformer and residual MLP trained on them stay valid. With both images
    # of the hybrid pair interleaved over the batch: in phases 1 and 2 the
    # continuous-latent half was always the crowded half of the stream, so that path
    # never learnt a single small object on its background (BENCHMARKS.md, "Seventh
    # model"). 0: no such stage (the embedded sixth model had none; the seventh model
    # trained 1,000 steps: `--decoder-steps 1000`).
    dec_steps: int = 0
    dec_lr: float = 1e-4
    device: str = "cpu"
    autocast: Optional[str] = None      # "bfloat16" / "float16": autocast dtype of the forward passes
    # Seconds of training for all stages together; None: the step counts above.
    budget_s: Optional[float] = None
    min_planned_steps: int = 100

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        return {None: None, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.autocast]

    @property
    def tok_autocast_dtype(self) -> Optional[torch.dtype]:
        """The tokenizer stage's autocast dtype (see tok_cpu_autocast)."""
        if self.tok_cpu_autocast not in ("auto", "bfloat16", "none"):
            raise ValueError(f"tok_cpu_autocast must be 'auto', 'bfloat16' or 'none', got {self.tok_cpu_autocast!r}")
        if torch.device(self.device).type != "cpu" or self.autocast is not None:
            return self.autocast_dtype
        if self.tok_cpu_autocast == "auto":
            from hart_fast.speed import cpu_native_bf16

            return torch.bfloat16 if cpu_native_bf16() else None
        return torch.bfloat16 if self.tok_cpu_autocast == "bfloat16" else None


# What --stage takes, in the order "all" runs them.
STAGES = ["tokenizer", "transformer", "residual", "decoder", "export", "all"]

# The budget's share of every stage (the encode between them is not counted); the
# optional decoder stage (dec_steps > 0) adds its share on top.
BUDGET_SHARES = {"tokenizer": 0.45, "tokenizer_objects": 0.2, "transformer": 0.3, "residual": 0.05,
                 "decoder": 0.05}

PROFILES: Dict[str, Recipe] = {
    # The recipe of the embedded model (BENCHMARKS.md, "Sixth model"): its tokenizer
    # stage in bfloat16 where the CPU has it natively, 104 minutes measured on the
    # AMX Xeon of session 11; a CPU without native bfloat16 trains the tokenizer in
    # float32, about 20 minutes longer at the same speed otherwise.
    "cpu": Recipe(),
    # A lent GPU's minutes. Batches 8x / 8x, learning rates up by about sqrt of that,
    # 100k encoded scenes for the transformer (the CPU recipe's 24,000 are seen ~11
    # times each in 8,000 steps; a GPU would see them hundreds of times).
    "gpu": Recipe(device="cuda", autocast="bfloat16", tok_batch=64, tok_lr=2e-3, tok_warmup=200,
                  tok_refine_lr=6e-4, tr_scenes=100_000, tr_batch=256, tr_lr=2e-3,
                  budget_s=6 * 60.0),
}


class SceneImages:
    """images_fn(step) -> (N, 3, size, size) float32 in [-1, 1] on `device`: the scenes
    `scenes_at(step)` returns, drawn by the batched renderer on that device.

    On a GPU the scenes of the next steps are sampled in a thread while the device
    trains (sampling is Python, ~60 us a scene).
    """

    def __init__(self, scenes_at: Callable[[int], Sequence], size: int, device, lookahead: Optional[int] = None):
        self.scenes_at, self.size, self.device = scenes_at, size, torch.device(device)
        self.lookahead = (2 if self.device.type == "cuda" else 0) if lookahead is None else lookahead
        self._pool = ThreadPoolExecutor(1) if self.lookahead else None
        self._pending: Dict[int, object] = {}

    def __call__(self, step: int) -> torch.Tensor:
        from hart_fast.train.scenes import render_batch, to_tensor_pm1

        fut = self._pending.pop(step, None)
        scenes = fut.result() if fut is not None else self.scenes_at(step)
        for s in range(step + 1, step + 1 + self.lookahead):
            if s not in self._pending:
                self._pending[s] = self._pool.submit(self.scenes_at, s)
        return to_tensor_pm1(render_batch(scenes, self.size, self.device))

    def close(self) -> None:
        """Drop the scenes sampled ahead and stop the sampling thread."""
        for fut in self._pending.values():
            fut.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> "SceneImages":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def scene_images_fn(seed: int, batch: int, size: int, device="cpu") -> SceneImages:
    """images_fn(step): training scenes step*batch .. +batch of the dataset seeded `seed`."""
    from hart_fast.train.scenes import SceneDataset

    ds = SceneDataset(n=2**62, seed=seed, size=size, split="train")
    return SceneImages(lambda step: [ds.scene(i) for i in range(step * batch, (step + 1) * batch)], size, device)


def refine_images_fn(seed: int, batch: int, size: int, device="cpu") -> SceneImages:
    """images_fn(step) for the tokenizer's second phase: half captioned scenes (the
    distribution it must keep), half crowded ones (more object pixels per batch)."""
    from hart_fast.train.scenes import SceneDataset, dense_scene_at

    plain_batch = batch - batch // 2
    ds = SceneDataset(n=2**62, seed=seed, size=size, split="train")

    def scenes(step: int):
        plain = [ds.scene(i) for i in range(step * plain_batch, (step + 1) * plain_batch)]
        return plain + [dense_scene_at(seed, step * batch + i) for i in range(batch // 2)]

    return SceneImages(scenes, size, device)


def read_plan(work: str) -> dict:
    path = os.path.join(work, "plan.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def stage_steps(work: str, r: Recipe, name: str, fixed_steps: int, probe: Callable[[], float]) -> int:
    """The steps of stage `name`: from WORK/plan.json if it holds them, else the
    recipe's fixed count or (with a budget) its share of the budget at the probed
    seconds per step; recorded in the plan either way."""
    plan = read_plan(work)
    if name in plan:
        return int(plan[name]["steps"])
    sps = None
    steps = fixed_steps
    if r.budget_s is not None:
        sps = probe()
        steps = max(r.min_planned_steps, int(BUDGET_SHARES[name] * r.budget_s / sps))
        print(f"{name}: {sps * 1e3:.1f} ms a step -> {steps} steps in its {BUDGET_SHARES[name]:.0%} of "
              f"{r.budget_s:.0f} s", flush=True)
    plan[name] = {"steps": steps, "seconds_per_step": sps, "device": r.device}
    atomic_write_json(plan, os.path.join(work, "plan.json"))
    return steps


# What may change between the runs of one folder: where it trains, not what.
RESUMABLE_ACROSS = ("device", "autocast", "tok_cpu_autocast", "budget_s", "min_planned_steps")


# Settings added after folders were made, with the value that reproduces what an
# older folder trained with: its tokenizer had no widened mask and no edge loss, or
# (a folder of the sixth model) one edge weight for both phases. A callable takes
# the folder's recorded recipe, those legacy values already filled in.
LEGACY_VALUES = {"tok_mask_dilate": 0, "tok_edge_weight": 0.0,
                 "tok_refine_edge_weight": lambda theirs: theirs["tok_edge_weight"]}


def check_recipe(work: str, r: Recipe) -> None:
    """Record the recipe of a run folder (WORK/recipe.json) on its first stage, and
    refuse to continue a folder with another recipe: a resumed stage would otherwise
    go on with other data or settings than it started with. The device, autocast and
    budget may differ (a run started on a GPU can finish on a CPU)."""
    path = os.path.join(work, "recipe.json")
    mine = {k: v for k, v in dataclasses.asdict(r).items() if k not in RESUMABLE_ACROSS}
    if os.path.exists(path):
        with open(path) as f:
            theirs = json.load(f)
        # A folder started before a setting existed takes the value that reproduces
        # what it trained with then (LEGACY_VALUES; the residual stage's settings, of
        # a stage such a folder had not run, take today's), and keeps it from here on.
        added = {k: LEGACY_VALUES.get(k, v) for k, v in mine.items() if k not in theirs}
        theirs = dict(theirs, **{k: v for k, v in added.items() if not callable(v)})
        added = {k: v(theirs) if callable(v) else v for k, v in added.items()}
        theirs = dict(theirs, **added)
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if diff:
            said = ", ".join(f"{k}={theirs.get(k)!r} (now {mine.get(k)!r})" for k in diff)
            raise ValueError(f"{work} was started with another recipe: {said}; rerun it with the options it "
                             f"started with, or use another --work folder")
        if added:
            atomic_write_json(theirs, path)
        return
    atomic_write_json(mine, path)


def planned_steps(work: str, name: str, default: int) -> int:
    return int(read_plan(work).get(name, {}).get("steps", default))


def build_tokenizer(cfg_dict: dict, seed: int):
    from hart_fast.config import TokenizerConfig
    from hart_fast.model.tokenizer import HartTokenizer

    cfg = TokenizerConfig.from_dict(dict(cfg_dict))
    torch.manual_seed(seed)
    return HartTokenizer(cfg, with_encoder=True)


def train_tokenizer_stage(work: str, r: Recipe, progress: bool = True):
    from hart_fast.train.tokenizer import TokenizerStep

    if r.tok_phase1 not in ("plain", "objects"):
        raise ValueError(f"tok_phase1 must be 'plain' or 'objects', got {r.tok_phase1!r}")
    check_recipe(work, r)
    tok = build_tokenizer(DEMO_TOKENIZER, step_seed(r.seed, 0, 10)).to(r.device)
    objects = r.tok_phase1 == "objects"
    dtype = r.tok_autocast_dtype
    print(f"tokenizer: {'float32' if dtype is None else str(dtype).split('.')[-1]} on {r.device}", flush=True)
    weighting = dict(mask_dilate=r.tok_mask_dilate, edge_weight=r.tok_edge_weight)
    stream = refine_images_fn if objects else scene_images_fn
    with stream(step_seed(r.seed, 0, 11) % 2**31, r.tok_batch, r.image_size, r.device) as images:
        step = TokenizerStep(tok, images, DEMO_TOKENIZER["v_patch_nums"],
                             object_weight=r.tok_object_weight if objects else 0.0, autocast_dtype=dtype,
                             **(weighting if objects else {}))
        modules = {"tokenizer": tok}
        steps = stage_steps(work, r, "tokenizer", r.tok_steps, lambda: seconds_per_step(modules, step))
        train_loop(run_dir=os.path.join(work, "tokenizer"), modules=modules, step_fn=step, steps=steps,
                   lr=r.tok_lr, warmup=r.tok_warmup, seed=r.seed, desc="tokenizer", ckpt_every=100,
                   log_every=10, progress=progress)
    if r.tok_refine_steps:
        # Phase 2 starts from phase 1's weights, with a fresh optimizer and usage counts.
        with refine_images_fn(step_seed(r.seed, 0, 13) % 2**31, r.tok_batch, r.image_size, r.device) as images:
            step = TokenizerStep(tok, images, DEMO_TOKENIZER["v_patch_nums"], object_weight=r.tok_object_weight,
                                 autocast_dtype=dtype, **dict(weighting, edge_weight=r.tok_refine_edge_weight))
            step.initialised = True
            steps = stage_steps(work, r, "tokenizer_objects", r.tok_refine_steps,
                                lambda: seconds_per_step(modules, step))
            train_loop(run_dir=os.path.join(work, "tokenizer_objects"), modules=modules, step_fn=step,
                       steps=steps, lr=r.tok_refine_lr, warmup=20, seed=step_seed(r.seed, 0, 14),
                       desc="tokenizer-objects", ckpt_every=100, log_every=10, progress=progress)
    return tok


def init_transformer_(tr) -> None:
    """Small normal weights; AdaLN and the residual MLP's modulations start at zero
    (every block starts as the identity, as DiT's adaLN-Zero and MAR's MLP)."""
    from hart_fast.model.diffusion import SimpleMLPAdaLN

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in tr.named_parameters():
            if name.endswith(("scale_mul_1H11", "scale_shift_table")):
                continue  # their constructors' values are the official init
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            elif name.endswith("bias"):
                p.zero_()
        for m in tr.modules():
            if hasattr(m, "ada_lin"):
                m.ada_lin[-1].weight.zero_()
                m.ada_lin[-1].bias.zero_()
        net = tr.diffloss.net
        assert isinstance(net, SimpleMLPAdaLN)
        for blk in list(net.res_blocks) + [net.final_layer]:
            blk.adaLN_modulation[-1].weight.zero_()
            blk.adaLN_modulation[-1].bias.zero_()
        net.final_layer.linear.weight.zero_()
        net.final_layer.linear.bias.zero_()


def text_encoder_stage(work: str, r: Recipe) -> str:
    """The frozen text encoder: a random 2-layer Qwen2 whose tokenizer has every caption word whole."""
    from hart_fast.demo import write_text_encoder
    from hart_fast.train.scenes import caption_words

    path = os.path.join(work, "text_encoder")
    if not os.path.isdir(path):
        tmp = path + ".tmp"
        write_text_encoder(tmp, DEMO_TRANSFORMER["context_dim"], seed=step_seed(r.seed, 0, 20) % 2**31,
                           words=caption_words())
        os.replace(tmp, path)
    return path


def finished_checkpoint(work: str, stage: str, phase: str, default_steps: int) -> dict:
    """The checkpoint of a finished stage phase (WORK/phase/checkpoint.pt at its planned
    step count); an error naming the stage when it is missing or unfinished."""
    steps = planned_steps(work, phase, default_steps)
    path = os.path.join(work, phase, "checkpoint.pt")
    if not os.path.exists(path):
        raise RuntimeError(f"the {stage} stage in {work} has not finished ({path} is missing); run it first")
    ck = torch.load(path, map_location="cpu", weights_only=False)
    if ck["step"] < steps:
        where = f" ({phase})" if phase != stage else ""
        raise RuntimeError(f"the {stage} stage in {work}{where} is at step {ck['step']} of {steps}; run it first")
    return ck


def load_tokenizer_stage(work: str, r: Recipe):
    tok = build_tokenizer(DEMO_TOKENIZER, 0)
    phase, steps = ("tokenizer_objects", r.tok_refine_steps) if r.tok_refine_steps else ("tokenizer", r.tok_steps)
    tok.load_state_dict(finished_checkpoint(work, "tokenizer", phase, steps)["modules"]["tokenizer"])
    return tok.eval()


class RenderedScenes:
    """Scenes as a uint8 (N, size, size, 3) sequence rendered on `device` when sliced,
    so encode_dataset renders one chunk at a time."""

    def __init__(self, scenes: Sequence, size: int, device):
        self.scenes, self.size, self.device = scenes, size, device

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, sl: slice) -> torch.Tensor:
        from hart_fast.train.scenes import render_batch

        return render_batch(self.scenes[sl], self.size, self.device)


def encode_stage(work: str, r: Recipe, tok, progress: bool = True, n: Optional[int] = None,
                 name: str = "encoded.pt"):
    """Codes of the first n (default: all tr_scenes) of the transformer's training
    scenes, encoded once (cached in WORK/name; a cache of more scenes is sliced)."""
    from hart_fast.train.common import atomic_save
    from hart_fast.train.scenes import SceneDataset

    n = r.tr_scenes if n is None else int(n)
    path = os.path.join(work, name)
    # Which tokenizer made the codes: a retrained tokenizer must not reuse old ones.
    stamp = float(tok.quantize.embedding.weight.detach().double().sum())
    if os.path.exists(path):
        cached = torch.load(path, weights_only=False)
        if cached.get("codebook_sum") == stamp and len(cached["captions"]) >= n:
            if len(cached["captions"]) == n:
                return cached
            # Copies: views would keep the whole cache alive.
            return {"data": {k: v[:n].clone() for k, v in cached["data"].items()}, "captions": cached["captions"][:n],
                    "codebook_sum": stamp}
    ds = SceneDataset(n, seed=step_seed(r.seed, 0, 12) % 2**31, size=r.image_size)
    scenes = [ds.scene(i) for i in range(len(ds))]
    from hart_fast.train.finetune import encode_dataset

    chunk = 1024 if torch.device(r.device).type == "cuda" else 64
    data = encode_dataset(tok.to(r.device), RenderedScenes(scenes, r.image_size, r.device),
                          DEMO_TRANSFORMER["patch_nums"], batch=chunk, progress=progress)
    out = {"data": data, "captions": [sc.caption for sc in scenes], "codebook_sum": stamp}
    atomic_save(out, path)
    return out


def stamp_run_dir(run_dir: str, stamp_name: str, stamp: dict, what_differs: str) -> None:
    """Record what a stage's run folder trains on (run_dir/stamp_name); a checkpoint
    left there from other inputs is removed with its loss log, so the stage starts
    afresh instead of resuming it."""
    stamp_path = os.path.join(run_dir, stamp_name)
    if os.path.exists(os.path.join(run_dir, "checkpoint.pt")):
        old = json.load(open(stamp_path)) if os.path.exists(stamp_path) else None
        if old != stamp:
            print(f"{run_dir}: its checkpoint {what_differs}; starting it afresh")
            for name in ("checkpoint.pt", "loss_log.jsonl"):
                if os.path.exists(os.path.join(run_dir, name)):
                    os.unlink(os.path.join(run_dir, name))
    os.makedirs(run_dir, exist_ok=True)
    atomic_write_json(stamp, stamp_path)


def build_transformer(tok):
    from hart_fast.config import TransformerConfig
    from hart_fast.model.transformer import HartTransformer

    cfg = TransformerConfig.from_dict(dict(DEMO_TRANSFORMER))
    tr = HartTransformer(cfg, tok.Cvae, tok.V)
    init_transformer_(tr)
    return tr


def train_transformer_stage(work: str, r: Recipe, progress: bool = True):
    from hart_fast.text_encoder import as_text_encoder
    from hart_fast.train.finetune import train_transformer

    check_recipe(work, r)
    tok = load_tokenizer_stage(work, r).to(r.device)
    enc = encode_stage(work, r, tok, progress)
    te = as_text_encoder(text_encoder_stage(work, r), max_length=DEMO_TRANSFORMER["context_token"])
    tr = build_transformer(tok)
    run_dir = os.path.join(work, "transformer")
    # A transformer checkpoint trained on another tokenizer's codes must not be resumed.
    stamp_run_dir(run_dir, "tokenizer_stamp.json", {"codebook_sum": enc["codebook_sum"]},
                  "was trained on another tokenizer's codes")
    train_transformer(tr, tok, enc["data"], enc["captions"], te, run_dir,
                      steps=lambda modules, step: stage_steps(work, r, "transformer", r.tr_steps,
                                                              lambda: seconds_per_step(modules, step)),
                      batch=r.tr_batch, lr=r.tr_lr, seed=r.seed, cond_drop=DEMO_TRANSFORMER["cond_drop_rate"],
                      device=r.device, autocast_dtype=r.autocast_dtype, progress=progress)
    return tr, tok


def load_transformer_stage(work: str, r: Recipe, tok):
    """The finished transformer stage's model (residual MLP included), in eval mode."""
    tr = build_transformer(tok)
    tr.load_state_dict(finished_checkpoint(work, "transformer", "transformer", r.tr_steps)["modules"]["transformer"])
    return tr.eval()


def transformer_stamp(tr) -> float:
    """A fingerprint of the frozen transformer (everything but the residual MLP)."""
    return float(sum(p.detach().double().sum() for n, p in tr.named_parameters() if not n.startswith("diffloss.")))


def base_models(work: str, r: Recipe, from_model: Optional[str]):
    """(transformer, tokenizer, text-encoder folder, text encoder) the residual stage
    starts from: the work folder's finished stages, or an exported model folder
    (`--from-model`), checked whole before anything is written."""
    import dataclasses as dc

    from hart_fast.config import TokenizerConfig, TransformerConfig
    from hart_fast.text_encoder import as_text_encoder

    if from_model is None:
        tok = load_tokenizer_stage(work, r)
        tr, te_dir = load_transformer_stage(work, r, tok), text_encoder_stage(work, r)
    else:
        from hart_fast.loading import load_models

        tr, tok, _ = load_models(from_model)
        for got, want, part in ((tr.cfg, TransformerConfig.from_dict(dict(DEMO_TRANSFORMER)), "llm"),
                                (tok.cfg, TokenizerConfig.from_dict(dict(DEMO_TOKENIZER)), "tokenizer")):
            diff = [f"{f.name}={getattr(got, f.name)!r} (the recipe's: {getattr(want, f.name)!r})"
                    for f in dc.fields(want) if getattr(got, f.name) != getattr(want, f.name)]
            if diff:
                raise ValueError(f"--from-model {from_model!r} is not the demo architecture: its {part}/config.json "
                                 f"has {', '.join(diff)}")
        if not tok.has_encoder:
            raise ValueError(f"--from-model {from_model!r}: its tokenizer has no encoder weights, so it cannot "
                             f"encode the training scenes")
        te_dir = os.path.join(from_model, "text_encoder")
        if not os.path.isdir(te_dir):
            raise FileNotFoundError(f"--from-model {from_model!r} has no text_encoder/ folder")
    te = as_text_encoder(te_dir, max_length=DEMO_TRANSFORMER["context_token"])
    if getattr(te, "hidden_size", tr.cfg.context_dim) != tr.cfg.context_dim:
        raise ValueError(f"text encoder {te_dir!r} has hidden size {te.hidden_size}, but the transformer expects "
                         f"context_dim {tr.cfg.context_dim}")
    return tr.eval(), tok.eval(), te_dir, te


def residual_stamp(tr, from_model: Optional[str]) -> dict:
    """Which transformer a residual checkpoint refines (the stage and the export compare it)."""
    return {"transformer": transformer_stamp(tr), "from_model": from_model and os.path.abspath(from_model)}


def train_residual_stage(work: str, r: Recipe, progress: bool = True, from_model: Optional[str] = None):
    """The residual MLP refined under guidance, the transformer frozen (WORK/residual/)."""
    from hart_fast.train.finetune import encode_captions_of, train_residual
    from hart_fast.train.transformer import ResidualStep

    tr, tok, _, te = base_models(work, r, from_model)   # all checked before anything is written
    check_recipe(work, r)
    # The MLP needs fewer scenes than the transformer: the first res_scenes of its set.
    # Codes of another folder's tokenizer go to their own cache: the work folder's stays.
    enc = encode_stage(work, r, tok.to(r.device), progress, n=min(r.res_scenes, r.tr_scenes),
                       name="encoded.pt" if from_model is None else "encoded_from_model.pt")
    run_dir = os.path.join(work, "residual")
    # A residual checkpoint refined on another transformer must not be resumed.
    stamp_run_dir(run_dir, "transformer_stamp.json", residual_stamp(tr, from_model),
                  "refined another transformer's MLP")

    def probe() -> float:
        data, embeds, masks = encode_captions_of(enc["data"], enc["captions"], te)
        step = ResidualStep(tr.to(r.device), tok.quantize.embedding.weight.detach(), data, embeds, masks,
                            r.tr_batch, r.seed, guidance_max=r.res_guidance_max, guided_weight=r.res_guided_weight,
                            device=r.device, autocast_dtype=r.autocast_dtype)
        return seconds_per_step({"diffusion": tr.diffloss.net}, step)

    steps = stage_steps(work, r, "residual", r.res_steps, probe)
    train_residual(tr, tok, enc["data"], enc["captions"], te, run_dir, steps=steps, batch=r.tr_batch,
                   lr=r.res_lr, seed=step_seed(r.seed, 0, 30), guidance_max=r.res_guidance_max,
                   guided_weight=r.res_guided_weight, device=r.device,
                   autocast_dtype=r.autocast_dtype, progress=progress)
    return tr, tok


def load_residual_stage_(work: str, r: Recipe, tr, from_model: Optional[str] = None) -> None:
    """Load the finished residual stage's MLP into tr (in place), refusing one that
    refined another transformer than tr."""
    ck = finished_checkpoint(work, "residual", "residual", r.res_steps)
    stamp_path = os.path.join(work, "residual", "transformer_stamp.json")
    old = json.load(open(stamp_path)) if os.path.exists(stamp_path) else None
    if old != residual_stamp(tr, from_model):
        was = "no record" if old is None else (f"--from-model {old['from_model']!r}" if old.get("from_model")
                                               else "this folder's transformer stage, as it then was")
        now = f"--from-model {from_model!r}" if from_model else "this folder's transformer stage"
        raise RuntimeError(f"the residual stage in {work} refined another transformer ({was}) than the one being "
                           f"exported ({now}); rerun --stage residual with the same options first")
    tr.diffloss.net.load_state_dict(ck["modules"]["diffusion"])


def encoder_stamp(tok) -> float:
    """A fingerprint of everything of the tokenizer but its decoder (what makes the codes)."""
    return float(sum(p.detach().double().sum() for n, p in tok.named_parameters()
                     if not n.startswith(DECODER_PREFIXES)))


DECODER_PREFIXES = ("decoder.", "post_quant_conv.")


def train_decoder_stage(work: str, r: Recipe, progress: bool = True):
    """The tokenizer's decoder refined alone, both hybrid paths on both kinds of
    scene (WORK/decoder/); the codes and residuals do not change."""
    from hart_fast.train.tokenizer import TokenizerStep

    check_recipe(work, r)
    tok = load_tokenizer_stage(work, r).to(r.device).train()
    for name, p in tok.named_parameters():
        p.requires_grad_(name.startswith(DECODER_PREFIXES))
    run_dir = os.path.join(work, "decoder")
    stamp_run_dir(run_dir, "tokenizer_stamp.json", {"encoder": encoder_stamp(tok)},
                  "refined another tokenizer's decoder")
    with refine_images_fn(step_seed(r.seed, 0, 15) % 2**31, r.tok_batch, r.image_size, r.device) as images:
        step = TokenizerStep(tok, images, DEMO_TOKENIZER["v_patch_nums"], object_weight=r.tok_object_weight,
                             autocast_dtype=r.tok_autocast_dtype, mask_dilate=r.tok_mask_dilate,
                             edge_weight=r.tok_refine_edge_weight, hybrid_split="interleave", decoder_only=True)
        modules = {"tokenizer": tok}
        steps = stage_steps(work, r, "decoder", r.dec_steps, lambda: seconds_per_step(modules, step))
        train_loop(run_dir=run_dir, modules=modules, step_fn=step, steps=steps, lr=r.dec_lr, warmup=20,
                   seed=step_seed(r.seed, 0, 16), desc="decoder", ckpt_every=100, log_every=10, progress=progress)
    return tok


def load_decoder_stage_(work: str, r: Recipe, tok) -> None:
    """Load the finished decoder stage's decoder into tok (in place), refusing one
    refined on another tokenizer's codes."""
    ck = finished_checkpoint(work, "decoder", "decoder", r.dec_steps)
    stamp_path = os.path.join(work, "decoder", "tokenizer_stamp.json")
    old = json.load(open(stamp_path)) if os.path.exists(stamp_path) else None
    if old != {"encoder": encoder_stamp(tok)}:
        raise RuntimeError(f"the decoder stage in {work} refined another tokenizer's decoder than the one being "
                           f"exported; rerun --stage decoder first")
    mine = tok.state_dict()
    tok.load_state_dict({k: (v if k.startswith(DECODER_PREFIXES) else mine[k])
                         for k, v in ck["modules"]["tokenizer"].items()})


DEMO_README = """# hart-demo

The embedded default model of hart_fast: **a small HART trained on procedural scenes**
(one or two flat-coloured circles, squares, triangles and stars on a coloured
background, 64x64), not the HART 0.7B model. It draws prompts such as
"a small red circle at the top left on a blue background"; it knows 8 colours,
4 shapes, 2 sizes and 9 positions, and nothing else.

- tokenizer: the hybrid VQ autoencoder (codebook {V}, latent {Cvae} x 8 x 8, scales {pn});
- transformer: {depth} blocks of width {C}, AdaLN, llama attention, with the residual
  diffusion MLP ({dw} x {dd});
- text encoder: a frozen, randomly initialised 2-layer Qwen2 (width {D}) with a
  byte-level BPE tokenizer that keeps every caption word whole.

Made by `python -m hart_fast.train.recipe --work DIR` (see that module); measured in
BENCHMARKS.md. Point `--model` / `HART_FAST_MODEL` at a real HART folder for real images.
"""


def export_stage(work: str, r: Recipe, out_dir: str, from_model: Optional[str] = None) -> str:
    from hart_fast.config import TransformerConfig
    from hart_fast.train.export import save_model_folder

    tr, tok, te_dir, _ = base_models(work, r, from_model)
    if r.res_steps:
        load_residual_stage_(work, r, tr, from_model)
    if r.dec_steps and from_model is None:
        load_decoder_stage_(work, r, tok)
    cfg = TransformerConfig.from_dict(dict(DEMO_TRANSFORMER))
    readme = DEMO_README.format(V=tok.V, Cvae=tok.Cvae, pn=list(cfg.patch_nums), depth=cfg.depth, C=cfg.embed_dim,
                                dw=cfg.diff_width, dd=cfg.diff_depth, D=cfg.context_dim)
    return save_model_folder(out_dir, tr.cpu().float().eval(), tok.cpu().float(), DEMO_TRANSFORMER, DEMO_TOKENIZER,
                             store_dtype=torch.float16, text_encoder_dir=te_dir, readme=readme)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="hart_fast.train.recipe", description=__doc__.split("\n")[0])
    ap.add_argument("--work", required=True, help="folder for the stages' checkpoints and logs")
    ap.add_argument("--stage", choices=STAGES, default="all")
    ap.add_argument("--from-model", default=None, metavar="MODEL_DIR",
                    help="with --stage residual or export: refine the residual MLP of this exported demo-architecture "
                         "folder (its tokenizer, transformer and text encoder frozen) instead of the work folder's "
                         "earlier stages")
    ap.add_argument("--out", default=None, help="where the export stage writes the model folder "
                                                "(default: WORK/model)")
    ap.add_argument("--profile", choices=sorted(PROFILES), default="cpu",
                    help="cpu: the embedded model's recipe; gpu: larger batches on CUDA within --budget-min")
    ap.add_argument("--budget-min", type=float, default=None,
                    help="minutes of training for all stages (default: the profile's; the cpu profile "
                         "trains fixed step counts)")
    ap.add_argument("--device", default=None, help="override the profile's device")
    ap.add_argument("--tok-phase1", choices=["plain", "objects"], default=None,
                    help="the tokenizer's first phase: the object-weighted crowded stream (both profiles' default) "
                         "or plain captioned scenes (the first embedded model's first phase); default: the profile's")
    ap.add_argument("--tok-refine-edge-weight", type=float, default=None, metavar="W",
                    help="the edge term's weight in the tokenizer's phase 2 (default: the profile's, 1; the seventh "
                         "model's recipe: 0)")
    ap.add_argument("--decoder-steps", type=int, default=None, metavar="N",
                    help="steps of the decoder-only stage (default: the profile's, 0: none; the seventh model's "
                         "recipe: 1000)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    r = PROFILES[args.profile]
    if args.budget_min is not None:
        if not args.budget_min > 0:
            ap.error(f"--budget-min must be positive, got {args.budget_min}")
        r = dataclasses.replace(r, budget_s=60.0 * args.budget_min)
    if args.device:
        r = dataclasses.replace(r, device=args.device)
    if args.tok_phase1:
        r = dataclasses.replace(r, tok_phase1=args.tok_phase1)
    if args.tok_refine_edge_weight is not None:
        if not args.tok_refine_edge_weight >= 0:
            ap.error(f"--tok-refine-edge-weight must be >= 0, got {args.tok_refine_edge_weight}")
        r = dataclasses.replace(r, tok_refine_edge_weight=args.tok_refine_edge_weight)
    if args.decoder_steps is not None:
        if args.decoder_steps < 0:
            ap.error(f"--decoder-steps must be >= 0, got {args.decoder_steps}")
        r = dataclasses.replace(r, dec_steps=args.decoder_steps)
    if torch.device(r.device).type == "cuda":
        if not torch.cuda.is_available():
            ap.error(f"--profile {args.profile} trains on {r.device}, but this machine has no CUDA device; "
                     f"use --profile cpu (or --device cpu)")
        torch.backends.cudnn.benchmark = True  # fixed shapes all run long
    if args.from_model is not None:
        if args.stage not in ("residual", "export"):
            ap.error("--from-model goes with --stage residual or --stage export")
        if not os.path.isdir(args.from_model):
            ap.error(f"--from-model {args.from_model!r} is not a folder")
        if not r.res_steps:
            ap.error("--from-model refines the residual MLP, but this recipe has no residual stage (res_steps 0)")
    progress = not args.quiet
    t0 = time.time()
    if args.stage in ("tokenizer", "all"):
        train_tokenizer_stage(args.work, r, progress)
    if args.stage in ("transformer", "all"):
        train_transformer_stage(args.work, r, progress)
    if args.stage in ("residual", "all") and r.res_steps:
        train_residual_stage(args.work, r, progress, from_model=args.from_model)
    if args.stage in ("decoder", "all") and r.dec_steps:
        train_decoder_stage(args.work, r, progress)
    if args.stage in ("export", "all"):
        print(export_stage(args.work, r, args.out or os.path.join(args.work, "model"), from_model=args.from_model))
    print(f"done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
