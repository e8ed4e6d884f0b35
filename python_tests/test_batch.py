"""`hart-fast batch`: prompt files in, PNGs plus a manifest out; seeds per image; resume."""

from __future__ import annotations

import io
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

from hart_fast import cli
from hart_fast.batch import PromptFileError, expand, read_manifest, read_prompt_rows, run_batch

from tiny_models import write_model

from hart_fast.demo import write_text_encoder


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    d = write_model(str(root / "m"))  # with its own tiny Qwen2 text encoder, as the demo model
    write_text_encoder(os.path.join(d, "text_encoder"), 24, seed=1)
    return d


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_reads_txt_and_jsonl_rows(tmp_path):
    assert read_prompt_rows(_write(tmp_path, "p.txt", "a\n\n  b  \n")) == [{"prompt": "a"}, {"prompt": "b"}]
    rows = read_prompt_rows(_write(tmp_path, "p.jsonl", '{"prompt": "x", "seed": 5, "n": 2, "cfg": 3.0}\n\n'
                                                        '{"prompt": "y"}\n'))
    assert rows == [{"prompt": "x", "seed": 5, "n": 2, "guidance_scale": 3.0}, {"prompt": "y"}]


@pytest.mark.parametrize("name,text,match", [
    ("p.txt", "\n\n", "no prompts"),
    ("p.jsonl", '{"prompt": "x"}\n{"prompt": 3}\n', r"p.jsonl:2: 'prompt' must be a non-empty string"),
    ("p.jsonl", '{"prompt": "x", "colour": 1}\n', r"unknown key\(s\) \['colour'\]"),
    ("p.jsonl", '{"prompt": "x", "n": 0}\n', "'n' must be an integer >= 1"),
    ("p.jsonl", 'not json\n', r"p.jsonl:1: not valid JSON"),
    ("p.csv", "a\n", "unknown prompt file type"),
])
def test_bad_prompt_files_name_the_line(tmp_path, name, text, match):
    with pytest.raises(PromptFileError, match=match):
        read_prompt_rows(_write(tmp_path, name, text))


def test_seeds_depend_on_the_run_seed_and_the_index_only():
    rows = [{"prompt": "a", "n": 2}, {"prompt": "b", "seed": 40, "n": 3}, {"prompt": "c"}]
    items = expand(rows, seed=10)
    assert [(it.index, it.prompt, it.seed) for it in items] == [
        (0, "a", 10), (1, "a", 11), (2, "b", 40), (3, "b", 41), (4, "b", 42), (5, "c", 15)]


def test_batch_run_manifest_metadata_and_batch_size_independence(model, tmp_path):
    prompts = _write(tmp_path, "p.jsonl", '{"prompt": "a red apple", "n": 2}\n{"prompt": "a cat", "cfg": 2.0}\n'
                                          '{"prompt": "a blue car"}\n')
    out = str(tmp_path / "o")
    seen = []
    res = run_batch(prompts, out, model=model, seed=3, batch_size=2, progress=lambda d, t: seen.append((d, t)))
    assert res.written == [0, 1, 2, 3] and res.skipped == []
    assert seen[0] == (0, 4) and seen[-1] == (4, 4)
    recs = [json.loads(line) for line in open(os.path.join(out, "manifest.jsonl"))]
    assert [r["index"] for r in recs] == [0, 1, 2, 3] and [r["seed"] for r in recs] == [3, 4, 5, 6]
    assert recs[2]["settings"]["guidance_scale"] == 2.0 and recs[0]["settings"]["guidance_scale"] == 4.5
    meta = json.loads(Image.open(os.path.join(out, "000002.png")).text["hart_fast"])
    assert meta["prompt"] == "a cat" and meta["seed"] == 5 and meta["guidance_scale"] == 2.0
    assert meta["levers"] == {"guidance_until": None, "prune_ratios": None, "diffusion_steps": None,
                              "topk_sampling": None, "int8_weights": None, "fp8_weights": None,
                              "cpu_bf16": None}  # exact: no lever
    # Another batch size: the same codes per image (per-row streams); PNG pixels equal
    # up to float rounding of GEMMs over another row count (a rare 1/255 step).
    out1 = str(tmp_path / "o1")
    run_batch(prompts, out1, model=model, seed=3, batch_size=1)
    for r in recs:
        a, b = _pixels(os.path.join(out, r["file"])).astype(int), _pixels(os.path.join(out1, r["file"])).astype(int)
        assert np.abs(a - b).max() <= 1 and (a == b).mean() >= 0.99
    assert not [p for p in os.listdir(out) if p.startswith(".hart-fast")]  # no temporary files left


def test_resume_skips_done_images_and_redoes_the_rest(model, tmp_path):
    prompts = _write(tmp_path, "p.txt", "one\ntwo\nthree\nfour\n")
    out = str(tmp_path / "o")
    full = run_batch(prompts, out, model=model, seed=0, batch_size=2)
    assert full.written == [0, 1, 2, 3]
    reference = {i: _pixels(os.path.join(out, f"{i:06d}.png")) for i in range(4)}
    manifest = os.path.join(out, "manifest.jsonl")
    lines = open(manifest).read().splitlines(keepends=True)
    # A run killed after image 1's PNG and in the middle of image 2's manifest line:
    os.remove(os.path.join(out, "000003.png"))
    open(manifest, "w").write("".join(lines[:2]) + lines[2][:10])
    again = run_batch(prompts, out, model=model, seed=0, batch_size=2)
    assert again.skipped == [0, 1] and again.written == [2, 3]
    recs = [json.loads(line) for line in open(manifest)]
    assert [r["index"] for r in recs] == [0, 1, 2, 3]  # none lost, none twice, no broken line
    for i in range(4):
        assert np.array_equal(_pixels(os.path.join(out, f"{i:06d}.png")), reference[i])
    assert run_batch(prompts, out, model=model, seed=0).written == []  # all done
    with pytest.raises(ValueError, match="exists: rerun with resume"):
        run_batch(prompts, out, model=model, resume=False)
    assert set(read_manifest(out)) == {0, 1, 2, 3}


