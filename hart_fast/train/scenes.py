"""Procedural captioned scenes: one or two flat-coloured shapes on a background.

Deterministic from a seed and rendered on the fly (nothing to download): scene i
of a dataset seeded s is drawn from `numpy.random.default_rng([s, i])`, so any
process renders the same scene for the same (seed, index).

A scene is a background colour and one or two objects, each a colour, a shape, a
size and a cell of a 3 x 3 grid. Captions come from templates and always hold
`a [size] {color} {shape}` and `on a {color} background`; size and position
words are optional in training captions (the renderer then picks them) and
always present in evaluation prompts.

Held-out combinations (compositional generalisation): a (object colour, shape,
background colour) triple is held out when `(color + 2 * shape + 3 * background)
% 8 == 0` (indices into COLORS / SHAPES / COLORS). Every pair of attributes still
occurs in training (each colour-shape pair is held out on one background at most,
each colour-background pair with one shape at most); only the triple is new.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 38, 38),
    "green": (34, 160, 60),
    "blue": (37, 70, 220),
    "yellow": (245, 215, 30),
    "orange": (245, 130, 20),
    "purple": (135, 50, 185),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOR_NAMES: Tuple[str, ...] = tuple(COLORS)
SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "star")
SIZES: Tuple[str, ...] = ("small", "large")
# Grid cell (column, row) of every position word; the phrase is what captions say.
POSITIONS: Dict[str, Tuple[int, int]] = {
    "top left": (0, 0), "top": (1, 0), "top right": (2, 0),
    "left": (0, 1), "centre": (1, 1), "right": (2, 1),
    "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2),
}
POSITION_PHRASES: Dict[str, str] = {
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "centre": "in the centre", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right",
}
CELL_TO_POSITION = {cell: name for name, cell in POSITIONS.items()}

# Half-extent in pixels of a shape at 64 px (scaled with the image size).
HALF_EXTENT_64 = {"small": 7.0, "large": 13.0}
SUPERSAMPLE = 4  # rendered at 4x and box-filtered: anti-aliased edges


@dataclasses.dataclass(frozen=True)
class SceneObject:
    color: str
    shape: str
    size: str
    position: str


@dataclasses.dataclass(frozen=True)
class Scene:
    background: str
    objects: Tuple[SceneObject, ...]
    caption: str
    # Pixel geometry of every object at 64 px: (cx, cy, half_extent), jittered.
    geometry: Tuple[Tuple[float, float, float], ...] = ()


def caption_words() -> List[str]:
    """Every word a caption can hold (the demo text encoder makes each one token)."""
    words = set(COLOR_NAMES) | set(SHAPES) | set(SIZES) | {"a", "and", "on", "background"}
    for phrase in POSITION_PHRASES.values():
        words |= set(phrase.split())
    return sorted(words)


def is_held_out(color: str, shape: str, background: str) -> bool:
    """Whether an (object colour, shape, background) triple is kept out of training."""
    c, s, b = COLOR_NAMES.index(color), SHAPES.index(shape), COLOR_NAMES.index(background)
    return (c + 2 * s + 3 * b) % 8 == 0


def object_phrase(obj: SceneObject, with_size: bool, with_position: bool) -> str:
    words = ["a"] + ([obj.size] if with_size else []) + [obj.color, obj.shape]
    if with_position:
        words.append(POSITION_PHRASES[obj.position])
    return " ".join(words)


def caption_for(background: str, objects: Sequence[SceneObject], with_size: Sequence[bool],
                with_position: Sequence[bool]) -> str:
    parts = [object_phrase(o, s, p) for o, s, p in zip(objects, with_size, with_position)]
    return " and ".join(parts) + f" on a {background} background"


def _far_apart(a: str, b: str) -> bool:
    """Two cells whose shapes cannot overlap at any size: two cells apart in a row or column."""
    (ca, ra), (cb, rb) = POSITIONS[a], POSITIONS[b]
    return abs(ca - cb) == 2 or abs(ra - rb) == 2


def sample_scene(rng: np.random.Generator, split: str = "train", two_object_prob: float = 0.25,
                 word_drop_prob: float = 0.3) -> Scene:
    """One random scene. split 'train' avoids held-out triples, 'heldout' draws only them.

    Training captions drop the size and the position words with probability
    word_drop_prob each (the renderer still picks them); held-out scenes are single
    objects with every attribute in the caption, as the evaluation prompts are.
    """
    if split not in ("train", "heldout", "any"):
        raise ValueError(f"split must be 'train', 'heldout' or 'any', got {split!r}")
    n_obj = 2 if (split == "train" and rng.random() < two_object_prob) else 1
    while True:
        bg = COLOR_NAMES[rng.integers(len(COLOR_NAMES))]
        colors = [c for c in COLOR_NAMES if c != bg]
        picked = list(rng.choice(len(colors), size=n_obj, replace=False))
        objs_cs = [(colors[i], SHAPES[rng.integers(len(SHAPES))]) for i in picked]
        held = [is_held_out(c, s, bg) for c, s in objs_cs]
        if split == "train" and any(held):
            continue
        if split == "heldout" and not all(held):
            continue
        break
    pos_names = list(POSITIONS)
    if n_obj == 2:
        pos_names = [p for p in pos_names if p != "centre"]  # the centre has no far-apart partner
    p0 = pos_names[rng.integers(len(pos_names))]
    positions = [p0]
    if n_obj == 2:
        far = [p for p in pos_names if _far_apart(p0, p)]
        positions.append(far[rng.integers(len(far))])
    objects = tuple(
        SceneObject(c, s, SIZES[rng.integers(len(SIZES))], p) for (c, s), p in zip(objs_cs, positions)
    )
    if split == "train":
        with_size = [bool(rng.random() >= word_drop_prob) for _ in objects]
        with_pos = [bool(rng.random() >= word_drop_prob) for _ in objects]
    else:
        with_size = with_pos = [True] * n_obj
    geometry = []
    for o in objects:
        col, row = POSITIONS[o.position]
        cx = 16.0 + 16.0 * col + rng.uniform(-2, 2)
        cy = 16.0 + 16.0 * row + rng.uniform(-2, 2)
        r = HALF_EXTENT_64[o.size] + rng.uniform(-1, 1)
        geometry.append((cx, cy, r))
    return Scene(bg, objects, caption_for(bg, objects, with_size, with_pos), tuple(geometry))


def scene_at(seed: int, index: int, split: str = "train") -> Scene:
    """Scene `index` of the dataset seeded `seed` (the same in every process)."""
    return sample_scene(np.random.default_rng([int(seed), int(index), {"train": 0, "heldout": 1, "any": 2}[split]]),
                        split)


def dense_scene(rng: np.random.Generator, n_range: Tuple[int, int] = (2, 6),
                half_extent_range: Tuple[float, float] = (5.0, 15.0)) -> Scene:
    """A crowded, uncaptioned scene for training the tokenizer: n_range objects of any
    colour, shape and size in between the two sizes, anywhere, overlapping.

    A captioned scene is mostly background (a small shape covers ~4% of it), so a
    tokenizer trained on those alone learns flat backgrounds long before objects;
    these scenes put many more object pixels and edges into every batch.
    """
    bg = COLOR_NAMES[rng.integers(len(COLOR_NAMES))]
    objects, geometry = [], []
    for _ in range(int(rng.integers(n_range[0], n_range[1] + 1))):
        color = [c for c in COLOR_NAMES if c != bg][rng.integers(len(COLOR_NAMES) - 1)]
        r = float(rng.uniform(*half_extent_range))
        cx, cy = (float(v) for v in rng.uniform(r - 2, 64 - r + 2, size=2))
        col, row = min(2, int(cx // (64 / 3))), min(2, int(cy // (64 / 3)))
        size = "small" if r < (HALF_EXTENT_64["small"] + HALF_EXTENT_64["large"]) / 2 else "large"
        objects.append(SceneObject(color, SHAPES[rng.integers(len(SHAPES))], size, CELL_TO_POSITION[(col, row)]))
        geometry.append((cx, cy, r))
    return Scene(bg, tuple(objects), "", tuple(geometry))


def dense_scene_at(seed: int, index: int) -> Scene:
    """Dense scene `index` of the tokenizer's training stream seeded `seed`."""
    return dense_scene(np.random.default_rng([int(seed), int(index), 3]))


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------


