"""The product surface: hart_fast.generate, the Qwen2 text encoder path, the CLI, bad input."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import hart_fast
from hart_fast import api, cli
from hart_fast.demo import DEMO_DIR, write_text_encoder
from hart_fast.text_encoder import LLM_SYSTEM_PROMPT, QwenTextEncoder

from tiny_models import TINY_LLM, write_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny model with its own Qwen2 text encoder (hidden size = context_dim 24)."""
    d = write_model(str(tmp_path_factory.mktemp("api")))
    write_text_encoder(os.path.join(d, "text_encoder"), hidden_size=TINY_LLM["context_dim"], seed=5)
    return d


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv("HART_FAST_MODEL", raising=False)
    monkeypatch.delenv("HART_FAST_TEXT_ENCODER", raising=False)


# ----------------------------------------------------------------------------- text encoder
def test_qwen_encoder_matches_direct_hf_forward(tiny_dir):
    from transformers import AutoModel, AutoTokenizer

    path = os.path.join(tiny_dir, "text_encoder")
    enc = QwenTextEncoder.from_pretrained(path, max_length=6)
    prompts = ["a red apple", "hi"]
    embeds, mask = enc(prompts)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True)
    ids = torch.stack([tok(p, padding="max_length", max_length=6, truncation=True, return_tensors="pt").input_ids[0]
                       for p in prompts])
    m = ids != tok.pad_token_id
    sys_ids = tok(LLM_SYSTEM_PROMPT, max_length=6, truncation=True, return_tensors="pt").input_ids.repeat(2, 1)
    with torch.no_grad():
        h = model(torch.cat([sys_ids, ids], 1), attention_mask=torch.cat([torch.ones_like(sys_ids, dtype=torch.bool), m], 1),
                  output_hidden_states=True).hidden_states[-1][:, sys_ids.shape[1]:]
    assert embeds.dtype == torch.float32 and embeds.shape == (2, 6, TINY_LLM["context_dim"])
    assert torch.equal(mask, m) and mask[1].sum() == 2  # "hi": 2 byte tokens, then padding
    torch.testing.assert_close(embeds, h)
    # Without the system prompt: the prompt tokens alone through the same model.
    no_sys = QwenTextEncoder(model, tok, max_length=6, use_system_prompt=False)(prompts)[0]
    with torch.no_grad():
        h_no_sys = model(ids, attention_mask=m, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(no_sys, h_no_sys)
    assert not torch.allclose(no_sys, embeds)  # the system prompt matters


@pytest.mark.parametrize("max_length", [6, 40])
def test_cached_system_prompt_is_the_concatenated_pass(tmp_path, max_length):
    """The system prompt's keys and values, computed once, then only the prompt
    tokens: the official concatenated pass's hidden states, for a batch with padding,
    a second call (the cached prefix is reused, not extended) and another batch size."""
    path = write_text_encoder(str(tmp_path / "te"), hidden_size=32, seed=5, num_layers=3,
                              words=["a", "red", "apple", "on", "blue", "background", "Given", "user", "prompt"])
    cached = QwenTextEncoder.from_pretrained(path, max_length=max_length)
    full = QwenTextEncoder.from_pretrained(path, max_length=max_length, cache_system_prompt=False)
    assert cached.cache_system_prompt and not full.cache_system_prompt
    for prompts in (["a red apple", "hi", "a red apple on a blue background"], ["x"], ["a red apple", "hi"]):
        e_c, m_c = cached(prompts)
        e_f, m_f = full(prompts)
        assert torch.equal(m_c, m_f)
        scale = float(e_f.abs().max())
        torch.testing.assert_close(e_c, e_f, rtol=1e-5, atol=1e-6 * scale)
    assert cached._prefix[1] == min(max_length, len(cached.tokenizer(LLM_SYSTEM_PROMPT).input_ids))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="offloading to the CPU between calls needs a CUDA device to compute on"))])
def test_offloaded_encoder_keeps_its_weights_off_the_compute_device(tmp_path, device):
    path = write_text_encoder(str(tmp_path / "te"), hidden_size=32, seed=6)
    enc = QwenTextEncoder.from_pretrained(path, device=device, max_length=8, offload=True)
    ref = QwenTextEncoder.from_pretrained(path, device=device, max_length=8)
    assert all(p.device.type == "cpu" for p in enc.model.parameters())
    for _ in range(2):  # the weights go back to the host copies, and come again
        e, m = enc(["a red apple", "hi"])
        assert e.device.type == device
        torch.testing.assert_close(e, ref(["a red apple", "hi"])[0], rtol=0, atol=0)
        assert all(p.device.type == "cpu" for p in enc.model.parameters())
    assert enc.device.type == device


