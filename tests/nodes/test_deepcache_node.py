"""OptimDeepCache in a real in-process ComfyUI, through KSampler: the robustness matrix."""
import logging

import pytest
import torch

from bench import factory

SD_LAYOUT = factory.sd_unet_config(32, [1, 2, 2, 2], 2, [1, 1, 1, 0], 1, 768, False, heads=8)


@pytest.fixture(scope="module")
def dc(comfy_nodes):
    return comfy_nodes.NODE_CLASS_MAPPINGS["OptimDeepCache"]


@pytest.fixture(scope="module")
def unet(comfy_nodes):
    return factory.build_model("sd15", unet_config=SD_LAYOUT)


def apply(dc, model, **kw):
    return dc.execute(model=model, **kw).result[0]


def sample(model, **kw):
    args = dict(steps=10, cfg=5.0, width=64, height=64)
    args.update(kw)
    return factory.sample(model, "sd15", **args)


def controller(patched):
    from optim.deepcache import DeepCache
    view = patched.object_patches["diffusion_model.input_blocks"]
    ctl = view.__dict__["_deepcache"]
    assert type(ctl).__name__ == DeepCache.__name__
    return ctl


def test_interval_one_is_bit_identical_and_installs_nothing(dc, unet):
    patched = apply(dc, unet, cache_interval=1)
    assert not patched.object_patches and "diffusion_model" not in patched.wrappers
    assert torch.equal(sample(patched), sample(unet))


def test_caching_skips_deep_blocks_on_the_expected_steps(dc, unet):
    patched = apply(dc, unet, cache_interval=3, cache_branch_id=0)
    out = sample(patched)
    stats = dict(controller(patched).last_stats)
    assert stats.pop("timed_speedup") > 0   # measured: its value depends on the machine
    assert stats == {"full_calls": 4, "shallow_calls": 6, "steps": 10, "fallback_calls": 0,
                     "shallow_fraction": 0.6, "hits": "0110110110"}
    ref = sample(unet)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)


def test_state_is_per_run_and_leaves_the_base_model_untouched(dc, unet):
    ref = sample(unet)
    patched = apply(dc, unet, cache_interval=3, cache_branch_id=1)
    first, second = sample(patched), sample(patched)
    assert torch.equal(first, second)
    assert controller(patched).run is None            # dropped after the run
    assert torch.equal(sample(unet), ref)              # nothing leaked into the unpatched model
    other = apply(dc, unet, cache_interval=2, cache_branch_id=0)
    a, b, c = sample(patched), sample(other), sample(patched)
    assert torch.equal(a, c) and not torch.equal(a, b)  # two patched models alternate cleanly


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2s_ancestral", "dpmpp_2m_sde"])
def test_multi_call_samplers_count_steps_by_sigma(dc, unet, sampler):
    patched = apply(dc, unet, cache_interval=3)
    out = sample(patched, sampler=sampler, steps=6)
    stats = controller(patched).last_stats
    assert stats["steps"] <= 7 and stats["shallow_calls"] > 0
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("cfg,batch", [(1.0, 1), (5.0, 3)])
def test_cfg_off_and_batches(dc, unet, cfg, batch):
    patched = apply(dc, unet, cache_interval=2, cache_branch_id=2)
    out = sample(patched, cfg=cfg, batch=batch)
    assert out.shape[0] == batch and torch.isfinite(out).all()
    assert controller(patched).last_stats["shallow_calls"] > 0


def test_img2img_partial_denoise(dc, unet):
    patched = apply(dc, unet, cache_interval=3)
    start = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))}
    out = sample(patched, denoise=0.5, latent=start)
    assert torch.isfinite(out).all()
    assert controller(patched).last_stats["full_calls"] >= 1


def test_start_and_end_percent_limit_caching(dc, unet):
    patched = apply(dc, unet, cache_interval=2, start_percent=0.5, end_percent=1.0)
    sample(patched)
    stats = controller(patched).last_stats
    assert 0 < stats["shallow_calls"] < 5


def test_lora_style_weight_patch_applies_before_or_after(dc, unet, with_lora):
    key = "diffusion_model.input_blocks.1.0.in_layers.2.weight"
    with_patch = lambda m: with_lora(m, key)   # noqa: E731
    before = sample(apply(dc, with_patch(unet), cache_interval=3))
    after = sample(with_patch(apply(dc, unet, cache_interval=3)))
    cached_plain = sample(apply(dc, unet, cache_interval=3))
    assert torch.equal(before, after)
    assert not torch.equal(before, cached_plain)


def test_unsupported_model_passes_through_with_a_warning(dc, comfy_nodes, caplog):
    flux = factory.build_model("flux", "tiny")
    with caplog.at_level(logging.WARNING, logger="comfyui-optim"):
        out = apply(dc, flux, cache_interval=3)
    assert out is flux
    assert "Flux" in caplog.text and "not a UNet model" in caplog.text


def test_branch_beyond_the_unet_is_a_clear_error(dc, unet):
    with pytest.raises(ValueError, match="beyond this UNet's deepest branch"):
        apply(dc, unet, cache_interval=3, cache_branch_id=40)


def test_validation_rejects_an_empty_window(dc):
    msg = dc.validate_inputs(skip_mode="uniform", start_percent=0.6, end_percent=0.4)
    assert isinstance(msg, str) and "start_percent < end_percent" in msg
    assert "skip_mode must be one of" in dc.validate_inputs(skip_mode="x", start_percent=0.0, end_percent=1.0)
    assert dc.validate_inputs(skip_mode="non-uniform", start_percent=0.0, end_percent=1.0) is True


def test_applying_twice_is_refused(dc, unet):
    with pytest.raises(ValueError, match="already applied"):
        apply(dc, apply(dc, unet, cache_interval=3), cache_interval=2)


def test_svd_video_unet(dc, comfy_nodes):
    svd = factory.build_model("svd", "tiny")
    args = dict(steps=6, cfg=2.5, frames=4, width=64, height=64)
    ref = factory.sample(svd, "svd", **args)
    assert torch.equal(factory.sample(apply(dc, svd, cache_interval=1), "svd", **args), ref)
    patched = apply(dc, svd, cache_interval=3, cache_branch_id=1)
    out = factory.sample(patched, "svd", **args)
    assert out.shape == ref.shape and torch.isfinite(out).all() and not torch.equal(out, ref)
    assert controller(patched).last_stats["shallow_calls"] == 4
