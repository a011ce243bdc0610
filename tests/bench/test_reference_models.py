"""The reference models: their formats load through ComfyUI's standard loaders, training uses
the objective ComfyUI samples with, and the shipped weights follow prompts."""
import numpy as np
import pytest
import torch

from bench.reference import WEIGHTS_DIR, graphs
from bench.reference import dataset as ds
from tests.bench.prompt_following import assert_follows_prompts

SHIPPED = [WEIGHTS_DIR / graphs.DIT_FILE, WEIGHTS_DIR / graphs.VAE_FILE]


def test_slim_vae_exports_exactly_to_comfyui_taesd(comfy_nodes):
    import comfy.sd
    from bench.reference import vae as rv
    torch.manual_seed(0)
    slim = rv.SlimTAESD(16)
    with torch.no_grad():
        for p in slim.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    vae = comfy.sd.VAE(sd=slim.export(vae_scale=2.0, vae_shift=0.3))
    assert vae.latent_channels == 16
    x = rv.batch_images(np.random.Generator(np.random.PCG64(0)), 2)
    with torch.no_grad():
        z, y = slim.encode(x), slim.decode(slim.encode(x))
        zc = vae.encode(x.permute(0, 2, 3, 1))
        yc = vae.decode(zc).reshape(2, 64, 64, 3).permute(0, 3, 1, 2)
    torch.testing.assert_close(zc, z / 2.0 + 0.3, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(yc, y.clamp(0, 1), atol=1e-5, rtol=1e-5)


def test_training_prediction_is_what_comfyui_samples(comfy_nodes):
    """predict() (the training forward) gives the output ComfyUI's apply_model turns into the
    denoised latent: denoised = x - sigma * prediction (rectified flow, CONST)."""
    from bench.reference import dit
    model = dit.build(depth=2, seed=1)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            if "adaLN_modulation" in name or name.startswith("final_layer.linear"):
                p.normal_(0, 0.02)  # zero at init: make the check non-trivial
    gen = torch.Generator().manual_seed(0)
    x, ctx, pooled = torch.randn(2, 16, 8, 8, generator=gen), torch.randn(2, 77, 768), torch.randn(2, 768)
    sigma = dit.sample_sigmas(2, gen)
    with torch.no_grad():
        pred = dit.predict(model, x, sigma, ctx, pooled)
        denoised = model.apply_model(x, sigma, c_crossattn=ctx, y=pooled)
    torch.testing.assert_close(denoised, x - sigma.view(-1, 1, 1, 1) * pred, atol=1e-5, rtol=1e-5)
    assert model.model_sampling.shift == dit.SHIFT


@pytest.fixture(scope="module")
def reference(comfy_nodes):
    missing = [p.name for p in SHIPPED if not p.exists()]
    if missing:
        pytest.fail(f"shipped reference weights missing: {missing}")
    return graphs.InProcess()


def test_shipped_weights_fit_the_budget_and_load_as_their_architectures(reference):
    total = sum(p.stat().st_size for p in WEIGHTS_DIR.glob("*.safetensors"))
    assert total <= 25 * 2**20, f"shipped weights take {total / 2**20:.1f} MiB"
    import comfy.model_base
    model = reference.model.model
    assert isinstance(model, comfy.model_base.SD3)
    assert model.diffusion_model.context_embedder.in_features == 768
    assert reference.vae.latent_channels == 16
    cond = reference.encode(ds.PROMPTS[0])
    assert cond[0][0].shape == (1, 77, 768) and cond[0][1]["pooled_output"].shape == (1, 768)


def test_shipped_models_follow_prompts(reference):
    assert_follows_prompts(reference, ds.PROMPTS[:6])


def test_training_chains_cover_every_stage_once_and_keep_the_other_options():
    from bench.reference import train
    chained = [s for chain in train.CHAINS for s in chain]
    assert sorted(chained + ["embed"]) == sorted(train.STAGES) and len(set(chained)) == len(chained)
    argv = ["--seed", "3", "--stages", "vae", "unet", "--jobs", "2", "--unet-steps", "10"]
    kept = [a for i, a in enumerate(argv) if not train._is_stage_or_jobs_arg(argv, i)]
    assert kept == ["--seed", "3", "--unet-steps", "10"]
