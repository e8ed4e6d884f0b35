"""Loader behaviour on generated folders: formats, EMA selection, and every error case."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hart_fast.config import ConfigError, TokenizerConfig, TransformerConfig
from hart_fast.loading import CheckpointError
from hart_fast.pipeline import HartPipeline

from tiny_models import TINY_LLM, random_prompts, write_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model(str(tmp_path_factory.mktemp("tiny")))


def copy_model(model_dir, tmp_path):
    dst = str(tmp_path / "m")
    shutil.copytree(model_dir, dst)
    return dst


def edit_json(path, **changes):
    with open(path) as f:
        d = json.load(f)
    for k, v in changes.items():
        if v is ...:
            d.pop(k)
        else:
            d[k] = v
    with open(path, "w") as f:
        json.dump(d, f)


def gen(pipe, seed=0, **kw):
    cfg = pipe.config
    ctx, mask = random_prompts(2, cfg.context_token, cfg.context_dim, seed=3)
    return pipe.generate(ctx, mask, seed=seed, **kw)


def test_loads_and_generates(model_dir):
    pipe = HartPipeline.from_pretrained(model_dir)
    img = gen(pipe)
    assert img.shape == (2, 3, 4 * 2, 4 * 2)  # last grid 4, tokenizer downsample 2
    assert img.min() >= 0 and img.max() <= 1
    assert pipe.tokenizer.has_encoder


@pytest.mark.parametrize("fmt", ["bin", "sharded"])
def test_other_weight_formats_give_identical_weights(model_dir, tmp_path, fmt):
    other = write_model(str(tmp_path / fmt), llm_format=fmt)
    a = HartPipeline.from_pretrained(model_dir).transformer.state_dict()
    b = HartPipeline.from_pretrained(other).transformer.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_llm_folder_path_resolves_sibling_tokenizer(model_dir):
    pipe = HartPipeline.from_pretrained(os.path.join(model_dir, "llm"))
    assert pipe.info.tokenizer_dir == os.path.join(os.path.abspath(model_dir), "tokenizer")


def test_ema_selection(model_dir, tmp_path):
    d = copy_model(model_dir, tmp_path)
    sd = load_file(os.path.join(d, "llm", "model.safetensors"))
    ema = {k: (v + 1.0 if k == "head.bias" else v) for k, v in sd.items()}
    base = HartPipeline.from_pretrained(d, use_ema=False)
    with pytest.raises(FileNotFoundError, match="use_ema=True"):
        HartPipeline.from_pretrained(d, use_ema=True)
    torch.save(ema, os.path.join(d, "llm", "ema_model.bin"))
    auto = HartPipeline.from_pretrained(d)  # None: EMA when the file is there
    forced = HartPipeline.from_pretrained(d, use_ema=True)
    off = HartPipeline.from_pretrained(d, use_ema=False)
    assert auto.info.used_ema and forced.info.used_ema and not off.info.used_ema
    assert torch.equal(auto.transformer.head.bias, base.transformer.head.bias + 1.0)
    assert torch.equal(off.transformer.head.bias, base.transformer.head.bias)


def test_missing_folder_names_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="HART model folder not found"):
        HartPipeline.from_pretrained(str(tmp_path / "nope"))


def test_folder_without_llm(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(FileNotFoundError, match="llm"):
        HartPipeline.from_pretrained(str(tmp_path / "x"))


def test_missing_tokenizer_folder(model_dir, tmp_path):
    d = copy_model(model_dir, tmp_path)
    shutil.rmtree(os.path.join(d, "tokenizer"))
    with pytest.raises(FileNotFoundError, match="tokenizer folder not found"):
        HartPipeline.from_pretrained(d)


def test_missing_weights_file(model_dir, tmp_path):
    d = copy_model(model_dir, tmp_path)
    os.remove(os.path.join(d, "llm", "model.safetensors"))
    with pytest.raises(CheckpointError, match="no weights found"):
        HartPipeline.from_pretrained(d)


def test_truncated_weights_file(model_dir, tmp_path):
    d = copy_model(model_dir, tmp_path)
    path = os.path.join(d, "llm", "model.safetensors")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read weights file .*model.safetensors"):
        HartPipeline.from_pretrained(d)


def test_corrupt_bin_file(model_dir, tmp_path):
    d = copy_model(model_dir, tmp_path)
    os.remove(os.path.join(d, "llm", "model.safetensors"))
    with open(os.path.join(d, "llm", "pytorch_model.bin"), "wb") as f:
        f.write(b"not a torch file")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        HartPipeline.from_pretrained(d)


def _rewrite(d, sub, fn):
    path = os.path.join(d, sub, "model.safetensors")
    sd = load_file(path)
    fn(sd)
    save_file(sd, path)


def test_unexpected_key_names_key_and_file(model_dir, tmp_path):
    d = copy_model(model_dir, tmp_path)
    _rewrite(d, "llm", lambda sd: sd.__setitem__("blocks.0.attn.bogus", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"unexpected key 'blocks.0.attn.bogus' in .*llm.*model.safetensors"):
        HartPipeline.from_pretrained(d)


def test_missing_key_names_key_and_file(model_dir, tmp_path):
    d = copy_model(model_dir, tmp_path)
    _rewrite(d, "llm", lambda sd: sd.pop("head.weight"))
    with pytest.raises(CheckpointError, match=r"missing key 'head.weight' in .*model.safetensors"):
        HartPipeline.from_pretrained(d)


def test_shape_mismatch_names_key_and_shapes(model_dir, tmp_path):
    d = copy_model(model_dir, tmp_path)
    _rewrite(d, "llm", lambda sd: sd.__setitem__("word_embed.weight", torch.zeros(32, 5)))
    with pytest.raises(CheckpointError, match=r"shape mismatch for 'word_embed.weight'.*\(32, 5\).*\(32, 4\)"):
        HartPipeline.from_pretrained(d)


def test_tokenizer_key_outside_vae_or_disc(model_dir, tmp_path):
    d = copy_model(model_dir, tmp_path)
    _rewrite(d, "tokenizer", lambda sd: sd.__setitem__("stray.weight", torch.zeros(1)))
    with pytest.raises(CheckpointError, match="unexpected key 'stray.weight'"):
        HartPipeline.from_pretrained(d)


def test_partial_encoder_is_missing_key_error(model_dir, tmp_path):
    d = copy_model(model_dir, tmp_path)
    _rewrite(d, "tokenizer", lambda sd: sd.pop("vae.encoder.conv_in.weight"))
    with pytest.raises(CheckpointError, match="missing key 'encoder.conv_in.weight'"):
        HartPipeline.from_pretrained(d)


def test_decode_only_tokenizer_loads_and_refuses_encode(tmp_path):
    d = write_model(str(tmp_path / "dec"), with_encoder=False)
    pipe = HartPipeline.from_pretrained(d)
    assert not pipe.tokenizer.has_encoder
    gen(pipe)
    with pytest.raises(RuntimeError, match="cannot encode images"):
        pipe.tokenizer.img_to_latent(torch.zeros(1, 3, 8, 8))


def test_tampered_level_ids_rejected(model_dir, tmp_path):
    d = copy_model(model_dir, tmp_path)
    _rewrite(d, "llm", lambda sd: sd["lvl_1L"].add_(1))
    with pytest.raises(CheckpointError, match="lvl_1L"):
        HartPipeline.from_pretrained(d)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"not_a_hart_key": 1}, "unknown config key 'not_a_hart_key'"),
        ({"attn_type": "gpt2"}, "attn_type 'gpt2' is not supported"),
        ({"attn_type": "xl"}, "unsupported attn_type"),
        ({"mlp_type": "moe"}, "unsupported mlp_type"),
        ({"use_cross_attn": True}, "use_cross_attn"),
        ({"sampler": "ddim"}, "unsupported sampler"),
        ({"sep_aln_pooling_mode": "mean"}, "sep_aln_pooling_mode"),
        ({"num_heads": 5}, "not divisible by num_heads"),
        ({"depth": "2"}, "'depth' must be a positive integer"),
        ({"num_sampling_steps": "abc"}, "invalid num_sampling_steps"),
        ({"model_type": "llama"}, "model_type is 'llama'"),
    ],
)
def test_llm_config_errors_name_key_and_file(model_dir, tmp_path, change, match):
    d = copy_model(model_dir, tmp_path)
    edit_json(os.path.join(d, "llm", "config.json"), **change)
    with pytest.raises(ConfigError, match=match) as e:
        HartPipeline.from_pretrained(d)
    assert "config.json" in str(e.value)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"quantizer_type": "fsq"}, "unsupported quantizer_type"),
        ({"mystery": 3}, "unknown config key 'mystery'"),
        ({"ch": 24}, "not divisible by the 32 GroupNorm groups"),
    ],
)
def test_tokenizer_config_errors(model_dir, tmp_path, change, match):
    d = copy_model(model_dir, tmp_path)
    edit_json(os.path.join(d, "tokenizer", "config.json"), **change)
    with pytest.raises(ConfigError, match=match):
        HartPipeline.from_pretrained(d)


def test_invalid_json(model_dir, tmp_path):
    d = copy_model(model_dir, tmp_path)
    with open(os.path.join(d, "llm", "config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        HartPipeline.from_pretrained(d)


def test_training_only_keys_are_accepted_and_listed():
    cfg = TransformerConfig.from_dict({**TINY_LLM, "drop_path_rate": 0.1, "cond_drop_rate": 0.2})
    assert "drop_path_rate" in TransformerConfig.TRAINING_ONLY
    assert cfg.drop_path_rate == 0.1
    tk = TokenizerConfig.from_dict({"beta": 0.5, "levels": [8, 8]})
    assert "beta" in TokenizerConfig.TRAINING_ONLY and tk.beta == 0.5


def test_every_official_key_is_a_field():
    """The official config classes' keys (HARTForT2IConfig / HARTAutoEncoderConfig)."""
    llm_keys = {
        "vae_path", "context_token", "context_dim", "depth", "embed_dim", "num_heads", "mlp_ratio",
        "drop_rate", "attn_drop_rate", "drop_path_rate", "norm_eps", "shared_aln", "cond_drop_rate",
        "attn_l2_norm", "patch_nums", "flash_if_available", "fused_if_available", "mlp_type", "attn_type",
        "disable_aln", "use_timestep_embed", "sep_aln_pooling_mode", "use_cross_attn", "diff_width",
        "diff_depth", "num_sampling_steps", "diffusion_batch_mul", "sampler", "use_context_norm",
        "context_norm_scale", "diffusion_head_repeats",
    }
    tok_keys = {
        "vocab_size", "z_channels", "ch", "dropout", "beta", "using_znorm", "quant_conv_ks", "quant_resi",
        "share_quant_resi", "default_qresi_counts", "v_patch_nums", "test_mode", "ch_mult", "levels",
        "quantizer_type", "hybrid", "disable_quant_resi", "freeze_codebook_for_hybrid", "double_decoder",
    }
    import dataclasses

    assert llm_keys == {f.name for f in dataclasses.fields(TransformerConfig)}
    assert tok_keys == {f.name for f in dataclasses.fields(TokenizerConfig)}
