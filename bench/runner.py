"""Run one graph with and without a technique in one process, alternating repeats, and measure.

The graph is ComfyUI's KSampler then VAE Decode on a factory model. Both arms share the base
model; the optimized arm gets it through the technique's node, exactly as a user's graph would.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
COUNTER_KEY = "comfyui-optim.bench.count"


@dataclass
class RunSettings:
    technique: str
    family: str = "sd15"
    size: str = "bench"
    steps: int = 20
    cfg: float | None = None       # None: the family's usual value
    sampler: str = "euler"
    scheduler: str = "normal"
    width: int | None = None       # None: a size that keeps a CPU run short
    height: int | None = None
    frames: int = 9
    batch: int = 1
    seed: int = 0
    repeats: int = 3
    device: str = "cpu"
    count_flops: bool = True      # one extra untimed run per arm under torch's FLOP counter
    params: dict = field(default_factory=dict)

    def resolved(self):
        from bench import factory
        fam = factory.family(self.family)
        guidance_distilled = fam.guidance is not None
        cfg = self.cfg if self.cfg is not None else (1.0 if guidance_distilled else 7.0)
        default_px = 256 if fam.name in ("sd15", "sdxl") else (64 if fam.video else 128)
        return cfg, self.width or default_px, self.height or default_px


def _count_calls(model, counter: list):
    """A clone of `model` whose every diffusion model call increments counter[0]."""
    counted = model.clone()

    def count(executor, *args, **kwargs):
        counter[0] += 1
        return executor(*args, **kwargs)

    counted.add_wrapper_with_key("apply_model", COUNTER_KEY, count)
    return counted


def technique_stats(model) -> dict:
    """What each technique's controller reported for its last run (found through the wrappers it
    installed: bound methods of the controller)."""
    out = {}
    for keyed in model.wrappers.values():
        for key, fns in keyed.items():
            for fn in fns:
                stats = getattr(getattr(fn, "__self__", None), "last_stats", None)
                if stats is not None:
                    out[key] = stats
    return out


def count_flops(fn) -> int:
    """FLOPs of matrix products, convolutions and attention that `fn()` runs."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _versions() -> dict:
    import torch
    info = {"torch": torch.__version__, "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "machine": platform.machine()}
    try:
        import comfyui_version
        info["comfyui"] = comfyui_version.__version__
    except ImportError:
        info["comfyui"] = "unknown"
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run(settings: RunSettings, log=print) -> dict:
    from bench import comfy_env
    comfy_env.load_comfyui_in_process(Path(tempfile.mkdtemp(prefix="optim-bench-")), settings.device)
    import torch
    from bench import factory, techniques
    from bench.memory import PeakMemory
    from optim.metrics import psnr, ssim

    tech = techniques.technique(settings.technique)
    fam = factory.family(settings.family)
    if tech.families is not None and fam.name not in tech.families:
        raise ValueError(f"{tech.name} does not apply to {fam.name} (supports: {', '.join(tech.families)})")
    cfg, width, height = settings.resolved()

    log(f"building {fam.name} ({settings.size}) with generated weights ...")
    base = factory.build_model(fam.name, settings.size, seed=settings.seed)
    vae = factory.build_vae(fam.name, seed=settings.seed)
    arms = {"baseline": base, "optimized": tech.apply(base, settings.params)}
    counters = {name: [0] for name in arms}
    models = {name: _count_calls(m, counters[name]) for name, m in arms.items()}

    def sample(model, steps):
        return factory.sample(model, fam.name, settings.size, steps=steps, cfg=cfg,
                              sampler=settings.sampler, scheduler=settings.scheduler,
                              seed=settings.seed, width=width, height=height,
                              frames=settings.frames, batch=settings.batch)

    log("warm-up ...")
    for model in models.values():
        sample(model, 2)

    times = {name: [] for name in arms}
    peaks = {name: [] for name in arms}
    calls = {name: 0 for name in arms}
    latents = {}
    for r in range(settings.repeats):
        order = list(arms) if r % 2 == 0 else list(reversed(arms))  # alternate to cancel drift
        for name in order:
            counters[name][0] = 0
            with PeakMemory(settings.device) as mem:
                t0 = time.perf_counter()
                latents[name] = sample(models[name], settings.steps)
                if settings.device == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
            peaks[name].append(mem.peak_mb)
            calls[name] = counters[name][0]
            log(f"  repeat {r + 1}/{settings.repeats} {name:9s} {times[name][-1]:.3f} s, "
                f"{calls[name]} model calls")

    with torch.inference_mode():
        images = {name: vae.decode(lat).float().cpu() for name, lat in latents.items()}
    stats = technique_stats(arms["optimized"])  # before the FLOP-counting runs overwrite them
    flops = {}
    if settings.count_flops:
        log("counting FLOPs (one untimed run per arm) ...")
        flops = {name: count_flops(lambda m=models[name]: sample(m, settings.steps)) for name in arms}
    med = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "technique": tech.name, "family": fam.name, "size": settings.size,
        "steps": settings.steps, "cfg": cfg, "sampler": settings.sampler,
        "scheduler": settings.scheduler, "resolution": [width, height],
        "frames": settings.frames if fam.video else 1, "batch": settings.batch,
        "repeats": settings.repeats, "device": settings.device, "params": settings.params,
        "weights": "generated", "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "versions": _versions(),
        "baseline": {"median_s": med["baseline"], "times_s": times["baseline"],
                     "model_calls": calls["baseline"], "peak_mem_mb": max(peaks["baseline"])},
        "optimized": {"median_s": med["optimized"], "times_s": times["optimized"],
                      "model_calls": calls["optimized"], "peak_mem_mb": max(peaks["optimized"])},
        "speedup": med["baseline"] / med["optimized"],
        "model_calls_skipped": calls["baseline"] - calls["optimized"],
        "flops": flops,
        "flops_ratio": (flops["baseline"] / flops["optimized"]) if flops.get("optimized") else None,
        "technique_stats": stats,
        "psnr_latent_db": psnr(latents["baseline"].float(), latents["optimized"].float()),
        "psnr_image_db": psnr(images["baseline"], images["optimized"], data_range=1.0),
        "ssim_image": ssim(images["baseline"], images["optimized"]),
    }
    return result


