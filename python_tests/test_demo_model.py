"""The embedded demo model is a trained artefact: its size, its name, and its
prompt adherence on held-out prompts (a regression in it must fail here).

The floors sit below the values measured in BENCHMARKS.md ("The trained demo
model") by a margin for the small sample; the measurement uses more prompts.
"""

from __future__ import annotations

import json
import os

import pytest

from hart_fast.demo import DEMO_DIR, DEMO_NAME
from hart_fast.eval.judge import accuracy, judge
from hart_fast.eval.quality import generate_images
from hart_fast.train.scenes import heldout_prompts

# Per-attribute floors on 8 held-out prompts x 2 images, default settings, for the
# attributes the current demo (the sixth) gets right well above chance (measured on
# this set: background 100%, object colour 69%, size 94%, position 100%; on the
# larger set of BENCHMARKS.md 96%, 71%, 96% and 94%; chance 12%, 12%, 50% and 11%;
# the random-weight demo of the first release scored 10%, 19%, 50% and 6%). Shape
# reads 50% on the larger set but 19% on this small one (its small objects), so it
# has no floor yet; raise these when the demo improves. With 16 images the floors
# leave room for another CPU's rounding to change a few draws (binomial tails under
# 1% at the larger set's rates).
FLOORS = {"background": 0.75, "color": 0.4, "size": 0.7, "position": 0.75}
# The speed presets on the same set (background / colour / size / position; in
# float32 with int8 projections, as on CPUs without native bfloat16: balanced 94% /
# 69% / 94% / 94%, fastest, which does not prune the demo's small scales, 100% / 62%
# / 88% / 94%; with cpu_bf16 instead: balanced 94% / 81% / 100% / 94%, fastest 94% /
# 69% / 94% / 100%): a preset that stops following prompts fails.
PRESET_FLOORS = {"balanced": {"background": 0.75, "color": 0.35, "size": 0.6, "position": 0.7},
                 "fastest": {"background": 0.75, "color": 0.35, "size": 0.6, "position": 0.7}}


def test_the_demo_is_small_and_says_what_it_is():
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(DEMO_DIR) for f in fs)
    assert total <= 20 * 2**20, f"the embedded demo is {total / 2**20:.1f} MB (the budget is 20 MB)"
    with open(os.path.join(DEMO_DIR, "README.md")) as f:
        readme = f.read()
    assert "trained on procedural scenes" in readme and "not the HART 0.7B model" in readme
    assert "not the HART 0.7B model" in DEMO_NAME
    with open(os.path.join(DEMO_DIR, "llm", "config.json")) as f:
        assert json.load(f)["model_type"] == "hart_transformer_t2i"


@pytest.fixture(scope="module")
def held_out_run():
    scenes = heldout_prompts(8)
    images = generate_images(None, [s.caption for s in scenes], 2)
    return scenes, images


def test_the_demo_follows_held_out_prompts(held_out_run):
    scenes, images = held_out_run
    acc = accuracy([judge(im) for im in images], [s for s in scenes for _ in range(2)])
    for attr, floor in FLOORS.items():
        assert acc[attr] >= floor, (attr, acc)


def test_the_prompt_matters(held_out_run):
    """Scored against the prompt they were made for, the images do better than
    scored against another prompt (the text conditioning reaches the picture)."""
    scenes, images = held_out_run
    js = [judge(im) for im in images]
    own = accuracy(js, [s for s in scenes for _ in range(2)])
    other = accuracy(js, [s for s in scenes[1:] + scenes[:1] for _ in range(2)])
    assert own["background"] > other["background"] + 0.3, (own, other)


# The presets as this machine runs them, and fastest as a CPU with native bfloat16
# runs it (with cpu_bf16, hart_fast.speed.PRESET_EXTRAS), whatever this CPU is.
@pytest.mark.parametrize("speed, extra", [(s, {}) for s in sorted(PRESET_FLOORS)] + [("fastest", {"cpu_bf16": True})],
                         ids=[*sorted(PRESET_FLOORS), "fastest-cpu_bf16"])
def test_speed_presets_keep_following_held_out_prompts(speed, extra):
    scenes = heldout_prompts(8)
    images = generate_images(None, [s.caption for s in scenes], 2, speed=speed, **extra)
    acc = accuracy([judge(im) for im in images], [s for s in scenes for _ in range(2)])
    for attr, floor in PRESET_FLOORS[speed].items():
        assert acc[attr] >= floor, (speed, attr, acc)
