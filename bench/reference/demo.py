"""The `make demo` part on the trained reference models: a few prompts of the fixed set through
the standard graph (CLIPLoader, CLIPTextEncode, UNETLoader, VAELoader, KSampler, VAEDecode) on a
headless server, plain and with each caching technique; prints adherence, speed and fidelity and
saves a grid (one row per prompt; columns: uncached, then each technique)."""
from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from bench.reference import adherence as ad
from bench.reference import dataset as ds

TECHNIQUES = ("ditcache_wide", "ditcache_adaptive_wide", "easycache", "lazycache")
UNET_TECHNIQUES = ("deepcache3", "deepcache5", "tgate", "tgate_deepcache3")


def grid_name(model: str) -> str:
    return "reference-grid.png" if model == "dit" else f"reference-grid-{model}.png"


def run(server, out_dir: Path, steps: int = 20, prompts: int = 8, techniques=None,
        model: str = "dit") -> list[tuple]:
    from PIL import Image

    from bench import techniques as registry
    from bench.reference.evaluate import run_prompts
    from optim.metrics import psnr, ssim
    if techniques is None:
        techniques = UNET_TECHNIQUES if model == "unet" else TECHNIQUES
    chosen = ds.PROMPTS[:prompts]
    arms = {"uncached": ()}
    arms.update({name: [(n, dict(p)) for n, p in registry.technique(name).stack] for name in techniques})
    run_prompts(server, chosen[:1], seed=999, steps=2, model=model)  # warm-up: loads the models
    images, seconds = {}, {}
    for name, stack in arms.items():
        images[name], seconds[name] = run_prompts(server, chosen, steps=steps, optim=stack,
                                                  prefix=f"demo-ref-{model}-{name}", model=model)
    rows = []
    base = images["uncached"].astype(np.float32) / 255
    import torch
    for name in arms:
        imgs = images[name].astype(np.float32) / 255
        rows.append((name, ad.adherence(imgs, chosen)["adherence"], statistics.median(seconds[name]),
                     statistics.median(seconds["uncached"]),
                     psnr(torch.from_numpy(base), torch.from_numpy(imgs), data_range=1.0),
                     ssim(torch.from_numpy(base), torch.from_numpy(imgs))))
    # grid: prompts down, arms across, each image upscaled 2x (nearest) so shapes are visible
    cols = [np.concatenate(list(images[name]), axis=0) for name in arms]
    grid = np.concatenate(cols, axis=1).repeat(2, axis=0).repeat(2, axis=1)
    out_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(out_dir / grid_name(model))
    (out_dir / grid_name(model)).with_suffix(".txt").write_text(
        "columns: " + ", ".join(arms) + "\nrows:\n" + "\n".join(chosen) + "\n")
    return rows


def report(rows, steps: int, prompts: int, model: str = "dit") -> str:
    from bench.reference.graphs import MODELS
    lines = [f"Trained {MODELS[model]['title']}, {prompts} prompts of the fixed set, {steps} steps; "
             "standard loaders + CLIPTextEncode:",
             f"{'graph':22s} {'adherence':>9s} {'wall s':>8s} {'speedup':>8s} {'PSNR dB':>8s} {'SSIM':>7s}"]
    for name, adh, t, t_plain, p, s in rows:
        p = "inf" if p == float("inf") else f"{p:.2f}"
        lines.append(f"{name:22s} {adh:9.3f} {t:8.2f} {t_plain / t:7.2f}x {p:>8s} {s:7.4f}")
    return "\n".join(lines)
