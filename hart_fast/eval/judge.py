"""An independent judge of scene images: attributes recovered from the pixels alone.

It never looks at a model: from an RGB image of a procedural scene
(`hart_fast.train.scenes`) it recovers the background colour and, for every object,
its colour, shape, size and grid position.

How:
- background: the palette colour nearest to most pixels of the outer border ring;
- objects: pixels far from the background colour, split into 4-connected
  components; components smaller than a speck are noise; each component's colour is
  the palette colour most of its core pixels are nearest to -- the core being the
  pixels farthest from the background, so a soft rim that mixes the two colours
  (blue on red blurs to purple) does not outvote a small object's interior;
- shape: from the component's coverage (how far each pixel has moved from the
  background toward the object colour) -- fill of the bounding box (square ~1,
  circle ~0.79, triangle ~0.5, star ~0.39) and, to tell a triangle from a star,
  how the mass splits between the top and the bottom half (a triangle's apex
  half holds a quarter of it);
- size: the longer side of the bounding box against a threshold between the two sizes;
- position: the bounding box centre's cell of a 3 x 3 grid.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Dict, List, Optional, Sequence

import numpy as np

from hart_fast.train.scenes import CELL_TO_POSITION, COLOR_NAMES, COLORS, SIZES, Scene

PALETTE = np.array([COLORS[c] for c in COLOR_NAMES], dtype=np.float32)      # (K, 3)
FG_DISTANCE = 60.0       # RGB distance from the background beyond which a pixel is foreground
MIN_AREA_64 = 12         # pixels (at 64 px) below which a component is a speck
CORE_SHARE = 0.75        # core pixels: at least this share of the component's 90th-percentile distance
SIZE_SPLIT_64 = 19.5     # bounding-box extent (at 64 px) between small (~14) and large (~26)


@dataclasses.dataclass
class JudgedObject:
    color: str
    shape: str
    size: str
    position: str
    area: float
    fill: float
    top_share: float


@dataclasses.dataclass
class Judgement:
    background: str
    objects: List[JudgedObject]

    @property
    def main(self) -> Optional[JudgedObject]:
        """The largest object, or None when nothing stands out from the background."""
        return max(self.objects, key=lambda o: o.area) if self.objects else None


def _nearest_palette(px_N3: np.ndarray) -> np.ndarray:
    d = ((px_N3[:, None, :] - PALETTE[None]) ** 2).sum(-1)
    return d.argmin(1)


def _components(mask_HW: np.ndarray) -> List[np.ndarray]:
    """4-connected components of a boolean mask, as arrays of flat indices."""
    H, W = mask_HW.shape
    seen = np.zeros_like(mask_HW, dtype=bool)
    flat = mask_HW.ravel()
    out = []
    for start in np.flatnonzero(flat):
        if seen.flat[start]:
            continue
        comp, q = [], deque([start])
        seen.flat[start] = True
        while q:
            p = q.popleft()
            comp.append(p)
            r, c = divmod(p, W)
            for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= rr < H and 0 <= cc < W and mask_HW[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    q.append(rr * W + cc)
        out.append(np.array(comp))
    return out


def classify_shape(fill: float, top_share: float) -> str:
    if fill > 0.89:
        return "square"
    if fill > 0.66:
        return "circle"
    return "triangle" if top_share < 0.36 else "star"


def judge(image_HW3: np.ndarray) -> Judgement:
    """Attributes of one image (H, W, 3) uint8 (or float in [0, 255])."""
    img = np.asarray(image_HW3, dtype=np.float32)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"judge expects an (H, W, 3) RGB image, got shape {img.shape}")
    H, W, _ = img.shape
    scale = W / 64.0
    ring = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3),
                           img[:, :2].reshape(-1, 3), img[:, -2:].reshape(-1, 3)])
    bg_i = int(np.bincount(_nearest_palette(ring), minlength=len(PALETTE)).argmax())
    bg_rgb = PALETTE[bg_i]
    dist = np.sqrt(((img - bg_rgb) ** 2).sum(-1))
    fg = dist > FG_DISTANCE
    objects = []
    flat_img = img.reshape(-1, 3)
    flat_dist = dist.ravel()
    for comp in _components(fg):
        if len(comp) < MIN_AREA_64 * scale * scale:
            continue
        # The colour of the component's core: its pixels farthest from the background.
        # A soft edge mixes the object's colour with the background's (blue on red
        # blurs to purple), and on a small, blurred object those rim pixels can
        # outnumber the interior; the core is the object's own colour however sharp it is.
        d_comp = flat_dist[comp]
        core = comp[d_comp >= CORE_SHARE * np.percentile(d_comp, 90)]
        near = _nearest_palette(flat_img[core])
        counts = np.bincount(near, minlength=len(PALETTE))
        counts[bg_i] = 0
        col_i = int(counts.argmax())
        # Coverage of every pixel of the component's box: how far it moved from the
        # background toward the object colour (1 inside, fractional on the rim).
        rows, cols = np.divmod(comp, W)
        r0, r1, c0, c1 = rows.min(), rows.max(), cols.min(), cols.max()
        span = float(np.linalg.norm(PALETTE[col_i] - bg_rgb))
        box = dist[r0:r1 + 1, c0:c1 + 1]
        in_comp = np.zeros_like(box, dtype=bool)
        in_comp[rows - r0, cols - c0] = True
        cov = np.where(in_comp, np.clip(box / max(span, 1.0), 0, 1), 0.0)
        area = float(cov.sum())
        # Extent from the coverage: a rim column counts by its largest coverage.
        w = float(cov.max(0).sum())
        h = float(cov.max(1).sum())
        fill = area / max(w * h, 1.0)
        # Share of the mass above the box's middle (row i spans [i, i + 1)).
        mid = cov.shape[0] / 2.0
        above = np.clip(mid - np.arange(cov.shape[0]), 0, 1)
        top_share = float((cov.sum(1) * above).sum()) / max(area, 1e-6)
        cy = (r0 + r1 + 1) / 2.0 / scale
        cx = (c0 + c1 + 1) / 2.0 / scale
        cell = (min(int(cx // (64 / 3)), 2), min(int(cy // (64 / 3)), 2))
        extent = max(w, h) / scale
        objects.append(JudgedObject(
            color=COLOR_NAMES[col_i], shape=classify_shape(fill, top_share),
            size="large" if extent > SIZE_SPLIT_64 else "small",
            position=CELL_TO_POSITION[cell], area=area / (scale * scale), fill=fill, top_share=top_share,
        ))
    return Judgement(COLOR_NAMES[bg_i], objects)


ATTRIBUTES = ("background", "color", "shape", "size", "position")


def score_single(judgement: Judgement, scene: Scene) -> Dict[str, bool]:
    """Per-attribute correctness of a single-object scene, plus 'all'."""
    want = scene.objects[0]
    got = judgement.main
    out = {"background": judgement.background == scene.background}
    for a in ("color", "shape", "size", "position"):
        out[a] = got is not None and getattr(got, a) == getattr(want, a)
    out["all"] = all(out[a] for a in ATTRIBUTES)
    return out


def accuracy(judgements: Sequence[Judgement], scenes: Sequence[Scene]) -> Dict[str, float]:
    """Mean per-attribute correctness over single-object scenes (fractions in [0, 1])."""
    if len(judgements) != len(scenes):
        raise ValueError(f"{len(judgements)} judgements for {len(scenes)} scenes")
    if not scenes:
        raise ValueError("no scenes to score")
    rows = [score_single(j, s) for j, s in zip(judgements, scenes)]
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def shape_by_size(judgements: Sequence[Judgement], scenes: Sequence[Scene]) -> Dict[str, float]:
    """Shape accuracy (fractions) of single-object scenes split by the asked size,
    in the order of SIZES ({"small": ..., "large": ...}); a size no scene asks for
    is left out. (A small shape spans about two latent cells of the demo tokenizer.)"""
    if len(judgements) != len(scenes):
        raise ValueError(f"{len(judgements)} judgements for {len(scenes)} scenes")
    if not scenes:
        raise ValueError("no scenes to score")
    hits: Dict[str, List[bool]] = {}
    for j, s in zip(judgements, scenes):
        hits.setdefault(s.objects[0].size, []).append(score_single(j, s)["shape"])
    return {size: float(np.mean(hits[size])) for size in SIZES if size in hits}


__all__ = ["Judgement", "JudgedObject", "judge", "score_single", "accuracy", "shape_by_size", "classify_shape",
           "ATTRIBUTES"]
