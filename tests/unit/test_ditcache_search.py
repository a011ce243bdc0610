"""The search's speed model and candidate ranking, on a hand-made profile (no sampling)."""
import pytest
import torch

from optim import ditcache, ditcache_search
from optim.ditcache_search import Profile


def profile(steps=10, blocks=4, calls_per_step=2, drift=None):
    """Blocks of 0.1 s in calls of 0.5 s; hidden states where block `drift` changes fast over steps."""
    states = {}
    for s in range(steps):
        h = torch.ones(4, 8) + 0.01 * s
        for b in range(blocks):
            speed = 1.0 if b == drift else 0.001
            out = h + speed * s * torch.arange(8.0)
            states[(s, b)] = (h, out)
            h = out
    return Profile(steps, [0.1] * blocks, 0.5, steps * calls_per_step, states)


def test_predicted_speedup_counts_the_skipped_blocks():
    prof = profile()
    cfg = ditcache.DiTCacheConfig(cache_block_start=0, cache_num_blocks=4, cache_step_start=2, cache_step_interval=2)
    # 4 reused steps x 2 calls x 0.4 s saved of 20 calls x 0.5 s
    assert ditcache_search.predicted_speedup(prof, cfg) == pytest.approx(10.0 / (10.0 - 3.2))


def test_candidates_land_in_the_target_window_and_avoid_the_drifting_block():
    prof = profile(drift=0)
    base = ditcache.DiTCacheConfig()
    ranked = ditcache_search.candidates(prof, base, [0, 0, 0, 0], target=1.2)
    assert ranked and all(1.2 <= c.predicted_speedup < 1.32 for c in ranked)
    assert ranked == sorted(ranked, key=lambda c: c.error_proxy)
    best = ranked[0].config
    assert best.cache_block_start >= 1   # block 0's delta changes every step: caching it is worst
    assert ranked[-1].config.cache_block_start == 0


def test_unreachable_target_returns_the_fastest_configurations():
    ranked = ditcache_search.candidates(profile(), ditcache.DiTCacheConfig(), [0, 0, 0, 0], target=50.0)
    assert ranked and all(c.error_proxy == float("inf") for c in ranked)
    speeds = [c.predicted_speedup for c in ranked]
    assert speeds == sorted(speeds, reverse=True)


def test_search_refuses_bad_targets():
    with pytest.raises(ValueError, match="target_speedup must be > 1"):
        ditcache_search.search(None, None, [0], target_speedup=1.0)
    with pytest.raises(ValueError, match="budget >= 1"):
        ditcache_search.search(None, None, [], target_speedup=1.5)
