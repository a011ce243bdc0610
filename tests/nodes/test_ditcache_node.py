"""OptimDiTCache, its search, load and inline-config nodes in a real in-process ComfyUI."""
import logging

import pytest
import torch

from bench import factory
from optim import dit_layout, ditcache

DIT_FAMILIES = [name for name in factory.FAMILIES if name not in ("sd15", "sdxl", "svd")]


@pytest.fixture(scope="module")
def node(comfy_nodes):
    return comfy_nodes.NODE_CLASS_MAPPINGS["OptimDiTCache"]


@pytest.fixture(scope="module")
def flux(comfy_nodes):
    return factory.build_model("flux", "tiny")


def ctl_of(patched) -> ditcache.DiTCache:
    for keyed in patched.wrappers.values():
        for fn in keyed.get(ditcache.KEY, []):
            return fn.__self__
    raise AssertionError("no DiT cache installed")


def apply(node, model, **kw):
    args = dict(cache_block_start=0, cache_num_blocks=-1, cache_step_start=1, cache_step_interval=2)
    args.update(kw)
    return node.execute(model=model, **args).result[0]


def run(model, family="flux", **kw):
    args = dict(steps=8, cfg=1.0 if factory.family(family).guidance else 4.0, width=64, height=64, frames=5)
    args.update(kw)
    return factory.sample(model, family, **args)


@pytest.mark.parametrize("family", DIT_FAMILIES)
def test_every_factory_dit_family_caches_end_to_end(node, family):
    model = factory.build_model(family, "tiny")
    fam, refs = ditcache.model_blocks(model.get_model_object("diffusion_model"))
    assert fam is not None, f"{family}: no block layout"
    ref = run(model, family)
    patched = apply(node, model)
    out = run(patched, family)
    stats = ctl_of(patched).last_stats
    assert stats["calls_cached"] > 0 and stats["blocks_skipped"] > 0
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    assert torch.equal(run(model, family), ref)   # the unpatched model is untouched
    exact = apply(node, model, cache_step_interval=1)
    assert torch.equal(run(exact, family), ref)   # interval 1: every step refreshes, bit-identical


def test_every_layout_family_has_a_factory_model(comfy_nodes):
    """The README's family table is `dit_layout.FAMILIES`; each is run above through a factory model."""
    covered = set()
    for family in DIT_FAMILIES:
        fam = dit_layout.family_of(factory.build_model(family, "tiny").get_model_object("diffusion_model"))
        covered.add(fam.name)
    assert covered == {f.name for f in dit_layout.FAMILIES}


@pytest.mark.parametrize("sampler,cfg,batch", [("euler", 1.0, 2), ("heun", 3.0, 1), ("dpmpp_2m_sde", 3.0, 2)])
def test_samplers_cfg_and_batches(node, flux, sampler, cfg, batch):
    patched = apply(node, flux, cache_step_start=2)
    out = run(patched, sampler=sampler, cfg=cfg, batch=batch)
    assert out.shape[0] == batch and torch.isfinite(out).all()
    stats = ctl_of(patched).last_stats
    assert stats["steps"] == 8 and stats["calls_cached"] > 0
    assert stats["steps_cached"] <= 8 - 2


def test_batch_items_match_running_them_alone(node, comfy_nodes):
    """Per-conditioning deltas: a batch of two prompts caches like each prompt alone."""
    wan = factory.build_model("wan21", "tiny")
    patched = apply(node, wan)
    model = factory.build_model("wan21", "tiny")
    pos = [[torch.cat([factory.conditioning("wan21", "tiny", p)[0][0] for p in ("a cat", "a dog")]), {}]]
    neg = [[torch.cat([factory.conditioning("wan21", "tiny", "")[0][0]] * 2), {}]]
    latent = factory.empty_latent("wan21", 2, 64, 64, 5)
    import nodes as comfy_nodes_mod
    both = comfy_nodes_mod.common_ksampler(patched, 0, 8, 4.0, "euler", "normal", pos, neg, latent)[0]["samples"]
    assert ctl_of(patched).last_stats["calls_cached"] > 0
    ref = comfy_nodes_mod.common_ksampler(model, 0, 8, 4.0, "euler", "normal", pos, neg, latent)[0]["samples"]
    assert not torch.equal(both, ref)
    for i, prompt in enumerate(("a cat", "a dog")):
        one_latent = {"samples": latent["samples"][i:i + 1]}
        one_latent["batch_index"] = [i]   # the noise item i got in the batch
        alone = comfy_nodes_mod.common_ksampler(patched, 0, 8, 4.0, "euler", "normal",
                             [[pos[0][0][i:i + 1], {}]], [[neg[0][0][i:i + 1], {}]], one_latent)[0]["samples"]
        torch.testing.assert_close(alone, both[i:i + 1], rtol=1e-4, atol=1e-4)