def test_long_prompt_truncates_with_warning(tiny_dir):
    enc = QwenTextEncoder.from_pretrained(os.path.join(tiny_dir, "text_encoder"), max_length=6)
    with pytest.warns(UserWarning, match="truncated"):
        embeds, mask = enc(["a prompt much longer than six tokens"])
    assert mask.all() and embeds.shape[1] == 6


def test_text_encoder_hidden_size_mismatch(tiny_dir, tmp_path):
    other = write_text_encoder(str(tmp_path / "te48"), hidden_size=48)
    with pytest.raises(ValueError, match="hidden size 48.*context_dim 24"):
        hart_fast.generate("x", model=tiny_dir, text_encoder=other)


def test_missing_text_encoder_folder(tiny_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="text encoder folder not found"):
        hart_fast.generate("x", model=tiny_dir, text_encoder=str(tmp_path / "nope"))


def test_model_without_text_encoder_says_what_to_pass(tmp_path):
    d = write_model(str(tmp_path / "m"))
    with pytest.raises(ValueError, match="HART_FAST_TEXT_ENCODER"):
        hart_fast.generate("x", model=d)


# ----------------------------------------------------------------------------- python API
def test_default_model_works_out_of_the_box():
    image = hart_fast.generate("a red apple")  # one string: one image
    assert isinstance(image, Image.Image) and image.size == (64, 64)
    images = hart_fast.generate(["a red apple"])
    assert len(images) == 1 and isinstance(images[0], Image.Image)
    assert api.load_pipeline(None) is api.load_pipeline(DEMO_DIR)  # cached between calls


def test_env_vars_pick_model_and_encoder(tiny_dir, monkeypatch, tmp_path):
    bare = write_model(str(tmp_path / "bare"))
    monkeypatch.setenv("HART_FAST_MODEL", bare)
    monkeypatch.setenv("HART_FAST_TEXT_ENCODER", os.path.join(tiny_dir, "text_encoder"))
    out = hart_fast.generate(["a", "b"], output_type="pt")
    assert out.shape == (2, 3, 8, 8)


def test_callable_encoder_and_prompt_embeds_agree(tiny_dir):
    torch.manual_seed(0)
    table = torch.randn(3, 6, 24)

    def encoder(prompts):
        return table[[int(p) for p in prompts]]

    a = hart_fast.generate(["0", "2"], model=tiny_dir, text_encoder=encoder, output_type="pt", seed=3)
    b = hart_fast.generate(model=tiny_dir, prompt_embeds=table[[0, 2]], output_type="pt", seed=3)
    assert torch.equal(a, b)


