"""Standard ComfyUI graphs on the reference models: CLIPLoader + CLIPTextEncode, UNETLoader,
VAELoader, EmptySD3LatentImage (the DiT) or EmptyLatentImage (the UNet), KSampler, VAEDecode,
SaveImage. Nothing of the pack and no test helper nodes: exactly what a user would wire.

`install(models_dir)` puts the shipped weights (symlinks), the UNet expanded from its shipped slim
form and the regenerated CLIP-L where those loaders look for them."""
from __future__ import annotations

from pathlib import Path

from bench.graphs import add_sampling
from bench.reference import WEIGHTS_DIR, text_encoder, work_dir

DIT_FILE = "optim-ref-sd3.safetensors"
VAE_FILE = "optim-ref-taesd3.safetensors"
UNET_FILE = "optim-ref-sd15.safetensors"       # expanded from the shipped slim file (bench.reference.unet)
UNET_SLIM_FILE = "optim-ref-sd15-slim.safetensors"
VAE4_FILE = "optim-ref-taesd15.safetensors"
CLIP_FILE = text_encoder.FILE_NAME
STEPS, CFG, SAMPLER, SCHEDULER = 20, 4.0, "euler", "normal"

# the reference denoisers: what the graph loads for each, and the factory family it belongs to
MODELS = {
    "dit": {"unet": DIT_FILE, "vae": VAE_FILE, "latent": "EmptySD3LatentImage", "family": "sd3",
            "title": "reference DiT (SD3 MMDiT)"},
    "unet": {"unet": UNET_FILE, "vae": VAE4_FILE, "latent": "EmptyLatentImage", "family": "sd15",
             "title": "reference UNet (SD1.5)"},
}


def shipped(name: str) -> Path:
    path = WEIGHTS_DIR / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: train it with `python -m bench.reference.train`")
    return path


def install(models_dir: Path) -> Path:
    """Link the shipped DiT and VAEs into models/diffusion_models and models/vae, expand the
    shipped slim UNet into its SD1.5 file and write the generated CLIP-L (both once, cached in the
    work folder) into models/diffusion_models and models/text_encoders."""
    models_dir = Path(models_dir)
    clip = text_encoder.write_clip_l(work_dir() / CLIP_FILE)
    links = [("diffusion_models", DIT_FILE, shipped(DIT_FILE)), ("vae", VAE_FILE, shipped(VAE_FILE)),
             ("text_encoders", CLIP_FILE, clip)]
    if (WEIGHTS_DIR / VAE4_FILE).exists():
        links.append(("vae", VAE4_FILE, shipped(VAE4_FILE)))
    if (WEIGHTS_DIR / UNET_SLIM_FILE).exists():
        from bench.reference import unet
        links.append(("diffusion_models", UNET_FILE, unet.write_full(WEIGHTS_DIR / UNET_SLIM_FILE)))
    for sub, name, src in links:
        link = models_dir / sub / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(src.resolve())
    return models_dir


def txt2img(prompt: str, *, negative: str = "", seed: int = 0, steps: int = STEPS, cfg: float = CFG,
            sampler: str = SAMPLER, scheduler: str = SCHEDULER, batch: int = 1,
            optim: list[tuple[str, dict]] = (), filename_prefix: str = "ref", model: str = "dit") -> dict:
    """API-format graph for the reference `model` ("dit" or "unet", see MODELS). Node ids: "unet",
    "clip", "vae", "pos", "neg", "latent", "sampler", "decode", "save", and "optim0", ... for
    MODEL -> MODEL nodes between the loader and KSampler."""
    spec = MODELS[model]
    g: dict = {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": spec["unet"], "weight_dtype": "default"}},
        "clip": {"class_type": "CLIPLoader", "inputs": {"clip_name": CLIP_FILE, "type": "stable_diffusion",
                                                        "device": "default"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": spec["vae"]}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["clip", 0]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["clip", 0]}},
        "latent": {"class_type": spec["latent"], "inputs": {"width": 64, "height": 64, "batch_size": batch}},
    }
    return add_sampling(g, optim, seed=seed, steps=steps, cfg=cfg, sampler=sampler, scheduler=scheduler,
                        filename_prefix=filename_prefix)


class InProcess:
    """The same graph run in this process through the node classes ComfyUI registered (for tests
    and quick checks; `bench.reference.evaluate` runs it through a server). Needs
    `bench.comfy_env.load_comfyui_in_process()` first."""

    def __init__(self, model: str = "dit"):
        import folder_paths
        import nodes as comfy_nodes
        self.nodes = comfy_nodes.NODE_CLASS_MAPPINGS
        self.spec = MODELS[model]
        install(Path(folder_paths.models_dir))
        self.model = self.nodes["UNETLoader"]().load_unet(self.spec["unet"], "default")[0]
        self.clip = self.nodes["CLIPLoader"]().load_clip(CLIP_FILE, "stable_diffusion", "default")[0]
        self.vae = self.nodes["VAELoader"]().load_vae(self.spec["vae"])[0]
        self._cond: dict[str, list] = {}

    def encode(self, text: str):
        if text not in self._cond:
            import torch
            with torch.inference_mode():
                out = self.nodes["CLIPTextEncode"]().encode(self.clip, text)
            self._cond[text] = out[0] if isinstance(out, tuple) else out.result[0]
        return self._cond[text]

    def sample(self, prompt: str, *, seed: int = 0, steps: int = STEPS, cfg: float = CFG, model=None,
               negative: str = "", batch: int = 1):
        """Decoded images, float [batch, 64, 64, 3] in [0, 1] (under inference mode, as ComfyUI's
        executor runs nodes)."""
        import torch
        with torch.inference_mode():
            return self._sample(prompt, seed, steps, cfg, model, negative, batch)

    def _sample(self, prompt, seed, steps, cfg, model, negative, batch):
        if self.spec["latent"] == "EmptySD3LatentImage":
            latent = self.nodes["EmptySD3LatentImage"].execute(64, 64, batch).result[0]
        else:
            latent = self.nodes["EmptyLatentImage"]().generate(64, 64, batch)[0]
        out = self.nodes["KSampler"]().sample(model or self.model, seed, steps, cfg, SAMPLER, SCHEDULER,
                                              self.encode(prompt), self.encode(negative), latent)[0]
        return self.nodes["VAEDecode"]().decode(self.vae, out)[0]