def test_run_twice_identical_and_img2img(node, flux):
    patched = apply(node, flux)
    assert torch.equal(run(patched), run(patched))
    start = {"samples": torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))}
    out = run(patched, denoise=0.6, latent=start)
    assert torch.isfinite(out).all() and ctl_of(patched).last_stats["calls_cached"] > 0


def test_lora_before_or_after(node, flux, with_lora):
    key = "diffusion_model.double_blocks.0.img_attn.qkv.weight"
    before = run(apply(node, with_lora(flux, key), cache_block_start=1))
    after = run(with_lora(apply(node, flux, cache_block_start=1), key))
    assert torch.equal(before, after)
    assert not torch.equal(before, run(apply(node, flux, cache_block_start=1)))


def test_block_views_path_with_lora(node, comfy_nodes, with_lora):
    """PixArt has no block replace: views of its blocks share the weights a LoRA patches."""
    pixart = factory.build_model("pixart", "tiny")
    lora = with_lora(pixart, "diffusion_model.blocks.0.attn.qkv.weight")
    args = dict(steps=8, cfg=4.0, width=384, height=384)
    before = factory.sample(apply(node, lora, cache_step_interval=1), "pixart", **args)
    assert torch.equal(before, factory.sample(lora, "pixart", **args))
    assert not torch.equal(before, factory.sample(pixart, "pixart", **args))


def test_two_experts_keep_independent_state(node, comfy_nodes):
    """Wan 2.2 14B: a high-noise and a low-noise expert, each with its own cache, sampled in turn."""
    import nodes as comfy_nodes_mod
    high = apply(node, factory.build_model("wan21", "tiny", seed=1))
    low = apply(node, factory.build_model("wan21", "tiny", seed=2), cache_step_interval=3)
    pos, neg = factory.conditioning("wan21", "tiny", "a cat"), factory.conditioning("wan21", "tiny", "")
    latent = factory.empty_latent("wan21", 1, 64, 64, 5)
    adv = comfy_nodes_mod.NODE_CLASS_MAPPINGS["KSamplerAdvanced"]()
    first = adv.sample(high, "enable", 0, 10, 4.0, "euler", "simple", pos, neg, latent, 0, 5, "enable")[0]
    out = adv.sample(low, "disable", 0, 10, 4.0, "euler", "simple", pos, neg, first, 5, 10, "disable")[0]
    assert torch.isfinite(out["samples"]).all()
    hs, ls = ctl_of(high).last_stats, ctl_of(low).last_stats
    assert hs["calls"] == 5 and ls["calls"] == 5
    assert hs["calls_cached"] == 2 and ls["calls_cached"] > 0   # high: steps 2 and 4 (start 1, interval 2)


def test_unsupported_model_passes_through_with_a_warning(node, comfy_nodes, caplog):
    sd15 = factory.build_model("sd15", "tiny")
    with caplog.at_level(logging.WARNING, logger="comfyui-optim"):
        assert node.execute(model=sd15).result[0] is sd15
    assert "SD15" in caplog.text and "UNetModel" in caplog.text and "passes through unchanged" in caplog.text
    search = comfy_nodes.NODE_CLASS_MAPPINGS["OptimDiTCacheSearch"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="comfyui-optim"):
        model, _, report, _ = search.execute(
            model=sd15, positive=None, negative=None, latent_image=None, seed=0, steps=10, cfg=1.0,
            sampler_name="euler", scheduler="simple").result
    assert model is sd15 and "nothing was searched" in report and "SD15" in caplog.text