def test_image_k_uses_seed_plus_k_whatever_the_batch_size(tiny_dir):
    prompts = ["p0", "p1", "p2", "p3", "p4"]
    all_ = hart_fast.generate(prompts, model=tiny_dir, batch_size=2, seed=10, output_type="pt")
    assert all_.shape[0] == 5
    # Same images whatever the batching, up to float rounding (GEMMs over another row
    # count round differently; test_generate checks the codes are the same exactly).
    from numerics import assert_mostly_close

    again = hart_fast.generate(prompts, model=tiny_dir, batch_size=5, seed=10, output_type="pt")
    assert_mostly_close(again, all_, tight=1e-4, cap=2e-2)  # images lie in [0, 1]
    second = hart_fast.generate(prompts[2:4], model=tiny_dir, batch_size=1, seed=12, output_type="pt")
    assert_mostly_close(second, all_[2:4], tight=1e-4, cap=2e-2)
    assert not torch.allclose(all_[2], all_[3], atol=1e-2)  # different seeds, different images
    n2 = hart_fast.generate(["p0", "p1"], model=tiny_dir, images_per_prompt=2, batch_size=8, output_type="pt")
    assert n2.shape[0] == 4 and not torch.equal(n2[0], n2[1])  # same prompt, different samples


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(prompts=[]), ValueError, "no prompts"),
        (dict(prompts=None), ValueError, "no prompts"),
        (dict(prompts=["ok", 3]), TypeError, "prompt 1 is a int"),
        (dict(prompts="x", cfg=float("inf")), ValueError, "guidance_scale"),
        (dict(prompts="x", top_k=-2), ValueError, "top_k"),
        (dict(prompts="x", top_p=1.5), ValueError, "top_p"),
        (dict(prompts="x", diffusion_steps=0), ValueError, "diffusion_steps"),
        (dict(prompts="x", batch_size=0), ValueError, "batch_size"),
        (dict(prompts="x", seed=-1), ValueError, "seed"),
        (dict(prompts="x", sampler="euler"), TypeError, "unexpected option 'sampler'"),
        (dict(prompts="x", dtype="float16"), RuntimeError, "float16 is not supported on the CPU"),
        (dict(prompts="x", dtype="int8"), ValueError, "unsupported dtype"),
        (dict(prompts="x", device="cuda:0"), RuntimeError, "CUDA is not available") if not torch.cuda.is_available()
        else (dict(prompts="x", device="tpu"), RuntimeError, "unsupported device"),
    ],
)
def test_bad_input_errors(tiny_dir, kwargs, exc, match):
    prompts = kwargs.pop("prompts")
    with pytest.raises(exc, match=match):
        hart_fast.generate(prompts, model=tiny_dir, **kwargs)


def test_oom_reports_batch_size(tiny_dir, monkeypatch):
    pipe = api.load_pipeline(tiny_dir)

    def boom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")

    monkeypatch.setattr(pipe, "generate", boom)
    with pytest.raises(RuntimeError, match="batch of 3 images.*--batch-size 1"):
        hart_fast.generate(["a", "b", "c"], model=pipe, text_encoder=lambda p: torch.zeros(len(p), 6, 24),
                           batch_size=3)


# ----------------------------------------------------------------------------- CLI
def run_cli(args, stdin=""):
    old = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        return cli.main(args)
    finally:
        sys.stdin = old


@pytest.mark.cuda  # the CLI's default device is the GPU where there is one
def test_cli_generate_png_with_metadata(tiny_dir, tmp_path, capsys):
    out = tmp_path / "apple.png"
    assert run_cli(["generate", "a red apple", "--model", tiny_dir, "--out", str(out), "--seed", "7", "-q"]) == 0
    im = Image.open(out)
    meta = json.loads(im.text["hart_fast"])
    assert im.text["prompt"] == "a red apple" and meta["seed"] == 7 and meta["guidance_scale"] == 4.5
    assert meta["more_smooth"] is True and meta["batch_prompts"] == ["a red apple"]
    # Regenerating the image alone from its metadata (device and dtype included: the
    # CLI's default device is the GPU where there is one) gives the same pixels.
    again = hart_fast.generate(meta["prompt"], model=tiny_dir, seed=meta["seed"],
                               device=meta["device"], dtype=meta["dtype"])
    import numpy as np

    assert np.array_equal(np.asarray(again), np.asarray(im.convert("RGB")))
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".hart-fast")]


@pytest.mark.cuda  # default device
def test_cli_prompts_from_stdin_and_file_folder_output(tiny_dir, tmp_path):
    folder = tmp_path / "imgs"
    assert run_cli(["generate", "--model", tiny_dir, "--out", str(folder), "-n", "2", "-q"], stdin="one\n\ntwo\n") == 0
    assert sorted(os.listdir(folder)) == [f"{i:06d}.png" for i in range(4)]
    f = tmp_path / "prompts.txt"
    f.write_text("alpha\nbeta\n")
    grid = tmp_path / "grid.png"
    assert run_cli(["generate", "--model", tiny_dir, "--file", str(f), "--out", str(grid), "--grid", "-q"]) == 0
    assert Image.open(grid).size == (16, 8)


