"""The procedural dataset and the analytic adherence checker (numpy only, no ComfyUI)."""
import numpy as np
import pytest

from bench.reference import adherence as ad
from bench.reference import dataset as ds


def test_captions_round_trip_and_prompt_set_is_fixed():
    for scene in ds.all_scenes()[::37]:
        assert ds.parse_caption(scene.caption()) == scene
    assert len(ds.PROMPTS) >= 64 and len(set(ds.PROMPTS)) == len(ds.PROMPTS)
    assert ds.prompt_set() == ds.PROMPTS  # deterministic
    for attr in ds.ATTRIBUTES:  # every value of every attribute is asked for
        seen = {getattr(ds.parse_caption(p), attr) for p in ds.PROMPTS}
        values = {"count": ds.COUNTS, "size": ds.SIZES, "colour": ds.COLOURS, "shape": ds.SHAPES,
                  "position": ds.POSITIONS, "background": ds.BACKGROUNDS}[attr]
        assert seen == set(values)
    with pytest.raises(ValueError):
        ds.parse_caption("a photo of a cat")


def test_dataset_is_deterministic_for_a_seed():
    a, ca = ds.make_dataset(6, seed=3)
    b, cb = ds.make_dataset(6, seed=3)
    c, _ = ds.make_dataset(6, seed=4)
    assert ca == cb and np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.shape == (6, ds.SIDE, ds.SIDE, 3) and a.min() >= 0 and a.max() <= 1


def test_checker_reads_ground_truth_renders():
    images, captions = ds.make_dataset(300, seed=11)
    result = ad.adherence(images, captions)
    assert result["adherence"] > 0.99, result["per_attribute"]
    # uint8 images (what SaveImage writes) read the same
    assert ad.adherence((images * 255).round().astype(np.uint8), captions)["adherence"] > 0.99


def test_checker_scores_wrong_renders_low():
    prompts = ds.PROMPTS
    images = [ds.render(ds.parse_caption(p)) for p in prompts]
    assert ad.adherence(images, prompts)["adherence"] == 1.0
    wrong = ad.adherence(images, prompts[1:] + prompts[:1])
    assert wrong["adherence"] < 0.45
    # one attribute changed: exactly that attribute is read as wrong
    scene = ds.parse_caption(prompts[0])
    for attr, other in (("colour", "green" if scene.colour != "green" else "red"),
                        ("background", "gray" if scene.background != "gray" else "black"),
                        ("shape", "square" if scene.shape != "square" else "circle"),
                        ("count", "two" if scene.count != "two" else "one"),
                        ("position", "on the left" if scene.position != "on the left" else "on the right"),
                        ("size", "large" if scene.size == "small" else "small")):
        changed = ds.Scene(**{**scene.__dict__, attr: other})
        reading = ad.read(ds.render(changed), prompts[0])
        assert not reading.correct[attr], (attr, reading.values)
        assert sum(reading.correct.values()) >= 4, (attr, reading.values)


def test_noise_and_blank_images_score_low():
    rng = np.random.default_rng(0)
    noise = rng.random((8, ds.SIDE, ds.SIDE, 3)).astype(np.float32)
    assert ad.adherence(noise, ds.PROMPTS[:8])["adherence"] < 0.4
    blank = np.full((8, ds.SIDE, ds.SIDE, 3), 0.5, dtype=np.float32)
    assert ad.adherence(blank, ds.PROMPTS[:8])["adherence"] < 0.3
