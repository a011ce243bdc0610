"""DiT block cache semantics on a hand-made two-list model, no ComfyUI: which calls refresh, what a
reused call returns, per-conditioning deltas, the adaptive decision and the configuration checks."""
import json

import pytest
import torch

from optim import dit_layout, ditcache

# A toy "Flux": two double blocks (img, txt) then two single blocks on cat(txt, img).
FAM = dit_layout.Family("toy", ("toy.Toy",), (dit_layout.Segment("double", "double_block"),
                                              dit_layout.Segment("single", "single_block")))
REFS = [dit_layout.BlockRef(0, 0, 0, "double.0"), dit_layout.BlockRef(1, 0, 1, "double.1"),
        dit_layout.BlockRef(2, 1, 0, "single.0"), dit_layout.BlockRef(3, 1, 1, "single.1")]
WEIGHTS = [torch.randn(8, 8, generator=torch.Generator().manual_seed(i)) * 0.3 for i in range(6)]


def double(i, img, txt):
    return {"img": torch.tanh(img @ WEIGHTS[i]) + img, "txt": torch.tanh(txt @ WEIGHTS[4 + i]) + txt}


def single(i, img):
    return {"img": torch.tanh(img @ WEIGHTS[2 + i]) + img}


def single_in_place(i, img):
    """A single block that adds to its input in place, as ComfyUI's Flux and LTXV blocks do."""
    img += torch.tanh(img @ WEIGHTS[2 + i])
    return {"img": img}


def forward(x, ctl=None, log=None, single=single):
    """The toy model; with `ctl`, blocks in its range go through `ctl.block` like a block replace."""
    img, txt = x, x.flip(1) * 0.5
    for ref in REFS:
        if ref.segment == 0:
            run = lambda i=ref.local, a=img, b=txt: double(i, a, b)
            streams = {"img": img, "txt": txt}
        else:
            run = lambda i=ref.local, a=img: single(i, a)
            streams = {"img": img}
        if ctl is not None and ctl.start <= ref.index < ctl.end:
            out = ctl.block(ref, streams, lambda r=run: (log.append(ref.index) if log is not None else None) or r())
        else:
            out = run()
        img, txt = out["img"], out.get("txt", txt)
        if ref.index == 1:
            img = torch.cat((txt, img), 1)
    return img


def boundary(x, upto):
    """Hidden state entering block `upto` of the uncached toy (single-list layout for upto >= 2)."""
    img, txt = x, x.flip(1) * 0.5
    for i in range(upto):
        o = double(i, img, txt) if i < 2 else single(i - 2, img)
        img, txt = o["img"], o.get("txt", txt)
        if i == 1:
            img = torch.cat((txt, img), 1)
    return img, txt


SCHEDULE = torch.linspace(1.0, 0.0, 11)


def sample(ctl, xs, uuids=("c",), calls_per_step=1, single=single):
    """Run `ctl` through its wrappers over a 10-step schedule; xs[step] is the model input."""
    outs = []

    def model_call(step, x):
        to = {"sample_sigmas": SCHEDULE, "sigmas": SCHEDULE[step:step + 1], "uuids": list(uuids)}
        return ctl.apply_model(lambda *a, **k: forward(x, ctl, single=single), x, None, None, None, None, to)

    def body():
        for step in range(10):
            for _ in range(calls_per_step):
                outs.append(model_call(step, xs[step]))
        return outs

    ctl.outer_sample(lambda *a, **k: body())
    return outs


def controller(**kw):
    return ditcache.DiTCache(FAM, REFS, ditcache.DiTCacheConfig(**kw))


def inputs(batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, 3, 8, generator=g)
    return [base + 0.05 * s * torch.randn(batch, 3, 8, generator=g) for s in range(10)]


