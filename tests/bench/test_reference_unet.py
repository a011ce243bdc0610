"""The reference UNet: its slim form expands into a state dict the stock loader detects as SD1.5
and that computes what the slim model computes; the expansion is deterministic; training uses
the objective ComfyUI samples SD1.5 with; the shipped weights load and follow prompts."""
import pytest
import torch

from bench.reference import WEIGHTS_DIR, graphs
from bench.reference import dataset as ds
from tests.bench.prompt_following import assert_follows_prompts


def _random_slim(seed: int) -> tuple:
    """A slim model with every weight non-zero (zero-init layers included), so the check sees
    every layer."""
    from bench.reference import unet as ru
    model = ru.build(ru.WIDTH, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.diffusion_model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model, {k: v.detach().clone() for k, v in model.diffusion_model.state_dict().items()}


def test_expanded_slim_unet_is_detected_as_sd15_and_computes_the_same(comfy_nodes):
    import comfy.model_base
    import comfy.sd
    import comfy.supported_models
    from bench.reference import unet as ru
    slim_model, slim = _random_slim(3)
    full = ru.expand(slim)
    keys = set(full)  # the loader consumes the dict
    patcher = comfy.sd.load_diffusion_model_state_dict(full, {"dtype": torch.float32})
    assert patcher is not None, "ComfyUI did not detect the expanded state dict"
    cfg = patcher.model.model_config
    assert type(cfg) is comfy.supported_models.SD15
    assert type(patcher.model) is comfy.model_base.BaseModel
    assert cfg.unet_config["model_channels"] == 320 and cfg.unet_config["context_dim"] == 768
    assert cfg.unet_config["channel_mult"] == [1, 1]
    loaded = patcher.model.diffusion_model.state_dict()
    assert set(loaded) == keys  # nothing missing, nothing left over
    gen = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 768, generator=gen)
    sigma = torch.tensor([14.0, 0.3])
    with torch.no_grad():
        want = slim_model.apply_model(x, sigma, c_crossattn=ctx)
        got = patcher.model.apply_model(x, sigma, c_crossattn=ctx)
    err = float((want - got).abs().max() / want.abs().mean())
    assert err < 1e-4, err


def test_expansion_is_deterministic(comfy_nodes):
    from bench.reference import unet as ru
    _, slim = _random_slim(5)
    slim16 = {k: v.half() for k, v in slim.items()}
    a, b = ru.expand(slim16), ru.expand({k: v.clone() for k, v in slim16.items()})
    assert ru.state_dict_digest(a) == ru.state_dict_digest(b)
    # zero outside the slim channels: as many non-zeros as the slim model has
    assert sum(int((v != 0).sum()) for v in a.values()) == sum(int((v != 0).sum()) for v in slim16.values())


def test_training_prediction_is_what_comfyui_samples(comfy_nodes):
    """predict() (the training forward) is the eps ComfyUI's apply_model turns into the denoised
    latent: denoised = x - sigma * eps (EPS, SD1.5's discrete schedule)."""
    import comfy.model_sampling
    from bench.reference import unet as ru
    model, _ = _random_slim(1)
    assert isinstance(model.model_sampling, comfy.model_sampling.EPS)
    assert isinstance(model.model_sampling, comfy.model_sampling.ModelSamplingDiscrete)
    gen = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 768, generator=gen)
    sigma = model.model_sampling.sigmas[torch.tensor([10, 900])].float()
    with torch.no_grad():
        eps = ru.predict(model, x, sigma, ctx)
        denoised = model.apply_model(x, sigma, c_crossattn=ctx)
    torch.testing.assert_close(denoised, x - sigma.view(-1, 1, 1, 1) * eps, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def reference_unet(comfy_nodes):
    missing = [n for n in (graphs.UNET_SLIM_FILE, graphs.VAE4_FILE) if not (WEIGHTS_DIR / n).exists()]
    if missing:
        pytest.fail(f"shipped reference weights missing: {missing}")
    return graphs.InProcess("unet")


def test_shipped_slim_unet_regenerates_the_recorded_bits(reference_unet):
    """Expanding the shipped slim weights here gives the bits recorded when they were trained,
    and the file the loader reads holds them."""
    import safetensors
    import safetensors.torch
    from bench.reference import unet as ru
    slim_path = WEIGHTS_DIR / graphs.UNET_SLIM_FILE
    with safetensors.safe_open(str(slim_path), "pt") as f:
        recorded = f.metadata()["expanded_sha256"]
    assert ru.state_dict_digest(ru.expanded_fp16(ru.shipped_state_dict(slim_path))) == recorded
    full = safetensors.torch.load_file(str(ru.write_full(slim_path)))
    assert ru.state_dict_digest(full) == recorded


def test_shipped_unet_loads_as_sd15_and_follows_prompts(reference_unet):
    import comfy.supported_models
    assert type(reference_unet.model.model.model_config) is comfy.supported_models.SD15
    assert reference_unet.vae.latent_channels == 4
    assert_follows_prompts(reference_unet, ds.PROMPTS[:4])


def test_digest_sees_every_bit():
    from bench.reference import unet as ru
    a = {"w": torch.zeros(3, dtype=torch.float16)}
    b = {"w": torch.tensor([0.0, 0.0, -0.0], dtype=torch.float16)}
    assert ru.state_dict_digest(a) != ru.state_dict_digest(b)  # -0.0 == 0.0, but not the same bits
    assert ru.state_dict_digest(a) != ru.state_dict_digest({"w": torch.zeros(3, dtype=torch.float32)})
