"""A procedural dataset of simple scenes with captions: what the reference models are trained on.

A scene is a few identical shapes (count, size, colour, shape class) placed in one region of a
plain background. Captions follow one grammar, so a caption parses back into its scene and an
analytic checker (`bench.reference.adherence`) can read every attribute back from an image:

    "two small red circles on the left on a black background"

Everything is deterministic for a seed (numpy's PCG64), and needs only numpy.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, fields

import numpy as np

SIDE = 64  # image side in pixels
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered: anti-aliased edges

COUNTS = {"one": 1, "two": 2, "three": 3}
SIZES = ("small", "large")
COLOURS = {  # object colours (RGB in [0, 1])
    "red": (0.86, 0.16, 0.16),
    "green": (0.16, 0.78, 0.24),
    "blue": (0.20, 0.35, 0.90),
    "yellow": (0.94, 0.86, 0.16),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {  # phrase -> region (x0, y0, x1, y1) in pixels; objects are laid out along its long side
    "on the left": (0, 0, 32, 64),
    "on the right": (32, 0, 64, 64),
    "at the top": (0, 0, 64, 32),
    "at the bottom": (0, 32, 64, 64),
    "in the center": (8, 16, 56, 48),
}
BACKGROUNDS = {
    "black": (0.08, 0.08, 0.08),
    "gray": (0.50, 0.50, 0.50),
    "white": (0.92, 0.92, 0.92),
}
LARGE_FILL, SMALL_FILL = 0.84, 0.55  # object side as a fraction of its layout cell's short side
ATTRIBUTES = ("count", "size", "colour", "shape", "position", "background")


@dataclass(frozen=True)
class Scene:
    count: str
    size: str
    colour: str
    shape: str
    position: str
    background: str

    def caption(self) -> str:
        noun = self.shape + ("s" if COUNTS[self.count] > 1 else "")
        return (f"{self.count} {self.size} {self.colour} {noun} {self.position} "
                f"on a {self.background} background")

    def cells(self) -> list[tuple[float, float, float, float]]:
        """The layout cells (x0, y0, x1, y1), one per object, splitting the region along its long side."""
        x0, y0, x1, y1 = POSITIONS[self.position]
        n = COUNTS[self.count]
        if x1 - x0 >= y1 - y0:
            step = (x1 - x0) / n
            return [(x0 + i * step, y0, x0 + (i + 1) * step, y1) for i in range(n)]
        step = (y1 - y0) / n
        return [(x0, y0 + i * step, x1, y0 + (i + 1) * step) for i in range(n)]

    def object_side(self, size: str | None = None) -> float:
        """Nominal side (bounding box) in pixels of each object for `size` (default: the scene's)."""
        cx0, cy0, cx1, cy1 = self.cells()[0]
        short = min(cx1 - cx0, cy1 - cy0)
        return short * (LARGE_FILL if (size or self.size) == "large" else SMALL_FILL)


_CAPTION = re.compile(
    r"^(?P<count>\w+) (?P<size>\w+) (?P<colour>\w+) (?P<shape>\w+?)s? "
    r"(?P<position>on the left|on the right|at the top|at the bottom|in the center) "
    r"on a (?P<background>\w+) background$")


def parse_caption(text: str) -> Scene:
    m = _CAPTION.match(text.strip())
    if m is None:
        raise ValueError(f"not a caption of the reference grammar: {text!r}")
    scene = Scene(**m.groupdict())
    for name, allowed in (("count", COUNTS), ("size", SIZES), ("colour", COLOURS), ("shape", SHAPES),
                          ("background", BACKGROUNDS)):
        if getattr(scene, name) not in allowed:
            raise ValueError(f"unknown {name} {getattr(scene, name)!r} in {text!r}")
    return scene


def all_scenes() -> list[Scene]:
    return [Scene(*v) for v in itertools.product(COUNTS, SIZES, COLOURS, SHAPES, POSITIONS, BACKGROUNDS)]


def random_scene(rng: np.random.Generator) -> Scene:
    return Scene(*(str(rng.choice(list(values))) for values in
                   (COUNTS, SIZES, COLOURS, SHAPES, POSITIONS, BACKGROUNDS)))


def _shape_mask(shape: str, cx: np.ndarray, cy: np.ndarray, half: float) -> np.ndarray:
    """Inside test on supersampled pixel centres relative to the object's centre."""
    if shape == "circle":
        return cx * cx + cy * cy <= half * half
    if shape == "square":
        return (np.abs(cx) <= half) & (np.abs(cy) <= half)
    # isosceles triangle pointing up, base at the bottom of the box
    rel = (cy + half) / (2 * half)  # 0 at the apex row, 1 at the base
    return (rel >= 0) & (rel <= 1) & (np.abs(cx) <= half * rel)


def render(scene: Scene, rng: np.random.Generator | None = None,
           offset: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """An RGB float32 image (SIDE, SIDE, 3) in [0, 1]; `rng` jitters sizes and placements within
    their cells (None: exact nominal layout); `offset` (dx, dy) in pixels moves every object (the
    frames of a clip, bench/reference/clips.py)."""
    s = SIDE * SUPERSAMPLE
    coords = (np.arange(s, dtype=np.float32) + 0.5) / SUPERSAMPLE
    gx, gy = np.meshgrid(coords, coords)
    mask = np.zeros((s, s), dtype=bool)
    side = scene.object_side()
    jitter_size = 1.0 if rng is None else float(rng.uniform(0.9, 1.1))
    for (x0, y0, x1, y1) in scene.cells():
        obj = side * jitter_size
        # keep a gap of at least 2 px to the cell border, so neighbours never touch
        room_x = max(0.0, (x1 - x0 - obj) / 2 - 2.0)
        room_y = max(0.0, (y1 - y0 - obj) / 2 - 2.0)
        # at most 5 px off the cell centre: the region stays readable from the objects' centroid
        room_x, room_y = min(room_x * 0.6, 5.0), min(room_y * 0.6, 5.0)
        dx = 0.0 if rng is None else float(rng.uniform(-room_x, room_x))
        dy = 0.0 if rng is None else float(rng.uniform(-room_y, room_y))
        cx, cy = (x0 + x1) / 2 + dx + offset[0], (y0 + y1) / 2 + dy + offset[1]
        mask |= _shape_mask(scene.shape, gx - cx, gy - cy, obj / 2)
    img = np.empty((s, s, 3), dtype=np.float32)
    img[:] = BACKGROUNDS[scene.background]
    img[mask] = COLOURS[scene.colour]
    return img.reshape(SIDE, SUPERSAMPLE, SIDE, SUPERSAMPLE, 3).mean(axis=(1, 3))


def make_dataset(n: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """`n` random scenes: images (n, SIDE, SIDE, 3) float32 in [0, 1] and their captions."""
    rng = np.random.Generator(np.random.PCG64(seed))
    images = np.empty((n, SIDE, SIDE, 3), dtype=np.float32)
    captions = []
    for i in range(n):
        scene = random_scene(rng)
        images[i] = render(scene, rng)
        captions.append(scene.caption())
    return images, captions


def prompt_set(n: int = 72, seed: int = 1234) -> list[str]:
    """The fixed evaluation prompts: every value of every attribute appears about equally often
    (each attribute cycles through its values; the cycles are shuffled independently)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    while True:  # reshuffle until no prompt repeats
        columns = []
        for values in (COUNTS, SIZES, COLOURS, SHAPES, POSITIONS, BACKGROUNDS):
            values = list(values)
            col = [values[i % len(values)] for i in range(n)]
            rng.shuffle(col)
            columns.append(col)
        prompts = [Scene(*row).caption() for row in zip(*columns)]
        if len(set(prompts)) == n:
            return prompts


PROMPTS = prompt_set()


def scene_fields() -> tuple[str, ...]:
    return tuple(f.name for f in fields(Scene))
