"""API-format prompts (what the frontend's "Export (API)" gives) for headless runs of the pack.

A graph is a dict node_id -> {"class_type", "inputs"}; a link is [node_id, output_index]."""
from __future__ import annotations

from bench import factory


def model_files(family: str, size: str = "tiny") -> tuple[str, str]:
    """(diffusion model file name, VAE file name) the end-to-end setups write for `family`."""
    fam = factory.family(family)
    vae = f"optim-{fam.vae}-{fam.latent_channels}ch.safetensors"
    return f"optim-{family}-{size}.safetensors", vae


def write_model_files(models_dir, family: str, size: str = "tiny", seed: int = 0) -> None:
    unet, vae = model_files(family, size)
    target = models_dir / "diffusion_models" / unet
    if not target.exists():
        factory.save_diffusion_model(family, size, target, seed)
    if not (models_dir / "vae" / vae).exists():
        factory.save_vae(family, models_dir / "vae" / vae, seed)


def add_sampling(g: dict, optim: list[tuple[str, dict]], *, seed: int, steps: int, cfg: float,
                 sampler: str, scheduler: str, filename_prefix: str) -> dict:
    """Complete a graph that has "unet", "vae", "pos", "neg" and "latent": [optim nodes...] ->
    KSampler -> VAEDecode -> SaveImage (ids "optim0", ..., "sampler", "decode", "save")."""
    model = ["unet", 0]
    for i, (class_type, inputs) in enumerate(optim):
        g[f"optim{i}"] = {"class_type": class_type, "inputs": {"model": model, **inputs}}
        model = [f"optim{i}", 0]
    g["sampler"] = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler,
        "scheduler": scheduler, "positive": ["pos", 0], "negative": ["neg", 0],
        "latent_image": ["latent", 0], "denoise": 1.0}}
    g["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["vae", 0]}}
    g["save"] = {"class_type": "SaveImage", "inputs": {"images": ["decode", 0],
                                                       "filename_prefix": filename_prefix}}
    return g


def txt2img(family: str, size: str = "tiny", *, prompt: str = "a red circle", negative: str = "",
            steps: int = 8, cfg: float | None = None, sampler: str = "euler", scheduler: str = "normal",
            seed: int = 0, width: int = 64, height: int = 64, frames: int = 5, batch: int = 1,
            optim: list[tuple[str, dict]] = (), filename_prefix: str = "optim") -> dict:
    """UNETLoader -> [optim nodes...] -> KSampler -> VAEDecode -> SaveImage, with the test helper
    node OptimTestConditioning as the text encoder (no CLIP weights can be downloaded here).
    Node ids: "unet", "pos", "neg", "latent", "sampler", "vae", "decode", "save", "optim0", ..."""
    fam = factory.family(family)
    unet, vae = model_files(family, size)
    cfg = cfg if cfg is not None else (1.0 if fam.guidance else 5.0)
    g: dict = {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": vae}},
    }
    for key, text in (("pos", prompt), ("neg", negative)):
        g[key] = {"class_type": "OptimTestConditioning",
                  "inputs": {"family": family, "size": size, "text": text, "seed": seed, "batch": batch}}
    if fam.video:
        g["latent"] = {"class_type": "EmptyHunyuanLatentVideo",
                       "inputs": {"width": width, "height": height, "length": frames, "batch_size": batch}}
    elif fam.latent_channels == 16:
        g["latent"] = {"class_type": "EmptySD3LatentImage",
                       "inputs": {"width": width, "height": height, "batch_size": batch}}
    else:
        g["latent"] = {"class_type": "EmptyLatentImage",
                       "inputs": {"width": width, "height": height, "batch_size": batch}}
    return add_sampling(g, optim, seed=seed, steps=steps, cfg=cfg, sampler=sampler, scheduler=scheduler,
                        filename_prefix=filename_prefix)
