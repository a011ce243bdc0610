"""Reconstruction quality of the shipped reference VAEs, through the stock nodes.

    python -m bench.reference.vae_eval [--scenes 256] [--seed 12345]

For each shipped VAE (16 channels: the DiT's; 4 channels: the UNet's), held-out scenes (a seed the
training never drew) go through `VAELoader` -> `VAEEncode` -> `VAEDecode` in one process; prints
and saves PSNR / SSIM of the round trip and the adherence of the decoded images to the scenes'
captions (the ceiling the VAE puts on any denoiser's adherence).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.reference.evaluate import RESULTS


def run(scenes: int = 256, seed: int = 12345, threads: int = 1) -> dict:
    from bench import comfy_env
    comfy_env.load_comfyui_in_process(Path(tempfile.mkdtemp(prefix="optim-ref-vae-")))
    import folder_paths
    import nodes as comfy_nodes
    import torch
    if threads:
        torch.set_num_threads(threads)
    from bench.reference import adherence as ad
    from bench.reference import dataset as ds
    from bench.reference import graphs
    from optim.metrics import psnr, ssim
    graphs.install(Path(folder_paths.models_dir))
    images, captions = ds.make_dataset(scenes, seed)
    x = torch.from_numpy(images)  # [N, 64, 64, 3] in [0, 1], ComfyUI's IMAGE layout
    out = {"scenes": scenes, "seed": seed, "vaes": {}}
    for name, spec in graphs.MODELS.items():
        t0 = time.time()
        vae = comfy_nodes.NODE_CLASS_MAPPINGS["VAELoader"]().load_vae(spec["vae"])[0]
        with torch.inference_mode():
            latent = comfy_nodes.NODE_CLASS_MAPPINGS["VAEEncode"]().encode(vae, x)[0]
            y = comfy_nodes.NODE_CLASS_MAPPINGS["VAEDecode"]().decode(vae, latent)[0].float()
        adh = ad.adherence([im.numpy() for im in y], captions)
        out["vaes"][spec["vae"]] = {
            "for": spec["title"], "latent_channels": vae.latent_channels,
            "psnr_db": psnr(x, y, data_range=1.0), "ssim": ssim(x, y),
            "adherence_of_reconstructions": adh["adherence"], "per_attribute": adh["per_attribute"],
            "seconds": time.time() - t0}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reference.vae_eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=256)
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--out", type=Path, default=RESULTS / "vae.json")
    args = parser.parse_args(argv)
    result = run(args.scenes, args.seed)
    for file, r in result["vaes"].items():
        print(f"{file} ({r['latent_channels']} channels, {r['for']}): PSNR {r['psnr_db']:.2f} dB, "
              f"SSIM {r['ssim']:.4f}, adherence of reconstructions {r['adherence_of_reconstructions']:.3f} "
              + ", ".join(f"{k} {v:.2f}" for k, v in r["per_attribute"].items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
