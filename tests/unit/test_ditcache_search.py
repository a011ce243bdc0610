"""The search's speed model and candidate ranking, on a hand-made profile (no sampling)."""
import math

import pytest
import torch

from optim import ditcache, ditcache_search
from optim.ditcache_search import Profile


def profile(steps=10, blocks=4, calls_per_step=2, drift=None, shape=math.sin):
    """Blocks of 0.1 s in calls of 0.5 s; hidden states where block `drift`'s delta changes fast
    over steps, following `shape(step)`."""
    states = {}
    for s in range(steps):
        h = torch.ones(4, 8) + 0.01 * s
        for b in range(blocks):
            speed = 1.0 if b == drift else 0.001
            out = h + speed * shape(s) * torch.arange(8.0)
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


def test_linear_drift_is_what_delta_order_one_predicts():
    prof = profile(drift=0, shape=lambda s: 0.3 * s)
    ranked = ditcache_search.candidates(prof, ditcache.DiTCacheConfig(), [0, 0, 0, 0], target=1.2)
    covering_block_0 = [c for c in ranked if c.config.cache_block_start == 0]
    best = min(covering_block_0, key=lambda c: c.error_proxy)
    assert best.config.delta_order == 1 and best.error_proxy < 1e-4
    reuse = [c for c in covering_block_0 if c.config.delta_order == 0]
    assert min(c.error_proxy for c in reuse) > 1e-2


def test_diverse_takes_one_per_kind_of_schedule_first():
    mk = lambda interval, order, err: ditcache_search.Candidate(   # noqa: E731
        ditcache.DiTCacheConfig(cache_step_interval=interval, delta_order=order, cache_block_start=err), 1.5, err)
    ranked = [mk(2, 0, 1), mk(2, 0, 2), mk(3, 0, 3), mk(2, 1, 4), mk(3, 0, 5)]
    picked = ditcache_search.diverse(ranked, 3)
    assert [c.error_proxy for c in picked] == [1, 3, 4]
    assert [c.error_proxy for c in ditcache_search.diverse(ranked, 4)] == [1, 3, 4, 2]


def test_step_weights_follow_the_sigma_decrements():
    weights = ditcache_search.step_weights(torch.tensor([4.0, 3.0, 1.0, 0.0]), 3)
    assert weights == pytest.approx([0.75, 1.5, 0.75])
    assert ditcache_search.step_weights(None, 3) == [1.0, 1.0, 1.0]


def test_report_describes_fixed_and_adaptive_configurations():
    fixed = ditcache.DiTCacheConfig(cache_block_start=2, cache_num_blocks=5, num_blocks=12, delta_order=1)
    assert ditcache_search.describe(fixed) == \
        "blocks 2..6 of 12, cached from step 2, refresh every 2 steps, delta extrapolated"
    adaptive = ditcache.DiTCacheConfig(mode="adaptive", threshold=0.3, num_blocks=12)
    assert ditcache_search.describe(adaptive) == \
        "blocks 1..10 of 12, adaptive (threshold 0.3, at most 3 reuses in a row, from step 2)"


def test_anchor_leads_with_the_widest_range_refreshed_most_often():
    mk = lambda start, count, interval, err: ditcache_search.Candidate(   # noqa: E731
        ditcache.DiTCacheConfig(cache_block_start=start, cache_num_blocks=count, cache_step_interval=interval), 1.5, err)
    ranked = [mk(2, 3, 2, 0.1), mk(1, 10, 3, 0.2), mk(1, 10, 2, 0.5), mk(0, 4, 4, 0.6)]
    picked = ditcache_search.with_anchor(ranked, 12, 3)
    assert picked[0] is ranked[2] and picked[1] is ranked[0]
    assert ditcache_search.with_anchor(ranked, 12, 1) == [ranked[0]]