def test_fixed_schedule_refreshes_before_start_and_every_interval():
    ctl = controller(cache_block_start=1, cache_num_blocks=2, cache_step_start=3, cache_step_interval=3)
    outs = sample(ctl, inputs())
    stats = ctl.last_stats
    # steps 0-3 refresh, 4 5 reuse, 6 refreshes, 7 8 reuse, 9 refreshes
    assert stats["calls"] == 10 and stats["calls_cached"] == 4 and stats["steps_cached"] == 4
    assert stats["blocks_skipped"] == 8 and stats["estimated_speedup"] == pytest.approx(40 / 32)
    assert stats["hits"] == "0000110110"
    xs = inputs()
    for step in (0, 1, 2, 3, 6, 9):
        assert torch.equal(outs[step], forward(xs[step]))
    assert not torch.equal(outs[4], forward(xs[4]))


def test_reused_call_returns_range_input_plus_refresh_delta_across_block_lists():
    """Blocks 1..2 span both lists: cached as one delta per list, which equals one delta over the
    whole range because the glue (concatenation) is linear."""
    ctl = controller(cache_block_start=1, cache_num_blocks=2, cache_step_start=1, cache_step_interval=2)
    xs = inputs()
    outs = sample(ctl, xs)

    def range_in(x):  # block 1's input, in the layout after the glue
        img, txt = boundary(x, 1)
        return torch.cat((txt, img), 1)

    refresh, reuse = 1, 2
    delta = boundary(xs[refresh], 3)[0] - range_in(xs[refresh])
    img = range_in(xs[reuse]) + delta
    expected = single(1, img)["img"]
    torch.testing.assert_close(outs[reuse], expected)


def test_blocks_that_add_in_place_still_leave_a_delta():
    """The range input kept on a refresh must be a copy: a block that adds to its input in place
    would otherwise turn the stored delta into zero and a reused call into a plain skip."""
    kw = dict(cache_block_start=2, cache_num_blocks=2, cache_step_start=1, cache_step_interval=2)
    xs = inputs()
    outs = sample(controller(**kw), [x.clone() for x in xs], single=single_in_place)
    assert torch.equal(outs[2], sample(controller(**kw), xs)[2])
    refresh, reuse = 1, 2
    delta = boundary(xs[refresh], 4)[0] - boundary(xs[refresh], 2)[0]
    assert delta.abs().max() > 0.1
    torch.testing.assert_close(outs[reuse], boundary(xs[reuse], 2)[0] + delta)


def test_interval_one_never_reuses_and_is_exact():
    ctl = controller(cache_block_start=0, cache_num_blocks=4, cache_step_start=0, cache_step_interval=1)
    xs = inputs()
    outs = sample(ctl, xs)
    assert ctl.last_stats["calls_cached"] == 0
    assert all(torch.equal(o, forward(x)) for o, x in zip(outs, xs))


def test_each_conditioning_keeps_its_own_delta():
    """cond and uncond in one batch reuse their own deltas: the same as running them apart."""
    xs_c, xs_u = inputs(seed=1), inputs(seed=2)
    joint = sample(controller(cache_block_start=0, cache_num_blocks=3, cache_step_start=1, cache_step_interval=3),
                   [torch.cat((c, u)) for c, u in zip(xs_c, xs_u)], uuids=("c", "u"))
    apart_c = sample(controller(cache_block_start=0, cache_num_blocks=3, cache_step_start=1, cache_step_interval=3),
                     xs_c, uuids=("c",))
    apart_u = sample(controller(cache_block_start=0, cache_num_blocks=3, cache_step_start=1, cache_step_interval=3),
                     xs_u, uuids=("u",))
    for j, c, u in zip(joint, apart_c, apart_u):
        torch.testing.assert_close(j, torch.cat((c, u)))


def test_new_conditioning_in_a_batch_forces_a_refresh():
    ctl = controller(cache_block_start=0, cache_num_blocks=2, cache_step_start=0, cache_step_interval=5)
    xs = inputs()
    run = ditcache._Run()
    ctl.run = run
    ctl.call = ditcache._Call(step=0, uuids=("a",), refresh=True)
    forward(xs[0], ctl)
    ctl.call = ditcache._Call(step=1, uuids=("b",), refresh=False)
    out = forward(xs[1], ctl)
    assert ctl.call.refresh is True and torch.equal(out, forward(xs[1]))


