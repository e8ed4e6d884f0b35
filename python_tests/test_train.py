"""Training code: each part learns, the training pass is the inference pass, the
official layout round-trips, fine-tuning works and refuses bad input cleanly."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from hart_fast.demo import write_text_encoder
from hart_fast.loading import load_models
from hart_fast.train.common import atomic_save, read_loss_log, train_loop
from hart_fast.train.diffusion_loss import DiffusionTrainingSchedule, diffusion_loss
from hart_fast.train.export import read_configs, save_model_folder
from hart_fast.train.finetune import DatasetError, finetune, load_images, read_caption_folder
from hart_fast.train.scenes import SceneDataset, caption_words
from hart_fast.train.tokenizer import TokenizerStep, quantize_for_training
from hart_fast.train.transformer import TransformerStep, encode_images, full_pass, uncond_rows_
from tiny_models import TINY_LLM, TINY_TOK, write_model

SIZE = 8  # tiny models: 4x4 last scale, 2x upsampling


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tiny") / "model")
    write_model(root, llm_overrides={"context_token": 16}, seed=3)
    write_text_encoder(os.path.join(root, "text_encoder"), TINY_LLM["context_dim"], seed=4, words=caption_words())
    return root


def tiny_images(n, seed=0):
    imgs, caps = SceneDataset(n, seed=seed, size=SIZE).batch(range(n))
    return imgs, caps


def test_tokenizer_steps_lower_the_loss_on_a_fixed_batch(tiny_dir, tmp_path):
    _, tok, _ = load_models(tiny_dir)
    imgs, _ = tiny_images(8)
    from hart_fast.train.scenes import to_tensor_pm1

    x = to_tensor_pm1(imgs)
    step = TokenizerStep(tok, lambda s: x, TINY_TOK["v_patch_nums"])
    first = {k: float(v) for k, v in step(0).items()}
    train_loop(run_dir=str(tmp_path), modules={"tokenizer": tok}, step_fn=step, steps=30, lr=2e-3, warmup=3,
               seed=0, desc="tokenizer", progress=False)
    last = {k: float(v) for k, v in step(30).items()}
    assert last["loss"] < 0.8 * first["loss"], (first, last)
    log = read_loss_log(str(tmp_path))
    assert [r["step"] for r in log] == list(range(9, 30, 10))


def test_hybrid_splits_recomputed(tiny_dir):
    """With hybrid_split="interleave" the even images decode the codes-only latent
    and the odd ones the continuous latent (the step's loss, recomputed here from
    its parts); "halves" keeps the first half codes-only, "both" decodes every image
    both ways; an unknown split is refused."""
    from hart_fast.train.scenes import to_tensor_pm1

    _, tok, _ = load_models(tiny_dir)
    x = to_tensor_pm1(tiny_images(4)[0])
    for split, order in (("interleave", "cfcf"), ("halves", "ccff")):
        step = TokenizerStep(tok, lambda s: x, TINY_TOK["v_patch_nums"], hybrid_split=split)
        step.initialised = True
        got = step(0)
        with torch.no_grad():
            f = tok.img_to_latent(x)
            f_hat, vq, _, _ = quantize_for_training(tok, f, TINY_TOK["v_patch_nums"], beta=0.25)
            z = torch.stack([(f_hat if k == "c" else f)[i] for i, k in enumerate(order)])
            rec = tok.decoder(tok.post_quant_conv(z))
            want = ((rec - x) ** 2).mean() + (rec - x).abs().mean() + vq
            # The other order gives another loss: the test can tell them apart.
            z_other = torch.stack([(f if k == "c" else f_hat)[i] for i, k in enumerate(order)])
            rec_o = tok.decoder(tok.post_quant_conv(z_other))
            other = ((rec_o - x) ** 2).mean() + (rec_o - x).abs().mean() + vq
        assert float(got["loss"]) == pytest.approx(float(want), rel=1e-5), split
        assert float(other) != pytest.approx(float(want), rel=1e-3)
    # "both": every image decoded from both latents.
    step = TokenizerStep(tok, lambda s: x, TINY_TOK["v_patch_nums"], hybrid_split="both")
    step.initialised = True
    got = step(0)
    with torch.no_grad():
        rec = tok.decoder(tok.post_quant_conv(torch.cat([f_hat, f])))
        x2 = torch.cat([x, x])
        want = ((rec - x2) ** 2).mean() + (rec - x2).abs().mean() + vq
    assert float(got["loss"]) == pytest.approx(float(want), rel=1e-5)
    with pytest.raises(ValueError, match="hybrid_split"):
        TokenizerStep(tok, lambda s: x, TINY_TOK["v_patch_nums"], hybrid_split="random")


def test_decoder_only_steps_change_the_decoder_and_no_code(tiny_dir, tmp_path):
    """decoder_only: the loss on a fixed batch falls while the encoder, codebook and
    phi convs stay bit-identical, so every image keeps its codes and residual."""
    from hart_fast.train.recipe import DECODER_PREFIXES
    from hart_fast.train.scenes import to_tensor_pm1

    _, tok, _ = load_models(tiny_dir)
    x = to_tensor_pm1(tiny_images(8)[0])
    pn = TINY_TOK["v_patch_nums"]
    before = {k: v.clone() for k, v in tok.state_dict().items()}
    with torch.no_grad():
        idx0, resid0 = tok.latent_to_tokens(tok.img_to_latent(x), pn)
    for name, p in tok.named_parameters():
        p.requires_grad_(name.startswith(DECODER_PREFIXES))
    step = TokenizerStep(tok, lambda s: x, pn, object_weight=4.0, hybrid_split="interleave", decoder_only=True,
                         restart_every=2)
    first = float(step(0)["loss"])
    train_loop(run_dir=str(tmp_path), modules={"tokenizer": tok}, step_fn=step, steps=20, lr=2e-3, warmup=2,
               seed=0, desc="decoder", progress=False)
    assert float(step(20)["loss"]) < 0.9 * first
    after = tok.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(DECODER_PREFIXES) for k in changed), sorted(changed)[:5]
    with torch.no_grad():
        idx1, resid1 = tok.latent_to_tokens(tok.img_to_latent(x), pn)
    assert all(torch.equal(a, b) for a, b in zip(idx0, idx1)) and torch.equal(resid0, resid1)


def test_object_mask_marks_exactly_the_object_pixels():
    from hart_fast.train.scenes import COLORS, dense_scene_at, render, to_tensor_pm1
    from hart_fast.train.tokenizer import object_mask

    checked = 0
    for i in range(6):
        sc = dense_scene_at(1, i)
        img = render(sc, 64)
        bg = np.array(COLORS[sc.background], dtype=np.int32)
        # Independently: a pixel is an object pixel when it is not the background colour
        # (anti-aliased rims more than the threshold away count; 0.1 in [-1, 1] is 12.75 levels).
        want = np.abs(img.astype(np.int32) - bg).max(axis=-1) > 12.75
        got = object_mask(to_tensor_pm1(img[None]))[0, 0].numpy() > 0.5
        ring = np.concatenate([want[0], want[-1], want[1:-1, 0], want[1:-1, -1]])
        if ring.mean() < 0.4:  # the border ring mostly background: its median is the background
            assert (got == want).mean() > 0.999, i
            checked += 1
        assert 2 <= len(sc.objects) <= 6 and sc.caption == ""
    assert checked >= 3


def test_object_weighted_loss_is_the_weighted_reconstruction(tiny_dir):
    """The step's loss with object_weight w, recomputed here from its parts: the same
    decode, weights 1 + w on object pixels renormalised to mean 1, plus the VQ loss."""
    from hart_fast.train.scenes import to_tensor_pm1
    from hart_fast.train.tokenizer import object_mask

    _, tok, _ = load_models(tiny_dir)
    imgs, _ = tiny_images(4)
    x = to_tensor_pm1(imgs)
    step = TokenizerStep(tok, lambda s: x, TINY_TOK["v_patch_nums"], object_weight=4.0)
    step.initialised = True  # keep the loaded codebook: the recomputation below uses it too
    got = step(0)
    with torch.no_grad():
        f = tok.img_to_latent(x)
        f_hat, vq, _, _ = quantize_for_training(tok, f, TINY_TOK["v_patch_nums"], beta=0.25)
        rec = tok.decoder(tok.post_quant_conv(torch.cat([f_hat[:2], f[2:]])))
        m = object_mask(x)
        assert 0 < float(m.mean()) < 1  # both kinds of pixel are present
        w = (1 + 4.0 * m) / (1 + 4.0 * m).mean()
        want = (w * (rec - x) ** 2).mean() + (w * (rec - x).abs()).mean() + vq
        plain = ((rec - x) ** 2).mean() + (rec - x).abs().mean() + vq
    assert float(got["loss"]) == pytest.approx(float(want), rel=1e-5)
    assert float(got["mse"]) == pytest.approx(float(((rec - x) ** 2).mean()), rel=1e-5)  # logged unweighted
    assert abs(float(want) - float(plain)) > 1e-4 * float(plain)  # the weighting is not a no-op here


def test_dilated_mask_and_edge_loss_are_the_stated_sums(tiny_dir):
    """mask_dilate k widens the object weights to every pixel within k (Chebyshev) of
    an object pixel; edge_weight e adds e times the L1 of the error's horizontal and
    vertical pixel-to-pixel differences, each weighted by its right (lower) pixel's
    weight. Recomputed here by shifting the mask, not by pooling."""
    from hart_fast.train.scenes import to_tensor_pm1
    from hart_fast.train.tokenizer import object_mask

    _, tok, _ = load_models(tiny_dir)
    imgs, _ = tiny_images(4)
    x = to_tensor_pm1(imgs)

    def loss_of(**kw):
        step = TokenizerStep(tok, lambda s: x, TINY_TOK["v_patch_nums"], object_weight=4.0, **kw)
        step.initialised = True
        return float(step(0)["loss"].detach())

    got = loss_of(mask_dilate=1, edge_weight=0.5)
    with torch.no_grad():
        f = tok.img_to_latent(x)
        f_hat, vq, _, _ = quantize_for_training(tok, f, TINY_TOK["v_patch_nums"], beta=0.25)
        rec = tok.decoder(tok.post_quant_conv(torch.cat([f_hat[:2], f[2:]])))
        m = object_mask(x)[:, 0].numpy() > 0.5
        H, W = m.shape[1:]
        wide = np.zeros_like(m)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                shifted = np.zeros_like(m)
                shifted[:, max(dy, 0):H + min(dy, 0), max(dx, 0):W + min(dx, 0)] = \
                    m[:, max(-dy, 0):H + min(-dy, 0), max(-dx, 0):W + min(-dx, 0)]
                wide |= shifted
        assert wide.sum() > m.sum()  # the widening adds pixels here
        w = torch.from_numpy(1 + 4.0 * wide.astype(np.float32))[:, None]
        w = w / w.mean()
        d = rec - x
        edge = ((d[..., :, 1:] - d[..., :, :-1]) * w[..., :, 1:]).abs().mean() + \
            ((d[..., 1:, :] - d[..., :-1, :]) * w[..., 1:, :]).abs().mean()
        want = (w * d ** 2).mean() + (w * d.abs()).mean() + 0.5 * edge + vq
    assert got == pytest.approx(float(want), rel=1e-5)
    # Each term changes the loss: neither is a no-op on these images.
    for other in (loss_of(mask_dilate=0, edge_weight=0.5), loss_of(mask_dilate=1, edge_weight=0.0)):
        assert abs(other - got) > 1e-3 * got, (other, got)


def test_recipe_tokenizer_autocast_follows_the_cpu(monkeypatch):
    import dataclasses

    from hart_fast import speed
    from hart_fast.train import recipe

    r = recipe.PROFILES["cpu"]
    assert r.tok_cpu_autocast == "auto"
    monkeypatch.setattr(speed, "cpu_native_bf16", lambda: True)
    assert r.tok_autocast_dtype == torch.bfloat16
    monkeypatch.setattr(speed, "cpu_native_bf16", lambda: False)
    assert r.tok_autocast_dtype is None
    assert dataclasses.replace(r, tok_cpu_autocast="bfloat16").tok_autocast_dtype == torch.bfloat16
    assert dataclasses.replace(r, tok_cpu_autocast="none").tok_autocast_dtype is None
    # A GPU profile's autocast applies to the tokenizer too.
    assert recipe.PROFILES["gpu"].tok_autocast_dtype == torch.bfloat16
    for base in (r, recipe.PROFILES["gpu"]):
        with pytest.raises(ValueError, match="tok_cpu_autocast"):
            dataclasses.replace(base, tok_cpu_autocast="fp8").tok_autocast_dtype


def test_training_quantiser_matches_the_inference_quantiser(tiny_dir):
    _, tok, _ = load_models(tiny_dir)
    imgs, _ = tiny_images(4, seed=1)
    from hart_fast.train.scenes import to_tensor_pm1

    f = tok.img_to_latent(to_tensor_pm1(imgs))
    pn = TINY_TOK["v_patch_nums"]
    f_hat_st, vq, idx_train, _ = quantize_for_training(tok, f, pn, beta=0.25)
    idx_inf, _ = tok.latent_to_tokens(f, pn)
    for a, b in zip(idx_train, idx_inf):
        assert torch.equal(a, b)
    ref = tok.tokens_to_latent(idx_inf, pn)
    torch.testing.assert_close(f_hat_st, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    assert float(vq) > 0


def _encoded(tiny_dir, n=16, seed=0):
    tr, tok, _ = load_models(tiny_dir)
    from hart_fast.text_encoder import as_text_encoder
    from hart_fast.train.scenes import to_tensor_pm1
    from hart_fast.train.transformer import encode_captions

    imgs, caps = tiny_images(n, seed)
    data = encode_images(tok, to_tensor_pm1(imgs), TINY_LLM["patch_nums"])
    enc = as_text_encoder(os.path.join(tiny_dir, "text_encoder"), max_length=tr.cfg.context_token)
    embeds, masks = encode_captions(enc, caps)
    data["caption"] = torch.arange(n)
    return tr, tok, data, embeds, masks, caps, enc


def test_transformer_steps_lower_both_losses_on_a_fixed_batch(tiny_dir, tmp_path):
    tr, tok, data, embeds, masks, _, _ = _encoded(tiny_dir)
    step = TransformerStep(tr, tok.quantize.embedding.weight, data, embeds, masks, batch=16, seed=0, cond_drop=0.0)
    step.batch_at = (lambda orig: (lambda s: orig(0)))(step.batch_at)  # the same batch every step
    torch.manual_seed(0)
    first = {k: float(v) for k, v in step(0).items()}
    train_loop(run_dir=str(tmp_path), modules={"t": tr}, step_fn=step, steps=40, lr=3e-3, warmup=4, seed=0,
               desc="transformer", progress=False)
    torch.manual_seed(0)
    last = {k: float(v) for k, v in step(0).items()}
    assert last["ce"] < 0.7 * first["ce"], (first, last)
    assert last["diff"] < first["diff"], (first, last)


def test_training_pass_gives_the_inference_loops_logits(tiny_dir):
    """Teacher-forced logits of every scale == what the generation loop computes when
    it is forced to draw the same codes (guidance 0: the conditional logits)."""
    from hart_fast.pipeline import HartPipeline

    tr, tok, data, embeds, masks, caps, enc = _encoded(tiny_dir, n=3, seed=5)
    ctx, mask = embeds.clone(), masks.clone()
    ctx, mask, pos = uncond_rows_(ctx, mask, torch.zeros(3, dtype=torch.bool))
    with torch.no_grad():
        _, logits = full_pass(tr, ctx, mask, pos, data["x_in"])
    pipe = HartPipeline.from_pretrained(tiny_dir, fast=False)
    pn = TINY_LLM["patch_nums"]
    bounds = np.cumsum([0] + [p * p for p in pn])
    codes = [data["idx"][:, bounds[i]:bounds[i + 1]] for i in range(len(pn))]
    trace = {}
    pipe.generate(prompt_embeds=embeds, prompt_mask=masks, guidance_scale=0.0, more_smooth=False,
                  token_sampler=lambda si, lg: codes[si].to(lg.device), trace=trace)
    for si in range(len(pn)):
        got = trace[f"stage{si:02d}/logits"]
        want = logits[:, bounds[si]:bounds[si + 1]]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_diffusion_loss_is_finite_and_positive():
    from hart_fast.model.diffusion import SimpleMLPAdaLN

    torch.manual_seed(0)
    net = SimpleMLPAdaLN(4, 16, 8, 2)
    loss = diffusion_loss(net, torch.randn(32, 4) * 0.3, torch.randn(32, 8), DiffusionTrainingSchedule())
    assert torch.isfinite(loss) and float(loss) > 0
    loss.backward()
    assert all(p.grad is not None for p in net.parameters())


def test_guided_loss_terms_are_the_plain_loss_under_one_condition():
    """With one condition for both halves, each half's hybrid loss is the plain loss
    of the same draw and the guided noise is the conditional one (its MSE is the
    plain loss's MSE part); with two conditions the guided term is
    (1 + w) eps_cond - w eps_uncond, replayed here by hand."""
    from hart_fast.model.diffusion import SimpleMLPAdaLN
    from hart_fast.train.diffusion_loss import guided_diffusion_loss

    torch.manual_seed(0)
    net = SimpleMLPAdaLN(4, 16, 8, 2)
    torch.nn.init.normal_(net.final_layer.linear.weight, std=0.1)  # the MLP starts at zero output otherwise
    for blk in net.res_blocks:
        torch.nn.init.normal_(blk.adaLN_modulation[-1].weight, std=0.1)
    sched = DiffusionTrainingSchedule()
    target, z, z_u = torch.randn(32, 4) * 0.3, torch.randn(32, 8), torch.randn(32, 8)
    w = 5.0 * torch.rand(32, generator=torch.Generator().manual_seed(8))
    # The draw replayed: timesteps, then noise, from the same generator.
    g = torch.Generator().manual_seed(7)
    t = torch.randint(0, sched.num_steps, (32,), generator=g)
    noise = torch.randn(32, 4, generator=g)
    x_t = sched.sqrt_ac[t, None] * target / 0.6 + sched.sqrt_1m_ac[t, None] * noise
    with torch.no_grad():
        eps_c, eps_u = net(x_t, t, z)[:, :4], net(x_t, t, z_u)[:, :4]

    plain = diffusion_loss(net, target, z, sched, generator=torch.Generator().manual_seed(7))
    same = guided_diffusion_loss(net, target, z, z, sched, w, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(same["diff_cond"], plain, rtol=1e-6, atol=0)
    torch.testing.assert_close(same["diff_uncond"], plain, rtol=1e-6, atol=0)
    assert float(same["eps_gap"]) == 0.0
    torch.testing.assert_close(same["mse_guided"], (noise - eps_c).pow(2).mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(same["loss"], 2 * plain + same["mse_guided"], rtol=1e-6, atol=0)

    two = guided_diffusion_loss(net, target, z, z_u, sched, w, generator=torch.Generator().manual_seed(7))
    assert float(two["eps_gap"]) > 0
    want = (noise - ((1 + w[:, None]) * eps_c - w[:, None] * eps_u)).pow(2).mean()
    torch.testing.assert_close(two["mse_guided"], want, rtol=1e-5, atol=0)
    two["loss"].backward()
    assert all(p.grad is not None for p in net.parameters())


def test_residual_steps_lower_the_guided_loss_and_leave_the_transformer_alone(tiny_dir, tmp_path):
    from hart_fast.train.finetune import train_residual

    tr, tok, data, embeds, masks, caps, enc = _encoded(tiny_dir)
    frozen = {n: p.detach().clone() for n, p in tr.named_parameters() if not n.startswith("diffloss.")}
    mlp_before = {n: p.detach().clone() for n, p in tr.diffloss.net.named_parameters()}
    from hart_fast.train.transformer import ResidualStep

    probe = ResidualStep(tr, tok.quantize.embedding.weight, data, embeds, masks, batch=16, seed=0)
    first = {k: float(v) for k, v in probe(0).items()}
    train_residual(tr, tok, data, caps, enc, str(tmp_path), steps=40, batch=16, lr=3e-3, seed=0, progress=False)
    last = {k: float(v) for k, v in probe(0).items()}
    assert last["loss"] < first["loss"] and last["mse_guided"] < first["mse_guided"], (first, last)
    for n, p in tr.named_parameters():
        if n in frozen:
            assert torch.equal(p.detach(), frozen[n]), n
    assert any(not torch.equal(p.detach(), mlp_before[n]) for n, p in tr.diffloss.net.named_parameters())
    assert read_loss_log(str(tmp_path))[-1]["step"] == 39


def test_save_then_from_pretrained_round_trip(tiny_dir, tmp_path):
    from hart_fast.pipeline import HartPipeline

    tr, tok, _ = load_models(tiny_dir)
    with torch.no_grad():
        for p in tr.parameters():
            p.add_(0.01)  # not the file's weights any more
    llm, tk = read_configs(tiny_dir)
    out = save_model_folder(str(tmp_path / "saved"), tr, tok, llm, tk)
    tr2, tok2, _ = load_models(out)
    for (k, a), (_, b) in zip(tr.state_dict().items(), tr2.state_dict().items()):
        assert torch.equal(a, b), k
    for (k, a), (_, b) in zip(tok.state_dict().items(), tok2.state_dict().items()):
        assert torch.equal(a, b), k
    ctx = torch.randn(2, tr.cfg.context_token, TINY_LLM["context_dim"])
    a = HartPipeline(tr, tok, "cpu", torch.float32, None, fast=False).generate(prompt_embeds=ctx, seed=3)
    b = HartPipeline.from_pretrained(out, fast=False).generate(prompt_embeds=ctx, seed=3)
    assert torch.equal(a, b)


def test_atomic_save_keeps_the_old_file_when_saving_fails(tmp_path):
    path = str(tmp_path / "ck.pt")
    atomic_save({"v": 1}, path)

    class Bad:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_save({"v": Bad()}, path)
    assert torch.load(path)["v"] == 1
    assert os.listdir(tmp_path) == ["ck.pt"]


def test_resumed_run_equals_an_uninterrupted_one(tiny_dir, tmp_path):
    def run(steps, run_dir):
        _, tok, _ = load_models(tiny_dir)
        from hart_fast.train.scenes import to_tensor_pm1

        imgs = lambda s: to_tensor_pm1(SceneDataset(10**6, seed=2, size=SIZE).batch(range(4 * s, 4 * s + 4))[0])  # noqa: E731
        step = TokenizerStep(tok, imgs, TINY_TOK["v_patch_nums"], restart_every=4)
        train_loop(run_dir=run_dir, modules={"tokenizer": tok}, step_fn=step, steps=steps, lr=1e-3, warmup=2,
                   seed=7, desc="tokenizer", ckpt_every=3, progress=False)
        return tok

    whole = run(6, str(tmp_path / "a"))
    run(3, str(tmp_path / "b"))
    resumed = run(6, str(tmp_path / "b"))
    for (k, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


# -- fine-tuning ---------------------------------------------------------------


def write_folder(root, n=6, convention="txt", size=SIZE):
    os.makedirs(root, exist_ok=True)
    imgs, caps = tiny_images(n, seed=9)
    rows = []
    for i, (im, cap) in enumerate(zip(imgs, caps)):
        name = f"img{i}.png"
        Image.fromarray(im).resize((size, size)).save(os.path.join(root, name))
        if convention == "txt":
            with open(os.path.join(root, f"img{i}.txt"), "w") as f:
                f.write(cap)
        rows.append({"file_name": name, "text": cap})
    if convention == "jsonl":
        with open(os.path.join(root, "metadata.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return root


@pytest.mark.parametrize("convention", ["txt", "jsonl"])
def test_finetune_a_tiny_official_folder(tiny_dir, tmp_path, convention):
    data = write_folder(str(tmp_path / "data"), convention=convention)
    out = finetune(tiny_dir, data, str(tmp_path / "out"), steps=3, batch=4, progress=False)
    tr0, _, _ = load_models(tiny_dir)
    tr1, _, _ = load_models(out)
    assert any(not torch.equal(a, b) for a, b in zip(tr0.state_dict().values(), tr1.state_dict().values()))
    assert os.path.isdir(os.path.join(out, "text_encoder"))
    from hart_fast import generate

    img = generate("a red circle on a blue background", model=out)
    assert img.size == (SIZE, SIZE)


def _assert_nothing_written(tmp_path):
    assert not os.path.exists(tmp_path / "out")


def test_finetune_refuses_an_empty_folder(tiny_dir, tmp_path):
    os.makedirs(tmp_path / "empty")
    with pytest.raises(DatasetError, match="no captioned images in .*empty"):
        finetune(tiny_dir, str(tmp_path / "empty"), str(tmp_path / "out"), steps=1, progress=False)
    _assert_nothing_written(tmp_path)
    with pytest.raises(DatasetError, match="not found"):
        finetune(tiny_dir, str(tmp_path / "nope"), str(tmp_path / "out"), steps=1, progress=False)


def test_finetune_refuses_a_missing_caption(tiny_dir, tmp_path):
    data = write_folder(str(tmp_path / "data"))
    os.unlink(os.path.join(data, "img2.txt"))
    with pytest.raises(DatasetError, match="caption file missing for .*img2.png"):
        finetune(tiny_dir, data, str(tmp_path / "out"), steps=1, progress=False)
    _assert_nothing_written(tmp_path)


def test_finetune_refuses_images_of_the_wrong_size(tiny_dir, tmp_path):
    data = write_folder(str(tmp_path / "data"), size=SIZE * 2)
    with pytest.raises(DatasetError, match=r"img0.png' is 16x16, but the model makes 8x8"):
        finetune(tiny_dir, data, str(tmp_path / "out"), steps=1, progress=False)
    _assert_nothing_written(tmp_path)


def test_finetune_refuses_an_unreadable_image(tiny_dir, tmp_path):
    data = write_folder(str(tmp_path / "data"))
    with open(os.path.join(data, "img1.png"), "wb") as f:
        f.write(b"not a png")
    with pytest.raises(DatasetError, match="cannot read image .*img1.png"):
        finetune(tiny_dir, data, str(tmp_path / "out"), steps=1, progress=False)
    _assert_nothing_written(tmp_path)


def test_finetune_refuses_bad_metadata(tiny_dir, tmp_path):
    data = write_folder(str(tmp_path / "data"), convention="jsonl")
    with open(os.path.join(data, "metadata.jsonl"), "a") as f:
        f.write('{"file_name": "missing.png", "text": "a red star on a black background"}\n')
    with pytest.raises(DatasetError, match=r"metadata.jsonl, line 7: image .*missing.png' does not exist"):
        read_caption_folder(data)


def test_finetune_refuses_an_init_of_another_architecture(tiny_dir, tmp_path):
    data = write_folder(str(tmp_path / "data"))
    other = str(tmp_path / "other")
    write_model(other, llm_overrides={"context_dim": 40}, seed=1)
    import shutil

    shutil.copytree(os.path.join(tiny_dir, "text_encoder"), os.path.join(other, "text_encoder"))
    with pytest.raises(ValueError, match="hidden size 24, but .*other' expects context_dim 40"):
        finetune(other, data, str(tmp_path / "out"), steps=1, progress=False)
    _assert_nothing_written(tmp_path)
    decode_only = str(tmp_path / "decode_only")
    write_model(decode_only, with_encoder=False)
    with pytest.raises(DatasetError, match="no encoder weights"):
        finetune(decode_only, data, str(tmp_path / "out"), steps=1, progress=False)
    _assert_nothing_written(tmp_path)


def test_a_checkpoint_of_another_architecture_is_refused(tiny_dir, tmp_path):
    _, tok, _ = load_models(tiny_dir)
    from hart_fast.train.scenes import to_tensor_pm1

    x = to_tensor_pm1(tiny_images(4)[0])
    train_loop(run_dir=str(tmp_path), modules={"tokenizer": tok}, step_fn=TokenizerStep(tok, lambda s: x, [1, 2, 3, 4]),
               steps=1, lr=1e-3, warmup=1, seed=0, desc="tokenizer", progress=False)
    other = str(tmp_path / "m2")
    write_model(other, tok_overrides={"vocab_size": 48})
    _, tok2, _ = load_models(other)
    with pytest.raises(ValueError, match="another architecture"):
        train_loop(run_dir=str(tmp_path), modules={"tokenizer": tok2},
                   step_fn=TokenizerStep(tok2, lambda s: x, [1, 2, 3, 4]), steps=2, lr=1e-3, warmup=1, seed=0,
                   desc="tokenizer", progress=False)


def test_load_images_reads_rgb(tmp_path):
    data = write_folder(str(tmp_path / "d"), n=2)
    arr = load_images(read_caption_folder(data), SIZE)
    assert arr.shape == (2, SIZE, SIZE, 3) and arr.dtype == np.uint8


def test_cli_train_finetune_reports_bad_input_and_writes_nothing(tiny_dir, tmp_path, capsys):
    from hart_fast.cli import main as run_cli

    os.makedirs(tmp_path / "empty")
    code = run_cli(["train", "finetune", "--init", tiny_dir, "--data", str(tmp_path / "empty"),
                    "--out", str(tmp_path / "out"), "-q"])
    assert code == 2
    assert "no captioned images in" in capsys.readouterr().err
    _assert_nothing_written(tmp_path)
    assert run_cli(["train", "finetune", "--init", tiny_dir, "--data", str(tmp_path / "empty"),
                    "--out", str(tmp_path / "out"), "--steps", "0"]) == 2
    assert "--steps and --batch must be >= 1" in capsys.readouterr().err


def test_cli_train_finetune_writes_a_loadable_folder(tiny_dir, tmp_path):
    from hart_fast.cli import main as run_cli

    data = write_folder(str(tmp_path / "data"), convention="jsonl")
    assert run_cli(["train", "finetune", "--init", tiny_dir, "--data", data, "--out", str(tmp_path / "out"),
                    "--steps", "2", "--batch", "2", "-q"]) == 0
    tr, tok, _ = load_models(str(tmp_path / "out"))
    assert tok.has_encoder
    log = read_loss_log(str(tmp_path / ".out-run" / "transformer"))
    assert log[-1]["step"] == 1 and "ce" in log[-1] and "diff" in log[-1]


# -- the demo recipe -------------------------------------------------------------


def test_the_recipe_gives_each_tokenizer_phase_its_own_edge_weight(tmp_path, monkeypatch):
    """Phase 1 trains with tok_edge_weight and phase 2 with tok_refine_edge_weight
    (both with the widened mask and the object weight)."""
    import dataclasses

    import hart_fast.train.tokenizer as tokenizer_mod
    from hart_fast.train import recipe

    made = []

    class Recording(tokenizer_mod.TokenizerStep):
        def __init__(self, *args, **kw):
            made.append(kw)
            super().__init__(*args, **kw)

    monkeypatch.setattr(tokenizer_mod, "TokenizerStep", Recording)
    r = dataclasses.replace(recipe.PROFILES["cpu"], tok_batch=2, tok_steps=1, tok_refine_steps=1,
                            tok_edge_weight=0.75, tok_refine_edge_weight=0.25, tok_mask_dilate=1)
    recipe.train_tokenizer_stage(str(tmp_path / "work"), r, progress=False)
    assert [(kw["edge_weight"], kw["mask_dilate"], kw["object_weight"]) for kw in made] == [
        (0.75, 1, r.tok_object_weight), (0.25, 1, r.tok_object_weight)]


@pytest.mark.parametrize("phase1", ["plain", "objects"])
def test_the_demo_recipe_end_to_end_with_a_time_budget(tmp_path, phase1):
    """Every stage of the demo recipe at a few steps (its real architecture): the
    budget is planned from probed step times and written to plan.json, a rerun reads
    the plan and trains nothing more, and the export loads and draws."""
    import dataclasses

    from hart_fast.train import recipe

    work = str(tmp_path / "work")
    r = dataclasses.replace(recipe.PROFILES["cpu"], tok_batch=2, tr_scenes=12, res_scenes=8, tr_batch=4,
                            budget_s=1e-3, min_planned_steps=2, tok_phase1=phase1, dec_steps=1)
    recipe.train_tokenizer_stage(work, r, progress=False)
    recipe.train_transformer_stage(work, r, progress=False)
    tr_ck = torch.load(os.path.join(work, "transformer", "checkpoint.pt"), weights_only=False)["modules"]
    recipe.train_residual_stage(work, r, progress=False)
    recipe.train_decoder_stage(work, r, progress=False)
    plan = recipe.read_plan(work)
    assert sorted(plan) == ["decoder", "residual", "tokenizer", "tokenizer_objects", "transformer"]
    for name, entry in plan.items():
        assert entry["steps"] == 2 and entry["seconds_per_step"] > 0, (name, entry)
        assert read_loss_log(os.path.join(work, name))[-1]["step"] == 1
    out = recipe.export_stage(work, r, str(tmp_path / "model"))
    # The export holds the transformer stage's transformer and the residual stage's MLP.
    tr, _, _ = load_models(out)
    res_ck = torch.load(os.path.join(work, "residual", "checkpoint.pt"), weights_only=False)["modules"]["diffusion"]
    for name, p in tr.state_dict().items():
        want = res_ck[name[len("diffloss.net."):]] if name.startswith("diffloss.net.") else tr_ck["transformer"][name]
        assert torch.equal(p, want.half().float()), name
    assert any(not torch.equal(v, tr_ck["transformer"]["diffloss.net." + k]) for k, v in res_ck.items())
    # ... and the decoder stage's decoder on the tokenizer stage's encoder and codebook.
    _, tok_out, _ = load_models(out)
    tok_ck = torch.load(os.path.join(work, "tokenizer_objects", "checkpoint.pt"), weights_only=False)["modules"]
    dec_ck = torch.load(os.path.join(work, "decoder", "checkpoint.pt"), weights_only=False)["modules"]
    decoder_keys = [k for k in tok_ck["tokenizer"] if k.startswith(recipe.DECODER_PREFIXES)]
    assert decoder_keys and any(not torch.equal(dec_ck["tokenizer"][k], tok_ck["tokenizer"][k]) for k in decoder_keys)
    for name, p in tok_out.state_dict().items():
        src = dec_ck if name.startswith(recipe.DECODER_PREFIXES) else tok_ck
        assert torch.equal(p, src["tokenizer"][name].half().float()), name
    # The residual stage read the first res_scenes of the transformer's cached codes.
    cached = torch.load(os.path.join(work, "encoded.pt"), weights_only=False)
    part = recipe.encode_stage(work, r, recipe.load_tokenizer_stage(work, r), False, n=r.res_scenes)
    assert part["captions"] == cached["captions"][:8] and len(cached["captions"]) == 12
    assert all(torch.equal(part["data"][k], v[:8]) for k, v in cached["data"].items())
    # An MLP refined for another transformer is not exported with this one.
    stamp_path = os.path.join(work, "residual", "transformer_stamp.json")
    with open(stamp_path) as f:
        stamp = json.load(f)
    with open(stamp_path, "w") as f:
        json.dump(dict(stamp, transformer=stamp["transformer"] + 1), f)
    with pytest.raises(RuntimeError, match="refined another transformer"):
        recipe.export_stage(work, r, str(tmp_path / "model2"))
    assert not os.path.exists(tmp_path / "model2")
    with open(stamp_path, "w") as f:
        json.dump(stamp, f)
    # Nor a decoder refined on another tokenizer's codes.
    dec_stamp_path = os.path.join(work, "decoder", "tokenizer_stamp.json")
    with open(dec_stamp_path) as f:
        dec_stamp = json.load(f)
    with open(dec_stamp_path, "w") as f:
        json.dump({"encoder": dec_stamp["encoder"] + 1}, f)
    with pytest.raises(RuntimeError, match="another tokenizer's decoder"):
        recipe.export_stage(work, r, str(tmp_path / "model2"))
    assert not os.path.exists(tmp_path / "model2")
    with open(dec_stamp_path, "w") as f:
        json.dump(dec_stamp, f)
    # A rerun finds every stage done: the plan is not probed again, nothing retrains.
    before = {n: os.path.getmtime(os.path.join(work, n, "checkpoint.pt")) for n in plan}
    recipe.train_tokenizer_stage(work, dataclasses.replace(r, budget_s=1e6), progress=False)
    assert recipe.read_plan(work) == plan
    # Another recipe on the same folder is refused, naming what differs.
    other = "plain" if phase1 == "objects" else "objects"
    with pytest.raises(ValueError, match=f"tok_phase1='{phase1}' \\(now '{other}'\\)"):
        recipe.train_tokenizer_stage(work, dataclasses.replace(r, tok_phase1=other), progress=False)
    assert {n: os.path.getmtime(os.path.join(work, n, "checkpoint.pt")) for n in plan} == before
    import hart_fast

    img = hart_fast.generate("a red circle on a blue background", model=out, output_type="pt")
    assert img.shape == (3, 64, 64) and torch.isfinite(img).all()


def test_the_residual_stage_from_a_model_folder_checks_it(tiny_dir, tmp_path, capsys):
    """--from-model: only with the residual / export stages, only a folder of the demo
    architecture; refused before anything is written."""
    from hart_fast.demo import DEMO_DIR
    from hart_fast.train import recipe

    work = str(tmp_path / "w")
    with pytest.raises(SystemExit):
        recipe.main(["--work", work, "--stage", "tokenizer", "--from-model", DEMO_DIR])
    assert "--from-model goes with --stage residual or --stage export" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        recipe.main(["--work", work, "--stage", "residual", "--from-model", str(tmp_path / "nowhere")])
    assert "is not a folder" in capsys.readouterr().err
    with pytest.raises(ValueError,
                       match="is not the demo architecture: its llm/config.json has .*depth=2 \\(the recipe.s: 4\\)"):
        recipe.main(["--work", work, "--stage", "residual", "--from-model", tiny_dir])
    no_te = str(tmp_path / "no-text-encoder")
    shutil.copytree(DEMO_DIR, no_te, ignore=shutil.ignore_patterns("text_encoder"))
    with pytest.raises(FileNotFoundError, match="has no text_encoder/ folder"):
        recipe.main(["--work", work, "--stage", "residual", "--from-model", no_te])
    assert not os.path.exists(work)


def test_export_from_a_model_folder_without_a_residual_stage_keeps_its_weights(tmp_path):
    import dataclasses

    from hart_fast.demo import DEMO_DIR
    from hart_fast.train import recipe
    from safetensors.torch import load_file

    out = recipe.export_stage(str(tmp_path / "w"), dataclasses.replace(recipe.Recipe(), res_steps=0),
                              str(tmp_path / "m"), from_model=DEMO_DIR)
    for part in ("llm", "tokenizer"):
        name = [f for f in os.listdir(os.path.join(DEMO_DIR, part)) if f.endswith(".safetensors")][0]
        a, b = load_file(os.path.join(DEMO_DIR, part, name)), load_file(os.path.join(out, part, name))
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), part


def test_the_recipe_refuses_a_gpu_profile_without_cuda(tmp_path, capsys):
    from hart_fast.train import recipe

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA, so the gpu profile is allowed")
    with pytest.raises(SystemExit):
        recipe.main(["--work", str(tmp_path / "w"), "--profile", "gpu"])
    assert "no CUDA device" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "w")
    with pytest.raises(SystemExit):
        recipe.main(["--work", str(tmp_path / "w"), "--budget-min", "0"])
    assert "--budget-min must be positive" in capsys.readouterr().err
    with pytest.raises(ValueError, match="tok_phase1"):
        recipe.train_tokenizer_stage(str(tmp_path / "w2"), recipe.Recipe(tok_phase1="crowded"), progress=False)


def test_scene_images_sampled_ahead_in_a_thread_are_the_same_batches():
    from hart_fast.train.recipe import SceneImages, refine_images_fn, scene_images_fn
    from hart_fast.train.scenes import SceneDataset, dense_scene_at, render, to_tensor_pm1

    plain = scene_images_fn(5, 3, 64)
    want = to_tensor_pm1(SceneDataset(10**6, seed=5).batch(range(6, 9))[0])
    assert torch.equal(plain(2), want)
    fn = refine_images_fn(5, 4, 64)
    ahead = SceneImages(fn.scenes_at, 64, "cpu", lookahead=2)
    for step in (0, 1, 2, 7, 3):  # in order, then a jump, then back
        assert torch.equal(ahead(step), fn(step)), step
    dense = np.stack([render(dense_scene_at(5, 3 * 4 + i)) for i in range(2)])
    assert torch.equal(fn(3)[2:], to_tensor_pm1(dense))
    # Closing stops the sampling thread: nothing is left pending, and the pool is gone.
    pool = ahead._pool
    with ahead:
        pass
    assert ahead._pool is None and not ahead._pending
    with pytest.raises(RuntimeError):
        pool.submit(lambda: None)


def test_cli_train_demo_passes_its_options_to_the_recipe(tmp_path, monkeypatch):
    from hart_fast import cli
    from hart_fast.train import recipe

    seen = []
    monkeypatch.setattr(recipe, "train_tokenizer_stage", lambda work, r, progress: seen.append((work, r, progress)))
    work = str(tmp_path / "w")
    assert cli.main(["train", "demo", "--work", work, "--stage", "tokenizer", "--tok-phase1", "plain",
                     "--budget-min", "2", "--quiet"]) == 0
    (got_work, r, progress), = seen
    assert got_work == work and r.tok_phase1 == "plain" and r.budget_s == 120.0 and not progress
    assert r.device == "cpu" and r.tok_batch == recipe.PROFILES["cpu"].tok_batch
    with pytest.raises(SystemExit):
        cli.main(["train", "demo", "--work", work, "--tok-phase1", "crowded"])


def test_cli_train_demo_passes_from_model_to_the_residual_stage(tmp_path, monkeypatch):
    from hart_fast import cli
    from hart_fast.demo import DEMO_DIR
    from hart_fast.train import recipe

    seen = []
    monkeypatch.setattr(recipe, "train_residual_stage",
                        lambda work, r, progress, from_model=None: seen.append((work, r.res_steps, from_model)))
    work = str(tmp_path / "w")
    assert cli.main(["train", "demo", "--work", work, "--stage", "residual", "--from-model", DEMO_DIR, "-q"]) == 0
    assert seen == [(work, recipe.PROFILES["cpu"].res_steps, DEMO_DIR)]


def test_a_folder_started_before_a_recipe_setting_existed_takes_its_value(tmp_path):
    """recipe.json of a folder from before the residual stage has no res_* keys: the
    folder is accepted, the new settings are recorded, and changing them later is refused."""
    import dataclasses

    from hart_fast.train import recipe

    work = str(tmp_path / "w")
    os.makedirs(work)
    r = recipe.Recipe()
    old = {k: v for k, v in dataclasses.asdict(r).items()
           if k not in recipe.RESUMABLE_ACROSS and not k.startswith("res_")}
    with open(os.path.join(work, "recipe.json"), "w") as f:
        json.dump(old, f)
    # Refused for another reason (tr_steps), it records nothing.
    with pytest.raises(ValueError, match="tr_steps"):
        recipe.check_recipe(work, dataclasses.replace(r, tr_steps=r.tr_steps + 1))
    with open(os.path.join(work, "recipe.json")) as f:
        assert json.load(f) == old
    recipe.check_recipe(work, r)
    with open(os.path.join(work, "recipe.json")) as f:
        assert json.load(f)["res_steps"] == r.res_steps
    with pytest.raises(ValueError, match="res_steps"):
        recipe.check_recipe(work, dataclasses.replace(r, res_steps=r.res_steps + 1))


def test_a_folder_from_before_the_tokenizer_loss_terms_keeps_its_loss(tmp_path):
    """A folder whose recipe.json predates the widened mask and the edge loss trained
    its tokenizer without them: it is continued only by a recipe without them, and a
    recipe with them is refused, naming the setting. The tokenizer's autocast may
    differ between the runs of a folder (it is how, not what, it trains)."""
    import dataclasses

    from hart_fast.train import recipe

    work = str(tmp_path / "w")
    os.makedirs(work)
    r = recipe.Recipe()
    old = {k: v for k, v in dataclasses.asdict(r).items()
           if k not in recipe.RESUMABLE_ACROSS
           and k not in ("tok_mask_dilate", "tok_edge_weight", "tok_refine_edge_weight")}
    with open(os.path.join(work, "recipe.json"), "w") as f:
        json.dump(old, f)
    with pytest.raises(ValueError, match=r"tok_edge_weight=0.0 \(now 1.0\), tok_mask_dilate=0 \(now 2\)"):
        recipe.check_recipe(work, r)
    legacy = dataclasses.replace(r, tok_mask_dilate=0, tok_edge_weight=0.0, tok_refine_edge_weight=0.0)
    recipe.check_recipe(work, legacy)
    recipe.check_recipe(work, dataclasses.replace(legacy, tok_cpu_autocast="none"))
    with open(os.path.join(work, "recipe.json")) as f:
        rec = json.load(f)
    assert rec["tok_mask_dilate"] == 0 and rec["tok_edge_weight"] == 0.0 and "tok_cpu_autocast" not in rec


def test_a_folder_of_the_sixth_model_keeps_its_phase_two_edge_term(tmp_path):
    """A folder made before phase 2 had its own edge weight trained phase 2 with the
    folder's tok_edge_weight: today's recipe (phase 2 without it) is refused, naming
    the setting, and one with the same weight in both phases continues it."""
    import dataclasses

    from hart_fast.train import recipe

    work = str(tmp_path / "w")
    os.makedirs(work)
    r = dataclasses.replace(recipe.Recipe(), tok_refine_edge_weight=0.0)   # the seventh model's
    assert r.tok_edge_weight == 1.0
    old = {k: v for k, v in dataclasses.asdict(r).items()
           if k not in recipe.RESUMABLE_ACROSS and k != "tok_refine_edge_weight"}
    with open(os.path.join(work, "recipe.json"), "w") as f:
        json.dump(old, f)
    with pytest.raises(ValueError, match=r"tok_refine_edge_weight=1.0 \(now 0.0\)"):
        recipe.check_recipe(work, r)
    recipe.check_recipe(work, dataclasses.replace(r, tok_refine_edge_weight=r.tok_edge_weight))
    with open(os.path.join(work, "recipe.json")) as f:
        assert json.load(f)["tok_refine_edge_weight"] == r.tok_edge_weight
    # An older folder still (no edge loss at all) takes 0 for both.
    older = str(tmp_path / "older")
    os.makedirs(older)
    with open(os.path.join(older, "recipe.json"), "w") as f:
        json.dump({k: v for k, v in old.items() if k not in ("tok_mask_dilate", "tok_edge_weight")}, f)
    recipe.check_recipe(older, dataclasses.replace(r, tok_mask_dilate=0, tok_edge_weight=0.0))
    with open(os.path.join(older, "recipe.json")) as f:
        assert json.load(f)["tok_refine_edge_weight"] == 0.0
