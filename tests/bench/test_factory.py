"""The model factory builds real ComfyUI architectures with sane generated weights."""
import pytest
import torch

from bench import factory

FAMILIES = list(factory.FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_samples_finite_and_bounded(comfy_nodes, family):
    fam = factory.family(family)
    model = factory.build_model(family, "tiny")
    cfg = 1.0 if fam.guidance else 5.0
    out = factory.sample(model, family, "tiny", steps=20, cfg=cfg, width=32, height=32, frames=5)
    assert out.shape == factory.latent_shape(family, 1, 32, 32, 5) or out.shape[1] == fam.latent_channels
    assert torch.isfinite(out).all()
    # unit-scale predictions that ignore the noise leave at most a few sigma_max of it in the latent
    sigma_max = float(model.get_model_object("model_sampling").sigma_max)
    assert 0.01 < float(out.std()) < 20 * max(sigma_max, 1.0)


def test_weights_are_deterministic_per_seed(comfy_nodes):
    a = factory.diffusion_state_dict(factory.build_model("flux", "tiny", seed=3))
    b = factory.diffusion_state_dict(factory.build_model("flux", "tiny", seed=3))
    c = factory.diffusion_state_dict(factory.build_model("flux", "tiny", seed=4))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_output_layer_is_calibrated_to_unit_scale(comfy_nodes):
    model = factory.build_model("sd15", "tiny")
    layer = model.model.diffusion_model.get_submodule("out.2")
    seen = []
    hook = layer.register_forward_hook(lambda _m, _i, o: seen.append(float(o.std())))
    factory.sample(model, "sd15", "tiny", steps=1, cfg=1.0)
    hook.remove()
    assert seen and 0.5 < seen[0] < 2.0


@pytest.mark.parametrize("family", [f for f in FAMILIES if "tiny" in factory.family(f).detectable])
def test_saved_file_loads_through_comfyui_detection(comfy_nodes, family, tmp_path):
    import comfy.sd
    path = factory.save_diffusion_model(family, "tiny", tmp_path / "m.safetensors", dtype=torch.float32)
    loaded = comfy.sd.load_diffusion_model(str(path))
    assert type(loaded.model.model_config).__name__ == factory.family(family).model_class
    built = factory.build_model(family, "tiny")
    assert torch.equal(factory.sample(loaded, family, "tiny", steps=2),
                       factory.sample(built, family, "tiny", steps=2))


@pytest.mark.parametrize("family,size", [(f, s) for f in FAMILIES for s in factory.family(f).detectable])
def test_detectable_sizes_detect_back_to_the_same_model(comfy_nodes, family, size):
    """What `Family.detectable` promises, for every size (full ones too, cheaply: the model is built
    on the meta device): ComfyUI's detection turns the state dict's keys and shapes back into the
    family's supported model, with the same config and the same parameters."""
    import comfy.model_detection
    cfg = factory.model_config(factory.family(family), size)
    sd = cfg.get_model({}, device="meta").diffusion_model.state_dict()
    detected = comfy.model_detection.model_config_from_unet(sd, "")
    assert type(detected).__name__ == factory.family(family).model_class
    ours, theirs = cfg.unet_config, detected.unet_config
    assert {k: ours[k] for k in ours.keys() & theirs.keys() if k != "dtype"} == \
        {k: theirs[k] for k in ours.keys() & theirs.keys() if k != "dtype"}
    rebuilt = detected.get_model({}, device="meta").diffusion_model.state_dict()
    assert {k: v.shape for k, v in rebuilt.items()} == {k: v.shape for k, v in sd.items()}


def test_undetectable_size_is_refused_with_a_reason(tmp_path):
    with pytest.raises(ValueError, match="cannot detect flux at size 'tiny'"):
        factory.save_diffusion_model("flux", "tiny", tmp_path / "x.safetensors")


@pytest.mark.parametrize("family", FAMILIES)
def test_conditioning_matches_the_model_and_depends_on_prompt(comfy_nodes, family):
    a = factory.conditioning(family, "tiny", "a red circle")
    b = factory.conditioning(family, "tiny", "a blue square")
    assert a[0][0].shape == (1, *factory.context_shape(factory.family(family), "tiny"))
    assert not torch.equal(a[0][0], b[0][0])
    assert torch.equal(a[0][0], factory.conditioning(family, "tiny", "a red circle")[0][0])


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_output_depends_on_the_prompt(comfy_nodes, family):
    """One denoising step from the same noise with two prompts: the predictions differ (caching
    and guidance techniques assume the model reads its conditioning)."""
    model = factory.build_model(family, "tiny")
    a = factory.sample(model, family, "tiny", steps=1, cfg=1.0, prompt="a red circle")
    b = factory.sample(model, family, "tiny", steps=1, cfg=1.0, prompt="a blue square")
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert float((a - b).std() / a.std()) > 1e-3


@pytest.mark.parametrize("family", ["sd15", "flux", "wan21"])
def test_vae_decodes_the_family_latent(comfy_nodes, family, tmp_path):
    import comfy.sd
    import comfy.utils
    fam = factory.family(family)
    latent = torch.randn(factory.latent_shape(family, 1, 64, 64, 5))
    path = factory.save_vae(family, tmp_path / "vae.safetensors")
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(path)))  # what VAELoader does
    img = vae.decode(latent)
    assert img.shape[-3:] == (64, 64, 3)
    if fam.video:
        assert img.shape[1] == 5
    assert torch.isfinite(img).all() and img.min() >= 0 and img.max() <= 1