def test_cli_batch_and_its_errors(model, tmp_path, capsys):
    prompts = _write(tmp_path, "p.txt", "a red apple\n")
    out = tmp_path / "o"
    old = sys.stdin
    sys.stdin = io.StringIO("")
    try:
        assert cli.main(["batch", prompts, "--out", str(out), "--model", model, "--device", "cpu", "-q"]) == 0
        assert "1 images written" in capsys.readouterr().err
        assert sorted(os.listdir(out)) == ["000000.png", "manifest.jsonl"]
        bad = _write(tmp_path, "bad.jsonl", '{"prompt": "x", "cfg": -1}\n')
        code = cli.main(["batch", bad, "--out", str(tmp_path / "b"), "--model", model, "--device", "cpu", "-q"])
        assert code == cli.EXIT_USAGE and "must be >= 0" in capsys.readouterr().err
        assert not (tmp_path / "b").exists()  # nothing written for a refused file
    finally:
        sys.stdin = old



# ---------------------------------------------------------------------------------
# On Ray (a local cluster, shared by these tests: starting one costs ~5 s)
# ---------------------------------------------------------------------------------
def _hashes(out):
    import hashlib

    recs = [json.loads(line) for line in open(os.path.join(out, "manifest.jsonl"))]
    return {r["index"]: (r["seed"], hashlib.sha256(open(os.path.join(out, r["file"]), "rb").read()).hexdigest())
            for r in recs}, [r["index"] for r in recs]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray  # the `ray` extra, part of `all` (the README's install): a missing Ray fails, never skips
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_matches_one_worker_and_in_process(model, tmp_path, ray_cluster):
    prompts = _write(tmp_path, "p.txt", "\n".join(f"prompt number {i}" for i in range(10)))
    runs = {}
    for name, kw in (("two", dict(ray="auto", workers=2)), ("one", dict(ray="auto", workers=1))):
        res = run_batch(prompts, str(tmp_path / name), model=model, seed=7, batch_size=2, **kw)
        assert res.runner.startswith("ray") and sorted(res.written) == list(range(10))
        runs[name] = _hashes(str(tmp_path / name))
    assert runs["two"][0] == runs["one"][0]  # the same images whatever the number of workers
    assert sorted(runs["two"][1]) == list(range(10))  # each image once, in whatever order it finished


def test_ray_killed_worker_redoes_its_batch_and_resume_gives_the_same_manifest(model, tmp_path, ray_cluster,
                                                                               monkeypatch):
    prompts = _write(tmp_path, "p.txt", "\n".join(f"p{i}" for i in range(8)))
    clean = str(tmp_path / "clean")
    run_batch(prompts, clean, model=model, seed=1, batch_size=2, ray="auto", workers=2)
    marker = tmp_path / "killed"
    monkeypatch.setenv("HART_FAST_BATCH_KILL", f"5:{marker}")
    out = str(tmp_path / "o")
    res = run_batch(prompts, out, model=model, seed=1, batch_size=2, ray="auto", workers=2)
    assert marker.exists(), "the worker was not killed"
    assert sorted(res.written) == list(range(8))
    killed = _hashes(out)
    assert sorted(killed[1]) == list(range(8))  # none lost, none written twice
    assert killed[0] == _hashes(clean)[0]
    # Killed halfway (half the manifest and one PNG gone), then resumed on Ray.
    monkeypatch.delenv("HART_FAST_BATCH_KILL")
    manifest = os.path.join(out, "manifest.jsonl")
    lines = open(manifest).read().splitlines(keepends=True)
    open(manifest, "w").write("".join(lines[:4]))
    os.remove(os.path.join(out, json.loads(lines[0])["file"]))
    again = run_batch(prompts, out, model=model, seed=1, batch_size=2, ray="auto", workers=2)
    assert len(again.skipped) == 3 and len(again.written) == 5
    assert _hashes(out)[0] == _hashes(clean)[0]


def test_without_ray_the_batch_runs_in_process_and_says_so(model, tmp_path, monkeypatch, caplog):
    import hart_fast.batch_ray as batch_ray

    monkeypatch.setattr(batch_ray, "ray_available", lambda: False)
    prompts = _write(tmp_path, "p.txt", "a\nb\n")
    with caplog.at_level("WARNING", logger="hart_fast"):
        res = run_batch(prompts, str(tmp_path / "o"), model=model, ray="auto")
    assert res.written == [0, 1] and "Ray is not installed" in res.runner
    assert "Ray is not installed" in caplog.text


def test_parquet_prompt_file(tmp_path):
    import pyarrow as pa  # brought by the `ray` extra (ray[data])
    import pyarrow.parquet as pq

    path = str(tmp_path / "p.parquet")
    pq.write_table(pa.table({"prompt": ["a", "b"], "seed": [3, None], "n": [2, 1]}), path)
    assert read_prompt_rows(path) == [{"prompt": "a", "seed": 3, "n": 2}, {"prompt": "b", "n": 1}]
    assert [it.seed for it in expand(read_prompt_rows(path), seed=10)] == [3, 4, 12]