def test_adaptive_reuses_while_the_input_barely_changes():
    still = [torch.ones(1, 3, 8) * (1 + 1e-4 * s) for s in range(10)]
    ctl = controller(mode="adaptive", cache_block_start=0, cache_num_blocks=4, cache_step_start=2,
                     threshold=0.01, max_consecutive=3)
    sample(ctl, still)
    # steps 0, 1 warm up; then 3 reuses, a refresh (max_consecutive), 3 reuses, a refresh
    assert ctl.last_stats["calls_cached"] == 6
    moving = [torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(s)) for s in range(10)]
    ctl = controller(mode="adaptive", cache_block_start=0, cache_num_blocks=4, cache_step_start=2,
                     threshold=0.01, max_consecutive=3)
    sample(ctl, moving)
    assert ctl.last_stats["calls_cached"] == 0


def test_adaptive_steps_aside_for_few_step_schedules(caplog):
    global SCHEDULE
    saved, SCHEDULE = SCHEDULE, torch.linspace(1.0, 0.0, 5)   # 4 steps
    try:
        still = [torch.ones(1, 3, 8)] * 10
        ctl = controller(mode="adaptive", cache_block_start=0, cache_num_blocks=4, cache_step_start=0)
        outs = []
        def body():
            for step in range(4):
                to = {"sample_sigmas": SCHEDULE, "sigmas": SCHEDULE[step:step + 1], "uuids": ["c"]}
                outs.append(ctl.apply_model(lambda *a, **k: forward(still[step], ctl), None, None, None,
                                            None, None, to))
        ctl.outer_sample(lambda *a, **k: body())
        assert ctl.last_stats["stepped_aside"] and ctl.last_stats["calls_cached"] == 0
        assert "few-step" in caplog.text
        forced = controller(mode="adaptive", cache_block_start=0, cache_num_blocks=4, cache_step_start=0,
                            force=True)
        outs.clear()
        forced.outer_sample(lambda *a, **k: [forced.apply_model(
            lambda *a, **k: forward(still[s], forced), None, None, None, None, None,
            {"sample_sigmas": SCHEDULE, "sigmas": SCHEDULE[s:s + 1], "uuids": ["c"]}) for s in range(4)])
        assert forced.last_stats["calls_cached"] > 0
    finally:
        SCHEDULE = saved


def test_control_residuals_run_every_block():
    ctl = controller(cache_block_start=0, cache_num_blocks=4, cache_step_start=0, cache_step_interval=5)
    xs = inputs()

    def body():
        outs = []
        for step in range(10):
            to = {"sample_sigmas": SCHEDULE, "sigmas": SCHEDULE[step:step + 1], "uuids": ["c"]}
            outs.append(ctl.apply_model(lambda *a, **k: forward(xs[step], ctl), None, None, None, None,
                                        {"output": []}, to))
        return outs

    outs = ctl.outer_sample(lambda *a, **k: body())
    assert ctl.last_stats["calls_cached"] == 0
    assert all(torch.equal(o, forward(x)) for o, x in zip(outs, xs))


def test_step_start_beyond_the_schedule_warns_and_runs_uncached(caplog):
    ctl = controller(cache_step_start=10)
    xs = inputs()
    outs = sample(ctl, xs)
    assert "beyond this schedule of 10 steps" in caplog.text
    assert ctl.last_stats["calls_cached"] == 0 and all(torch.equal(o, forward(x)) for o, x in zip(outs, xs))
    assert ctl.run is None   # the per-run state is dropped after the run


@pytest.mark.parametrize("kw,message", [
    (dict(cache_num_blocks=0), "range is empty"),
    (dict(cache_step_interval=0), "cache_step_interval must be >= 1"),
    (dict(cache_block_start=-1), "cache_block_start must be >= 0"),
    (dict(mode="turbo"), "mode must be one of"),
    (dict(threshold=0.0), "threshold must be > 0"),
    (dict(cache_step_start=20, steps=20), "beyond the schedule of 20 steps"),
])
def test_config_problems(kw, message):
    assert any(message in p for p in ditcache.DiTCacheConfig(**kw).problems())