@pytest.mark.parametrize(
    "args,stdin,match",
    [
        ([], "", "no prompts given"),
        (["x", "--out", "/nonexistent-dir/a.png"], "", "does not exist"),
        (["x", "--cfg", "nan"], "", "guidance_scale"),
        (["x", "-n", "0"], "", "-n must be >= 1"),
        (["x", "--batch-size", "0"], "", "--batch-size must be >= 1"),
        (["x", "--dtype", "float16", "--device", "cpu"], "", "float16 is not supported"),
        (["x", "--top-p", "2"], "", "top_p"),
        (["x", "--prune-ratios", "0.5,1.5"], "", "prune_ratios[1] must be a fraction"),
        (["x", "--prune-ratios", "0.5,0.5,0.5"], "", "between 1 and 2 of the last ones"),
        (["x", "--guidance-until", "99"], "", "guidance_until must be None or an integer in [-4, 4]"),
    ],
)
def test_cli_bad_input(tiny_dir, tmp_path, capsys, args, stdin, match):
    out_dir = tmp_path / "o"
    full = ["generate", "--model", tiny_dir, "-q"] + args
    if "--out" not in args:
        full += ["--out", str(out_dir)]
    assert run_cli(full, stdin) == cli.EXIT_USAGE
    assert match in capsys.readouterr().err
    assert not out_dir.exists() or not os.listdir(out_dir)


def test_cli_bad_model_folders(tiny_dir, tmp_path, capsys):
    import shutil

    cases = {}
    cases["missing"] = str(tmp_path / "missing")
    no_tok = tmp_path / "no_tok"
    shutil.copytree(tiny_dir, no_tok)
    shutil.rmtree(no_tok / "tokenizer")
    cases["tokenizer folder not found"] = str(no_tok)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_dir, corrupt)
    (corrupt / "llm" / "model.safetensors").write_bytes(b"\0" * 100)
    cases["cannot read weights file"] = str(corrupt)
    badcfg = tmp_path / "badcfg"
    shutil.copytree(tiny_dir, badcfg)
    cfg = json.loads((badcfg / "llm" / "config.json").read_text())
    cfg["attn_type"] = "gpt2"
    (badcfg / "llm" / "config.json").write_text(json.dumps(cfg))
    cases["attn_type 'gpt2' is not supported"] = str(badcfg)
    for match, path in cases.items():
        out = tmp_path / f"out-{abs(hash(match))}"
        code = run_cli(["generate", "x", "--model", path, "--out", str(out), "-q"])
        err = capsys.readouterr().err
        assert code == cli.EXIT_USAGE and (match in err or "not found" in err), (match, err)
        assert not any(f.endswith(".png") for f in os.listdir(out)) if out.exists() else True


def test_cli_output_path_is_a_file_not_folder(tiny_dir, tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    assert run_cli(["generate", "x", "--model", tiny_dir, "--out", str(f), "-q"]) == cli.EXIT_USAGE
    assert "not a folder" in capsys.readouterr().err


def test_cli_interrupted_write_leaves_nothing(tiny_dir, tmp_path, monkeypatch):
    def failing_save(self, fp, *a, **k):
        fp.write(b"\x89PNG partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", failing_save)
    out = tmp_path / "o"
    assert run_cli(["generate", "x", "--model", tiny_dir, "--out", str(out), "-q"]) == 130
    assert os.listdir(out) == []


def test_cli_info(tiny_dir, capsys):
    assert run_cli(["info", tiny_dir]) == 0
    out = capsys.readouterr().out
    assert "depth 2, width 32" in out and "kernels" in out and "parameters" in out


@pytest.mark.cuda  # the README's command as is: the GPU where there is one
def test_python_dash_m_and_console_entry(tmp_path):
    out = tmp_path / "star.png"
    r = subprocess.run([sys.executable, "-m", "hart_fast", "generate", "a yellow star on a blue background",
                        "--out", str(out), "-q"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    # Says plainly which model made it: a small trained model, not HART 0.7B.
    assert "trained on procedural scenes, not the HART 0.7B model" in r.stderr
    assert "trained on procedural scenes, not the HART 0.7B model" in Image.open(out).text["hart_fast"]


def test_device_description_and_driver_check(monkeypatch):
    from hart_fast import device

    lines = device.describe()
    assert any(line.startswith("kernels:") for line in lines) and any("torch:" in line for line in lines)
    import triton  # installed with the README's ".[all]"

    assert any(line.startswith("triton:") and triton.__version__ in line for line in lines)
    if not torch.cuda.is_available():
        assert any("none (CPU only)" in line for line in lines)
    monkeypatch.setattr(device, "driver_cuda_version", lambda: 11020)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    with pytest.raises(RuntimeError, match="driver supports CUDA 11.2.*built for CUDA 13.0"):
        device.check_driver_for_kernels()
