"""Saved DiT cache configurations: names that cannot leave the folder, family-safe overwrites."""
import pytest

from optim.cache_config_store import ConfigStore, name_problem
from optim.ditcache import DiTCacheConfig


@pytest.mark.parametrize("name", ["../evil", "a/b", "a\\b", "..", ".hidden", "", "  ", "x" * 81, "trail.",
                                  "semi;colon"])
def test_bad_names_are_refused(name, tmp_path):
    assert name_problem(name)
    with pytest.raises(ValueError):
        ConfigStore(tmp_path).save(name, DiTCacheConfig())
    assert not any(tmp_path.parent.glob("evil*"))


@pytest.mark.parametrize("name", ["flux-dev 28 steps", "wan_2.2_high", "A1"])
def test_good_names_round_trip(name, tmp_path):
    store = ConfigStore(tmp_path / "configs")
    cfg = DiTCacheConfig(cache_block_start=3, family="flux", steps=28)
    path, note = store.save(name, cfg)
    assert path.parent == (tmp_path / "configs").resolve() and note is None
    assert store.names() == [name] and store.load(name) == cfg


def test_overwriting_another_familys_config_needs_consent(tmp_path):
    store = ConfigStore(tmp_path)
    store.save("mine", DiTCacheConfig(family="flux"))
    with pytest.raises(ValueError, match="already holds a configuration for a flux model"):
        store.save("mine", DiTCacheConfig(family="wan"))
    assert store.load("mine").family == "flux"
    _, note = store.save("mine", DiTCacheConfig(family="wan"), overwrite=True)
    assert "was for flux" in note and store.load("mine").family == "wan"
    _, note = store.save("mine", DiTCacheConfig(family="wan", cache_step_start=5))   # same family: fine
    assert store.load("mine").cache_step_start == 5


def test_missing_name_lists_what_exists(tmp_path):
    store = ConfigStore(tmp_path)
    with pytest.raises(ValueError, match="none saved yet"):
        store.load("nope")
    store.save("one", DiTCacheConfig())
    with pytest.raises(ValueError, match=r"saved: one"):
        store.load("two")