def test_bad_configurations_say_what_is_wrong(node, flux):
    assert "mode must be one of" in node.validate_inputs(mode="turbo", cache_num_blocks=-1)
    assert "range is empty" in node.validate_inputs(mode="fixed", cache_num_blocks=0)
    assert node.validate_inputs(mode="adaptive", cache_num_blocks=3) is True
    with pytest.raises(ValueError, match=r"cached blocks 2\.\.9 are outside the model's 4 blocks"):
        apply(node, flux, cache_block_start=2, cache_num_blocks=8)
    with pytest.raises(ValueError, match="made for a wan model, not flux"):
        node.execute(model=flux, config=ditcache.DiTCacheConfig(family="wan"))
    with pytest.raises(ValueError, match="beyond the schedule of 8 steps"):   # recorded steps
        node.execute(model=flux, config=ditcache.DiTCacheConfig(cache_step_start=8, steps=8))
    with pytest.raises(ValueError, match="already applied"):
        apply(node, apply(node, flux))


def test_config_input_overrides_the_widgets(node, flux):
    config = ditcache.DiTCacheConfig(cache_block_start=2, cache_num_blocks=2, cache_step_start=3,
                                     cache_step_interval=2)
    patched = node.execute(model=flux, cache_block_start=0, cache_num_blocks=1, config=config).result[0]
    ctl = ctl_of(patched)
    assert (ctl.start, ctl.end) == (2, 4)


def test_search_finds_saves_and_loads_a_configuration(comfy_nodes, flux, tmp_path, monkeypatch):
    import folder_paths
    monkeypatch.setattr(folder_paths, "get_user_directory", lambda: str(tmp_path))
    m = comfy_nodes.NODE_CLASS_MAPPINGS
    search, load, inline, node = m["OptimDiTCacheSearch"], m["OptimDiTCacheLoad"], m["OptimDiTCacheConfig"], \
        m["OptimDiTCache"]
    pos, neg = factory.conditioning("flux", "tiny", "a cat"), factory.conditioning("flux", "tiny", "")
    latent = factory.empty_latent("flux", 1, 64, 64)
    model, config, report, config_json = search.execute(
        model=flux, positive=pos, negative=neg, latent_image=latent, seed=3, steps=10, cfg=1.0,
        sampler_name="euler", scheduler="simple", target_speedup=1.3, budget=2, calibration_seeds=2,
        save_as="flux tiny").result
    assert config.family == "flux" and config.num_blocks == 4 and config.steps == 10
    assert config.sampler == "euler" and config.scheduler == "simple"
    assert "PSNR" in report and "saved as 'flux tiny'" in report
    assert ctl_of(model).config == config
    assert "flux tiny" in [o for o in load.define_schema().inputs[0].options]
    assert load.validate_inputs(name="flux tiny") is True
    assert "no saved DiT cache configuration named 'other'" in load.validate_inputs(name="other")
    assert "path separators" in load.validate_inputs(name="../x")
    loaded = load.execute(name="flux tiny").result[0]
    from_inline = inline.execute(config_json=config_json).result[0]
    assert loaded == config == from_inline
    assert inline.validate_inputs(config_json=config_json) is True
    assert "not valid JSON" in inline.validate_inputs(config_json="{")
    assert "must be >= 1" in inline.validate_inputs(config_json='{"cache_step_interval": 0}')
    # the saved configuration reproduces the search's patched model
    assert torch.equal(run(node.execute(model=flux, config=loaded).result[0], steps=10, seed=3),
                       run(model, steps=10, seed=3))
    # saving a configuration for another family under the same name needs overwrite
    wan_config = ditcache.DiTCacheConfig(family="wan")
    from optim.cache_config_store import SUBDIR, ConfigStore
    store = ConfigStore(tmp_path / "default" / SUBDIR)
    assert store.names() == ["flux tiny"]
    with pytest.raises(ValueError, match="already holds a configuration for a flux model"):
        store.save("flux tiny", wan_config)


def test_torch_compile_model_before_or_after(node, comfy_nodes):
    """ComfyUI's TorchCompileModel (inductor) composes with the cache in either order."""
    compile_node = comfy_nodes.NODE_CLASS_MAPPINGS["TorchCompileModel"]
    wan = factory.build_model("wan21", "tiny")

    def compiled(model):
        out = compile_node.execute(model=model, backend="inductor")
        return out.result[0] if hasattr(out, "result") else out[0]

    eager = run(apply(node, wan), "wan21", steps=6)
    for model in (apply(node, compiled(wan)), compiled(apply(node, wan))):
        out = run(model, "wan21", steps=6)
        torch.testing.assert_close(out, eager, rtol=1e-3, atol=2e-2)
        assert ctl_of(model).last_stats["calls_cached"] > 0
