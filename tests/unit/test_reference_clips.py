"""Procedural clips (bench/reference/clips.py): deterministic, the middle frame is the still scene,
and the checker reads the motion back (and catches a wrong one)."""
import numpy as np
import pytest

from bench.reference import clips
from bench.reference import dataset as ds


def test_clips_are_deterministic_for_a_seed():
    a, ca = clips.make_clips(4, seed=2, frames=5)
    b, cb = clips.make_clips(4, seed=2, frames=5)
    c, _ = clips.make_clips(4, seed=3, frames=5)
    assert a.shape == (4, 5, ds.SIDE, ds.SIDE, 3) and a.dtype == np.float32
    assert np.array_equal(a, b) and ca == cb and not np.array_equal(a, c)


def test_the_middle_frame_is_the_still_scene_with_the_same_jitter():
    rng = np.random.Generator(np.random.PCG64(7))
    clip = clips.random_clip(rng)
    state = rng.bit_generator.state
    frames = clips.render_clip(clip, 9, rng)
    still_rng = np.random.Generator(np.random.PCG64())
    still_rng.bit_generator.state = state
    assert np.array_equal(frames[4], ds.render(clip.scene, still_rng))
    assert rng.bit_generator.state == still_rng.bit_generator.state   # the next clip draws fresh jitter
    assert not np.array_equal(frames[0], frames[-1])


def test_caption_round_trip_and_bad_captions():
    clip = clips.Clip(ds.parse_caption("two small red circles on the left on a black background"), "up")
    assert clip.caption() == "two small red circles on the left on a black background, moving up"
    assert clips.parse_clip_caption(clip.caption()) == clip
    for bad in ("two small red circles on the left on a black background",
                "two small red circles on the left on a black background, moving sideways"):
        with pytest.raises(ValueError):
            clips.parse_clip_caption(bad)


def test_the_checker_reads_every_attribute_and_the_motion_of_clean_clips():
    frames, captions = clips.make_clips(40, seed=5)
    readings = [clips.read_clip(f, c) for f, c in zip(frames, captions)]
    assert all(r.correct["motion"] for r in readings)
    assert np.mean([r.score for r in readings]) > 0.95
    # the same clip played backwards moves the other way
    flipped = clips.read_clip(frames[0][::-1], captions[0])
    assert not flipped.correct["motion"] and flipped.values["motion"] is not None


def test_a_still_clip_has_no_motion():
    scene = ds.parse_caption("one large blue square in the center on a white background")
    still = np.stack([ds.render(scene)] * 9)
    reading = clips.read_clip(still, clips.Clip(scene, "left").caption())
    assert reading.values["motion"] is None and not reading.correct["motion"]
    assert reading.correct["shape"] and reading.correct["colour"]
