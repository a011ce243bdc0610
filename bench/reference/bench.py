"""Caching techniques on the trained reference models: speed, prompt adherence, PSNR and SSIM.

    python -m bench reference [techniques ...] [--model dit|unet] [--prompts 24] [--steps 20] [--repeats 1]

One process. The shipped models are loaded once through the standard loader nodes (see
`bench.reference.graphs.InProcess`); each technique is applied through the pack's node exactly as
a graph does (`bench.techniques`). For every prompt of the first `--prompts` of the fixed set, the
uncached graph and each technique's graph sample the same seed; the report gives per arm: median
sampling wall time per prompt and the speedup against uncached, diffusion-model calls, prompt
adherence, and PSNR / SSIM of the decoded images against the uncached ones. The weights are
trained, so unlike the factory's generated-weight models, adherence says whether a technique's
change to the output matters.
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.comfy_env import REPO_ROOT

# the reference DiT has 2 blocks: the DiT cache variants that keep the first block cached
DEFAULT_TECHNIQUES = ("noop", "ditcache_wide", "ditcache_adaptive_wide", "easycache", "lazycache")
# the reference UNet (SD1.5 layout): DeepCache, T-GATE and both stacked
UNET_TECHNIQUES = ("noop", "deepcache3", "deepcache5", "tgate", "tgate_deepcache3")
RESULTS_DIR = REPO_ROOT / "bench" / "results" / "reference"  # outside the run tables
RESULTS = RESULTS_DIR / "techniques.json"


def default_techniques(model: str) -> tuple[str, ...]:
    return UNET_TECHNIQUES if model == "unet" else DEFAULT_TECHNIQUES


def results_path(model: str) -> Path:
    return RESULTS if model == "dit" else RESULTS_DIR / f"techniques-{model}.json"


def run(technique_names=DEFAULT_TECHNIQUES, prompts: int = 24, steps: int = 20, repeats: int = 1,
        threads: int = 1, log=print, model: str = "dit", grid_path: Path | None = None,
        grid_prompts: int = 8) -> dict:
    from bench import comfy_env
    comfy_env.load_comfyui_in_process(Path(tempfile.mkdtemp(prefix="optim-ref-bench-")))
    import torch
    if threads:
        # a model this small gains nothing from a second thread, and on a shared CPU OpenMP's
        # threads waiting on each other made every call 20x slower here
        torch.set_num_threads(threads)

    from bench import techniques
    from bench.reference import adherence as ad
    from bench.reference import dataset as ds
    from bench.reference import graphs
    from bench.runner import _count_calls, technique_stats
    from optim.metrics import psnr, ssim

    ref = graphs.InProcess(model)
    spec = graphs.MODELS[model]
    arms = {"uncached": ref.model}
    for name in technique_names:
        tech = techniques.technique(name)
        if tech.families is not None and spec["family"] not in tech.families:
            raise ValueError(f"{name} does not apply to the {spec['title']}")
        arms[name] = tech.apply(ref.model)
    counters = {name: [0] for name in arms}
    models = {name: _count_calls(m, counters[name]) for name, m in arms.items()}
    chosen = ds.PROMPTS[:prompts]
    for p in chosen:  # text encoding is shared by every arm: keep it out of the timings
        ref.encode(p)
    ref.encode("")
    ref.sample(chosen[0], steps=2)  # warm-up
    images = {name: [] for name in arms}
    stats = {name: [] for name in arms}
    times = {name: [] for name in arms}
    calls = {name: [] for name in arms}
    for i, prompt in enumerate(chosen):
        order = list(arms) if i % 2 == 0 else list(reversed(arms))  # alternate to cancel drift
        for name in order:
            best = None
            for _ in range(repeats):
                counters[name][0] = 0
                t0 = time.perf_counter()
                img = ref.sample(prompt, seed=i, steps=steps, model=models[name])
                dt = time.perf_counter() - t0
                best = dt if best is None else min(best, dt)
            times[name].append(best)
            calls[name].append(counters[name][0])
            stats[name].append(technique_stats(arms[name]))
            images[name].append(img[0].float())
        log(f"  prompt {i + 1}/{len(chosen)}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in arms))
    if grid_path is not None:  # rows: the first prompts; columns: the arms; 2x nearest upscale
        from PIL import Image
        rows = min(grid_prompts, len(chosen))
        cols = [torch.cat([images[name][r] for r in range(rows)], dim=0) for name in arms]
        grid = (torch.cat(cols, dim=1).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        grid_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid.repeat(2, axis=0).repeat(2, axis=1)).save(grid_path)
        log(f"grid (rows: first {rows} prompts; columns: {', '.join(arms)}): {grid_path}")
    base_t = statistics.median(times["uncached"])
    result = {"model": spec["title"], "prompts": len(chosen), "steps": steps, "torch_threads": torch.get_num_threads(), "cfg": graphs.CFG, "sampler": graphs.SAMPLER,
              "scheduler": graphs.SCHEDULER, "weights": "trained (bench/reference/weights)",
              "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "grid": str(grid_path.relative_to(REPO_ROOT)) if grid_path and grid_path.is_relative_to(REPO_ROOT)
              else (str(grid_path) if grid_path else None), "arms": {}}
    for name in arms:
        imgs = torch.stack(images[name])
        base = torch.stack(images["uncached"])
        adh = ad.adherence([im.numpy() for im in imgs], chosen)
        med = statistics.median(times[name])
        result["arms"][name] = {
            "median_s": med, "speedup": base_t / med, "model_calls": float(np.mean(calls[name])),
            "adherence": adh["adherence"], "per_attribute": adh["per_attribute"],
            "psnr_db": psnr(base, imgs, data_range=1.0), "ssim": ssim(base, imgs),
            "technique_stats_last_prompt": stats[name][-1],
            "description": techniques.technique(name).description if name != "uncached" else "plain graph",
        }
    return result


def summary(result: dict) -> str:
    title = result.get("model", "reference DiT (SD3 MMDiT)")
    note = ("a 1.3M-parameter model: per-call Python overhead dominates CPU wall time, so speedups here "
            "say little; adherence and fidelity are the point") if "DiT" in title else \
        "a 44M-parameter 320-channel SD1.5 UNet, trained"
    lines = [f"{title}, trained, {result['prompts']} prompts, {result['steps']} steps, "
             f"cfg {result['cfg']} ({note})",
             f"{'arm':22s} {'speedup':>8s} {'calls':>6s} {'adherence':>9s} {'PSNR dB':>8s} {'SSIM':>6s}"]
    for name, a in result["arms"].items():
        p = "inf" if a["psnr_db"] == float("inf") else f"{a['psnr_db']:.2f}"
        lines.append(f"{name:22s} {a['speedup']:7.2f}x {a['model_calls']:6.1f} {a['adherence']:9.3f} "
                     f"{p:>8s} {a['ssim']:6.3f}")
        for key, value in a.get("technique_stats_last_prompt", {}).items():
            lines.append(f"    {key}: {json.dumps(value)[:200]}")
    return "\n".join(lines)


def save(result: dict, out: Path | None = None, model: str = "dit") -> Path:
    out = out or results_path(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out