def fmt_db(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.2f}"


def summary(result: dict) -> str:
    b, o = result["baseline"], result["optimized"]
    return "\n".join([
        f"{result['technique']} on {result['family']} ({result['size']}, {result['steps']} steps, "
        f"cfg {result['cfg']}, {result['sampler']}, {result['resolution'][0]}x{result['resolution'][1]}, "
        f"{result['device']})",
        f"  sampling wall time (median of {result['repeats']}): baseline {b['median_s']:.3f} s, "
        f"optimized {o['median_s']:.3f} s  ->  speedup {result['speedup']:.3f}x",
        f"  model calls: baseline {b['model_calls']}, optimized {o['model_calls']} "
        f"(skipped {result['model_calls_skipped']})",
        *([f"  FLOPs (matmul/conv/attention): baseline {result['flops']['baseline'] / 1e12:.2f} T, "
           f"optimized {result['flops']['optimized'] / 1e12:.2f} T  ->  {result['flops_ratio']:.2f}x fewer"]
          if result.get("flops") else []),
        *[f"  {key}: {json.dumps(value)}" for key, value in result.get("technique_stats", {}).items()],
        f"  fidelity vs baseline: latent PSNR {fmt_db(result['psnr_latent_db'])} dB, image PSNR "
        f"{fmt_db(result['psnr_image_db'])} dB, image SSIM {result['ssim_image']:.4f}",
        f"  peak memory above start ({'CUDA allocated' if result['device'] == 'cuda' else 'process RSS'}): "
        f"baseline {b['peak_mem_mb']:.1f} MiB, optimized {o['peak_mem_mb']:.1f} MiB",
        f"  torch {result['versions']['torch']}, ComfyUI {result['versions']['comfyui']}",
    ])


def save(result: dict, out: Path | None = None) -> Path:
    if out is None:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        out = RESULTS_DIR / (f"{result['technique']}-{result['family']}-{result['size']}-"
                             f"{result['device']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out
