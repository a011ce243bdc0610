"""Procedural clips for a video model: a scene of `bench.reference.dataset` whose objects move in
one direction, captioned "<the scene's caption>, moving <direction>".

The objects translate by TRAVEL pixels over the clip, centred so that the middle frame is the still
scene: every attribute of the image grammar reads back from the middle frame with the image
checker, and `read_clip` adds the direction, read from the objects' centroid track. The jitter of
sizes and placements is drawn once per clip, so only the motion changes from frame to frame.
Deterministic for a seed; needs only numpy.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from bench.reference import adherence as ad
from bench.reference import dataset as ds

DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
FRAMES = 9
TRAVEL = 12.0   # pixels from the first frame to the last
ATTRIBUTES = ds.ATTRIBUTES + ("motion",)


@dataclass(frozen=True)
class Clip:
    scene: ds.Scene
    direction: str

    def caption(self) -> str:
        return f"{self.scene.caption()}, moving {self.direction}"

    def offsets(self, frames: int = FRAMES) -> list[tuple[float, float]]:
        """Each frame's displacement (dx, dy) from the still scene; the middle one is (0, 0)."""
        ux, uy = DIRECTIONS[self.direction]
        ts = np.linspace(-0.5, 0.5, frames) if frames > 1 else np.zeros(1)
        return [(float(ux * t * TRAVEL), float(uy * t * TRAVEL)) for t in ts]


_CLIP_CAPTION = re.compile(r"^(?P<scene>.+), moving (?P<direction>\w+)$")


def parse_clip_caption(text: str) -> Clip:
    m = _CLIP_CAPTION.match(text.strip())
    if m is None or m["direction"] not in DIRECTIONS:
        raise ValueError(f"not a clip caption of the reference grammar: {text!r}")
    return Clip(ds.parse_caption(m["scene"]), m["direction"])


def random_clip(rng: np.random.Generator) -> Clip:
    return Clip(ds.random_scene(rng), str(rng.choice(list(DIRECTIONS))))


def render_clip(clip: Clip, frames: int = FRAMES, rng: np.random.Generator | None = None) -> np.ndarray:
    """Frames (frames, SIDE, SIDE, 3) float32 in [0, 1]. Every frame draws the same jitter from
    `rng` (restarted from its state for each frame); `rng` ends where one still scene leaves it."""
    if frames < 1:
        raise ValueError(f"a clip needs at least one frame, got {frames}")
    state = rng.bit_generator.state if rng is not None else None
    out = np.empty((frames, ds.SIDE, ds.SIDE, 3), dtype=np.float32)
    for i, offset in enumerate(clip.offsets(frames)):
        frame_rng = None
        if state is not None:
            frame_rng = np.random.Generator(np.random.PCG64())
            frame_rng.bit_generator.state = state
        out[i] = ds.render(clip.scene, frame_rng, offset)
    if rng is not None:
        rng.bit_generator.state = frame_rng.bit_generator.state
    return out


def make_clips(n: int, seed: int = 0, frames: int = FRAMES) -> tuple[np.ndarray, list[str]]:
    """`n` random clips (n, frames, SIDE, SIDE, 3) float32 in [0, 1] and their captions."""
    rng = np.random.Generator(np.random.PCG64(seed))
    clips = np.empty((n, frames, ds.SIDE, ds.SIDE, 3), dtype=np.float32)
    captions = []
    for i in range(n):
        clip = random_clip(rng)
        clips[i] = render_clip(clip, frames, rng)
        captions.append(clip.caption())
    return clips, captions


def _centroid(frame: np.ndarray) -> tuple[float, float] | None:
    """Centroid (x, y) of the pixels that differ from the background (as the image checker sees it)."""
    border = np.concatenate([frame[0], frame[-1], frame[:, 0], frame[:, -1]])
    fg = np.linalg.norm(frame - np.median(border, axis=0), axis=-1) > ad.FOREGROUND_DIST
    if fg.sum() < ad.MIN_AREA:
        return None
    ys, xs = np.nonzero(fg)
    return float(xs.mean()), float(ys.mean())


def read_motion(frames: np.ndarray) -> str | None:
    """The direction the objects move in (None when they do not move a third of TRAVEL)."""
    frames = np.asarray(frames, dtype=np.float32)
    if frames.max() > 1.5:
        frames = frames / 255.0
    first, last = _centroid(frames[0]), _centroid(frames[-1])
    if first is None or last is None:
        return None
    dx, dy = last[0] - first[0], last[1] - first[1]
    if (dx * dx + dy * dy) ** 0.5 < TRAVEL / 3:
        return None
    return max(DIRECTIONS, key=lambda d: DIRECTIONS[d][0] * dx + DIRECTIONS[d][1] * dy)


def read_clip(frames: np.ndarray, prompt: str) -> ad.Reading:
    """The image attributes of the middle frame and the motion of the clip, against `prompt`."""
    clip = parse_clip_caption(prompt)
    still = ad.read(frames[len(frames) // 2], clip.scene.caption())
    motion = read_motion(frames)
    return ad.Reading({**still.values, "motion": motion},
                      {**still.correct, "motion": motion == clip.direction})
