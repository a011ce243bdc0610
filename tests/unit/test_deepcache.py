"""DeepCache's schedule and parameter checks (no ComfyUI)."""
import math

import pytest
import torch

from optim import deepcache, steps
from optim.deepcache import DeepCacheParams, full_steps


def test_uniform_schedule_refreshes_every_interval():
    assert full_steps(10, DeepCacheParams(cache_interval=3)) == {0, 3, 6, 9}
    assert full_steps(10, DeepCacheParams(cache_interval=1)) == set(range(10))
    assert full_steps(4, DeepCacheParams(cache_interval=5)) == {0}


@pytest.mark.parametrize("n,interval", [(50, 3), (50, 5), (25, 2), (20, 3)])
def test_non_uniform_schedule_has_as_many_full_steps_as_uniform_and_clusters_at_center(n, interval):
    params = DeepCacheParams(cache_interval=interval, skip_mode="non-uniform", center=min(15, n // 2))
    picked = sorted(full_steps(n, params))
    assert len(picked) == math.ceil(n / interval)
    assert picked[0] == 0 and all(0 <= s < n for s in picked) and len(set(picked)) == len(picked)
    gaps = [b - a for a, b in zip(picked, picked[1:])]
    near = [g for a, g in zip(picked, gaps) if abs(a - params.center) <= interval]
    assert min(near) <= min(gaps[-2:])   # denser around the center than at the end


def test_non_uniform_schedule_that_cannot_be_met_says_why_and_the_run_goes_on_uniform(caplog):
    with pytest.raises(ValueError, match="lower the center or the interval"):
        deepcache.quad_center_steps(10, 9, center=8, power=1.1)
    params = DeepCacheParams(cache_interval=2, skip_mode="non-uniform", center=5, power=1.01)
    assert full_steps(10, params) == {0, 2, 4, 6, 8}
    assert "using the uniform schedule" in caplog.text


def test_very_short_schedules_run_every_step_in_full():
    assert full_steps(2, DeepCacheParams(cache_interval=3)) == {0, 1}
    assert full_steps(0, DeepCacheParams(cache_interval=3, skip_mode="non-uniform")) == set()


def test_problems_name_each_bad_parameter():
    assert DeepCacheParams().problems() == []
    msgs = DeepCacheParams(cache_interval=0, cache_branch_id=-1, skip_mode="x", start_percent=0.5,
                           end_percent=0.5, power=1.0).problems()
    assert len(msgs) == 5
    assert any("cache_interval must be >= 1" in m for m in msgs)
    assert DeepCacheParams(cache_branch_id=12).problems(max_branch=11) == [
        "cache_branch_id 12 is beyond this UNet's deepest branch (11)"]


def test_step_index_comes_from_sigmas_not_calls():
    schedule = torch.tensor([14.6, 7.0, 3.0, 1.0, 0.0])
    to = {"sample_sigmas": schedule, "sigmas": torch.tensor([3.0, 3.0])}
    assert steps.step_index(to) == 2
    to["sigmas"] = torch.tensor([2.2])  # a second-order sampler's midpoint is nearest its step's sigma
    assert steps.step_index(to) == 2
    assert steps.step_index({}) is None
    assert steps.num_steps(to) == 4