def _star_polygon(cx, cy, r, inner=0.45):
    ang = -np.pi / 2 + np.arange(10) * np.pi / 5
    rad = np.where(np.arange(10) % 2 == 0, r, r * inner)
    return np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], axis=1)


def _inside_polygon(x, y, poly):
    """Even-odd rule, vectorised over the pixel grid."""
    inside = np.zeros(x.shape, dtype=bool)
    n = len(poly)
    for i in range(n):
        x1, y1 = poly[i]
        x2, y2 = poly[(i + 1) % n]
        if y1 == y2:
            continue
        crosses = (y1 > y) != (y2 > y)
        x_at = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (x < x_at)
    return inside


def shape_mask(shape: str, cx: float, cy: float, r: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pixel-centre coverage (bool) of a shape with half-extent r centred at (cx, cy)."""
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    if shape == "square":
        h = 0.9 * r  # a square as wide as the circle would look bigger; 0.9 evens the area out
        return (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    if shape == "triangle":  # upright, base 2r, height 2r
        return (y <= cy + r) & (np.abs(x - cx) <= (y - (cy - r)) / 2)
    if shape == "star":  # five points, the top one up
        return _inside_polygon(x, y, _star_polygon(cx, cy, r))
    raise ValueError(f"unknown shape {shape!r} (known: {', '.join(SHAPES)})")


def render(scene: Scene, size: int = 64) -> np.ndarray:
    """The scene as a (size, size, 3) uint8 image, anti-aliased."""
    s = SUPERSAMPLE
    n = size * s
    scale = size / 64.0
    coords = (np.arange(n) + 0.5) / s                                        # pixel units of the output
    x, y = np.meshgrid(coords, coords, indexing="xy")
    img = np.empty((n, n, 3), dtype=np.float32)
    img[:] = COLORS[scene.background]
    for obj, (cx, cy, r) in zip(scene.objects, scene.geometry):
        m = shape_mask(obj.shape, cx * scale, cy * scale, r * scale, x, y)
        img[m] = COLORS[obj.color]
    img = img.reshape(size, s, size, s, 3).mean(axis=(1, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _shape_mask_torch(shape: str, cx, cy, r, x, y, star_polys=None):
    """shape_mask for R objects at once: cx, cy, r (R, 1, 1) float64, x (1, n), y (n, 1)
    -> (R, n, n) bool. The same formulas in the same order as shape_mask."""
    if shape == "circle":
        dx, dy = x - cx, y - cy
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        h = 0.9 * r
        return ((x - cx).abs() <= h) & ((y - cy).abs() <= h)
    if shape == "triangle":
        return (y <= cy + r) & ((x - cx).abs() <= (y - (cy - r)) / 2)
    if shape == "star":
        # Even-odd rule over the 10 edges; an edge with y1 == y2 never crosses,
        # so (as in _inside_polygon) it adds nothing whatever x_at is.
        inside = None
        n_v = star_polys.shape[1]
        for i in range(n_v):
            x1, y1 = star_polys[:, i, 0, None, None], star_polys[:, i, 1, None, None]
            x2, y2 = star_polys[:, (i + 1) % n_v, 0, None, None], star_polys[:, (i + 1) % n_v, 1, None, None]
            crosses = (y1 > y) != (y2 > y)
            x_at = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
            hit = crosses & (x < x_at)
            inside = hit if inside is None else inside ^ hit
        return inside
    raise ValueError(f"unknown shape {shape!r} (known: {', '.join(SHAPES)})")


def render_batch(scenes: Sequence[Scene], size: int = 64, device="cpu"):
    """`render` of many scenes at once in torch, on any device: uint8 (N, size, size, 3).

    Pixel for pixel what `render` draws (float64 coverage tests, float32
    box filter of integer colours, round half to even), so a training stream can
    render on the GPU that trains on it.
    """
    import torch

    dev = torch.device(device)
    s, n, scale = SUPERSAMPLE, size * SUPERSAMPLE, size / 64.0
    coords = (torch.arange(n, dtype=torch.float64, device=dev) + 0.5) / s
    x, y = coords.view(1, n), coords.view(n, 1)
    palette = torch.tensor([COLORS[c] for c in COLOR_NAMES], dtype=torch.float32, device=dev)
    N = len(scenes)
    bg = torch.tensor([COLOR_NAMES.index(sc.background) for sc in scenes], dtype=torch.long, device=dev)
    img = palette[bg].view(N, 1, 1, 3).expand(N, n, n, 3).clone()
    for k in range(max((len(sc.objects) for sc in scenes), default=0)):
        for shape in SHAPES:  # one vectorised mask per (object slot, shape)
            rows = [i for i, sc in enumerate(scenes) if len(sc.objects) > k and sc.objects[k].shape == shape]
            if not rows:
                continue
            geo = [tuple(v * scale for v in scenes[i].geometry[k]) for i in rows]
            g = torch.tensor(geo, dtype=torch.float64, device=dev).view(len(rows), 3, 1, 1)
            polys = None
            if shape == "star":
                polys = torch.from_numpy(np.stack([_star_polygon(*v) for v in geo])).to(dev)
            m = _shape_mask_torch(shape, g[:, 0], g[:, 1], g[:, 2], x, y, polys)
            col = palette[torch.tensor([COLOR_NAMES.index(scenes[i].objects[k].color) for i in rows], device=dev)]
            idx = torch.tensor(rows, dtype=torch.long, device=dev)
            img[idx] = torch.where(m[..., None], col.view(-1, 1, 1, 3), img[idx])
    img = img.view(N, size, s, size, s, 3).mean(dim=(2, 4))
    return img.round().clamp_(0, 255).to(torch.uint8)


def to_tensor_pm1(images_NHW3):
    """uint8 (N, H, W, 3) numpy array or tensor -> float32 torch (N, 3, H, W) in [-1, 1],
    on the tensor's device."""
    import torch

    if not isinstance(images_NHW3, torch.Tensor):
        images_NHW3 = torch.from_numpy(np.ascontiguousarray(images_NHW3))
    x = images_NHW3.float().div_(127.5).sub_(1)
    return x.permute(0, 3, 1, 2).contiguous()


class SceneDataset:
    """Scenes `0 .. n-1` of a seed: `ds[i] -> (image uint8 (H, W, 3), caption)`."""

    def __init__(self, n: int, seed: int = 0, size: int = 64, split: str = "train"):
        self.n, self.seed, self.size, self.split = int(n), int(seed), int(size), split

    def __len__(self) -> int:
        return self.n

    def scene(self, i: int) -> Scene:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return scene_at(self.seed, i, self.split)

    def __getitem__(self, i: int):
        sc = self.scene(i)
        return render(sc, self.size), sc.caption

    def batch(self, indices: Sequence[int]):
        """(images uint8 (N, H, W, 3), captions list)."""
        scenes = [self.scene(int(i)) for i in indices]
        return np.stack([render(sc, self.size) for sc in scenes]), [sc.caption for sc in scenes]


def heldout_prompts(n: Optional[int] = None, seed: int = 1234) -> List[Scene]:
    """Evaluation scenes: single objects of held-out triples, every attribute in the caption.

    Deterministic; distinct captions, in a fixed order.
    """
    out, seen, i = [], set(), 0
    while n is None or len(out) < n:
        sc = scene_at(seed, i, "heldout")
        i += 1
        if sc.caption not in seen:
            seen.add(sc.caption)
            out.append(sc)
        if n is None and i > 4000:
            break
    return out


def seen_prompts(n: int, seed: int = 4321) -> List[Scene]:
    """Evaluation scenes of training triples (single object, every attribute in the caption)."""
    out, seen, i = [], set(), 0
    rng_seed = [int(seed), 7]
    rng = np.random.default_rng(rng_seed)
    while len(out) < n:
        sc = sample_scene(rng, "train", two_object_prob=0.0, word_drop_prob=0.0)
        i += 1
        if sc.caption not in seen:
            seen.add(sc.caption)
            out.append(sc)
    return out


__all__ = ["COLORS", "COLOR_NAMES", "SHAPES", "SIZES", "POSITIONS", "POSITION_PHRASES", "CELL_TO_POSITION",
           "SceneObject", "Scene", "caption_words", "is_held_out", "sample_scene", "scene_at", "dense_scene",
           "dense_scene_at", "render", "render_batch", "shape_mask",
           "to_tensor_pm1", "SceneDataset", "heldout_prompts", "seen_prompts", "caption_for"]