def test_config_problems_against_a_model():
    cfg = ditcache.DiTCacheConfig(cache_block_start=3, cache_num_blocks=4)
    assert "outside the model's 4 blocks" in " ".join(cfg.problems("flux", 4))
    assert ditcache.DiTCacheConfig(cache_block_start=3, cache_num_blocks=-1).problems("flux", 4) == \
        ["the cached range is empty: cache_block_start 3 with cache_num_blocks -1 in a model of 4 blocks"]
    made_for_wan = ditcache.DiTCacheConfig(family="wan")
    assert made_for_wan.problems("flux", 30) == ["this configuration was made for a wan model, not flux"]
    assert ditcache.DiTCacheConfig().problems("flux", 57) == []
    assert ditcache.DiTCacheConfig().block_range(57) == (1, 56)


def test_config_json_round_trip_and_errors():
    cfg = ditcache.DiTCacheConfig(cache_block_start=2, cache_num_blocks=5, family="flux", steps=28,
                                  sampler="euler", threshold=0.3)
    assert ditcache.DiTCacheConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="not valid JSON"):
        ditcache.DiTCacheConfig.from_json("{oops")
    with pytest.raises(ValueError, match="unknown cache configuration fields: speed"):
        ditcache.DiTCacheConfig.from_json(json.dumps({"speed": 2}))
    with pytest.raises(ValueError, match="cache_block_start must be an integer"):
        ditcache.DiTCacheConfig.from_json(json.dumps({"cache_block_start": "2"}))
    with pytest.raises(ValueError, match="must be a JSON object"):
        ditcache.DiTCacheConfig.from_json("[1, 2]")


def test_mismatches_name_each_setting():
    cfg = ditcache.DiTCacheConfig(steps=28, sampler="euler", num_blocks=57)
    assert cfg.mismatches(steps=20, sampler="euler", total_blocks=57) == ["steps: made for 28, used with 20"]
    assert ditcache.DiTCacheConfig().mismatches(steps=20) == []


def test_delta_order_one_extrapolates_from_the_last_two_refreshes():
    ctl = controller(cache_block_start=2, cache_num_blocks=2, cache_step_start=1, cache_step_interval=2,
                     delta_order=1)
    xs = inputs()
    outs = sample(ctl, xs)
    delta = {s: boundary(xs[s], 4)[0] - boundary(xs[s], 2)[0] for s in (0, 1, 3)}
    # step 2 reuses: refreshes at 0 and 1, one step on
    torch.testing.assert_close(outs[2], boundary(xs[2], 2)[0] + delta[1] + (delta[1] - delta[0]))
    # step 4: refreshes at 1 and 3, one step on from 3 at half the two-step slope
    torch.testing.assert_close(outs[4], boundary(xs[4], 2)[0] + delta[3] + (delta[3] - delta[1]) / 2)
    plain = sample(controller(cache_block_start=2, cache_num_blocks=2, cache_step_start=1,
                              cache_step_interval=2), xs)
    torch.testing.assert_close(plain[2], boundary(xs[2], 2)[0] + delta[1])


def test_extrapolation_runs_in_sigma_on_uneven_schedules():
    global SCHEDULE
    saved, SCHEDULE = SCHEDULE, torch.tensor([1.0, 0.9, 0.6, 0.5, 0.45, 0.3, 0.2, 0.15, 0.1, 0.05, 0.0])
    try:
        ctl = controller(cache_block_start=2, cache_num_blocks=2, cache_step_start=1, cache_step_interval=2,
                         delta_order=1)
        xs = inputs()
        outs = sample(ctl, xs)
        d0, d1 = (boundary(xs[s], 4)[0] - boundary(xs[s], 2)[0] for s in (0, 1))
        f = (0.6 - 0.9) / (0.9 - 1.0)   # step 2 extrapolated from the refreshes at steps 0 and 1
        torch.testing.assert_close(outs[2], boundary(xs[2], 2)[0] + d1 + (d1 - d0) * f)
    finally:
        SCHEDULE = saved
