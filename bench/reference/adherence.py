"""Prompt adherence of generated images, read back analytically (no learned judge).

For an image and its prompt (a caption of `bench.reference.dataset`'s grammar) the checker reads
the background colour from the border, separates the objects by their distance to that colour,
and reads count (connected components), colour (nearest palette colour of the object pixels),
shape class (triangles are heavier at the bottom of their box, squares fill their box's corners,
circles do not), size (the objects' extent against the nominal small and large sides for this
layout) and position (the region whose centre is nearest the objects' centroid). Adherence is
the fraction of the six attributes read back equal to the prompt's.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bench.reference import dataset as ds

MIN_AREA = 6          # pixels: smaller components are noise
MAX_AREA = ds.SIDE * ds.SIDE // 4  # the largest object covers 18% of the image
FOREGROUND_DIST = 0.22  # RGB distance from the background that makes a pixel an object pixel


@dataclass
class Reading:
    values: dict[str, str | None]   # attribute -> value read from the image (None: unreadable)
    correct: dict[str, bool]        # attribute -> read value equals the prompt's

    @property
    def score(self) -> float:
        return sum(self.correct.values()) / len(self.correct)


def _label(mask: np.ndarray) -> list[np.ndarray]:
    """Connected components (4-connectivity) of a boolean mask, each as a boolean mask (numpy
    only: the unit-test layer has no scipy)."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    comps = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        comp = np.zeros_like(mask)
        stack = [(y0, x0)]
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            comp[y, x] = True
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        comps.append(comp)
    return comps


def _erode(mask: np.ndarray) -> np.ndarray:
    """Binary erosion by a 3x3 cross (pixels outside the image count as background)."""
    padded = np.pad(mask, 1)
    return (padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1]
            & padded[1:-1, :-2] & padded[1:-1, 2:])


def _nearest(rgb: np.ndarray, palette: dict[str, tuple]) -> str:
    names = list(palette)
    dists = [float(np.linalg.norm(rgb - np.asarray(palette[n]))) for n in names]
    return names[int(np.argmin(dists))]


def _shape_class(comp: np.ndarray) -> str:
    ys, xs = np.nonzero(comp)
    box = comp[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float32)
    h, w = box.shape
    top, bottom = box[: h // 2].sum(), box[(h + 1) // 2:].sum()
    if bottom > 0 and top / bottom < 0.62:
        return "triangle"
    k = max(1, round(min(h, w) * 0.2))  # corner patches of 20% of the side
    corners = np.concatenate([box[:k, :k].ravel(), box[:k, -k:].ravel(),
                              box[-k:, :k].ravel(), box[-k:, -k:].ravel()])
    return "square" if corners.mean() > 0.5 else "circle"


def read(image: np.ndarray, prompt: str) -> Reading:
    """Read the attributes of `image` (H, W, 3), uint8 or float in [0, 1], against `prompt`."""
    img = np.asarray(image, dtype=np.float32)
    if img.max() > 1.5:
        img = img / 255.0
    if img.shape[:2] != (ds.SIDE, ds.SIDE):
        raise ValueError(f"expected a {ds.SIDE}x{ds.SIDE} image, got {img.shape}")
    scene = ds.parse_caption(prompt)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg_rgb = np.median(border, axis=0)
    values: dict[str, str | None] = {"background": _nearest(bg_rgb, ds.BACKGROUNDS)}
    fg = np.linalg.norm(img - bg_rgb, axis=-1) > FOREGROUND_DIST
    comps = _label(fg)
    # an object is neither a speck nor most of the picture (noise, a wrong background)
    comps = [c for c in comps if MIN_AREA <= c.sum() <= MAX_AREA]
    count = len(comps)
    values["count"] = {v: k for k, v in ds.COUNTS.items()}.get(count, str(count))
    if count == 0:
        values.update(size=None, colour=None, shape=None, position=None)
    else:
        union = np.logical_or.reduce(comps)
        # colour from the object pixels least mixed with the background (the inner ones)
        inner = _erode(union)
        pix = img[inner] if inner.sum() >= 4 else img[union]
        values["colour"] = _nearest(np.median(pix, axis=0), ds.COLOURS)
        shapes = [_shape_class(c) for c in comps]
        values["shape"] = max(set(shapes), key=shapes.count)
        extents = []
        for c in comps:
            ys, xs = np.nonzero(c)
            extents.append(max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1))
        extent = float(np.median(extents))
        # size relative to the nominal sides of the layout the prompt asks for (geometric midpoint)
        small, large = scene.object_side("small"), scene.object_side("large")
        values["size"] = "large" if extent > (small * large) ** 0.5 else "small"
        ys, xs = np.nonzero(union)
        cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
        centres = {p: ((x0 + x1) / 2, (y0 + y1) / 2) for p, (x0, y0, x1, y1) in ds.POSITIONS.items()}
        values["position"] = min(centres, key=lambda p: (centres[p][0] - cx) ** 2 + (centres[p][1] - cy) ** 2)
    correct = {a: values[a] == getattr(scene, a) for a in ds.ATTRIBUTES}
    return Reading(values, correct)


def adherence(images, prompts) -> dict:
    """Mean adherence over (image, prompt) pairs, with the per-attribute accuracy."""
    readings = [read(img, p) for img, p in zip(images, prompts, strict=True)]
    per_attr = {a: float(np.mean([r.correct[a] for r in readings])) for a in ds.ATTRIBUTES}
    return {"adherence": float(np.mean([r.score for r in readings])), "per_attribute": per_attr,
            "n": len(readings), "scores": [r.score for r in readings]}
