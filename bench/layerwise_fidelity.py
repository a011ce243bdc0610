"""Layerwise 8-bit casting (fp8, and int8 with block scales): fidelity and weight memory of each skip preset against casting
everything and against ComfyUI's built-in fp8 load (`UNETLoader weight_dtype=fp8_e4m3fn/e5m2`,
which stores every weight, norms and biases included, in fp8).

All arms sample the same latent with the same conditioning and seed, in one process. The
reference is the full-precision (fp32) model. The built-in arms go through
`comfy.sd.load_diffusion_model_state_dict` with the fp32 state dict, exactly the path UNETLoader
takes. Reported per arm: latent PSNR and RMS error against the reference (and the RMS error as a
fraction of the built-in e4m3fn load's), decoded-image PSNR/SSIM, the weight bytes ComfyUI
accounts for the model (`ModelPatcher.model_size()`) and the sampling wall time.
"""
from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.runner import RESULTS_DIR, _versions

# (label, storage dtype, skip groups) of our arms; the presets plus one-group ablations
ALL_ARMS = (
    ("cast everything", "float8_e4m3fn", ()),
    ("cast everything, unscaled", "float8_e4m3fn", ()),
    ("cast everything, searched scales", "float8_e4m3fn", ()),
    ("default, unscaled", "float8_e4m3fn", ("norms", "embedders", "modulation", "final")),
    ("norms", "float8_e4m3fn", ("norms",)),
    ("norms+embedders", "float8_e4m3fn", ("norms", "embedders")),
    ("norms+modulation", "float8_e4m3fn", ("norms", "modulation")),
    ("norms+final", "float8_e4m3fn", ("norms", "final")),
    ("norms+embedders+final", "float8_e4m3fn", ("norms", "embedders", "final")),
    ("default", "float8_e4m3fn", ("norms", "embedders", "modulation", "final")),
    ("cast everything e5m2", "float8_e5m2", ()),
    ("default e5m2", "float8_e5m2", ("norms", "embedders", "modulation", "final")),
    ("int8, cast everything", "int8", ()),
    ("int8 default", "int8", ("norms", "embedders", "modulation", "final")),
)
# what a full-size run on a 2-core CPU can afford (each arm is a whole sampling run)
QUICK_ARMS = ("cast everything", "cast everything, unscaled", "cast everything, searched scales",
              "norms+embedders+final", "default", "default e5m2", "int8, cast everything", "int8 default")


@dataclass
class Settings:
    family: str = "sd15"
    size: str = "full"
    steps: int = 6
    cfg: float = 7.0
    width: int = 256
    height: int = 256
    seed: int = 0
    device: str = "cpu"
    all_arms: bool = False


def run(s: Settings, log=print) -> dict:
    from bench import comfy_env
    comfy_env.load_comfyui_in_process(Path(tempfile.mkdtemp(prefix="optim-layerwise-")), s.device)
    import comfy.model_management as mm
    import comfy.sd
    import torch
    from bench import factory
    from optim import layerwise_cast as lc
    from optim.metrics import psnr, ssim

    fam = factory.family(s.family)
    log(f"building {fam.name} ({s.size}) with generated weights ...")
    base = factory.build_model(fam.name, s.size, seed=s.seed)
    vae = factory.build_vae(fam.name, seed=s.seed)
    dm = base.model.diffusion_model
    family = lc.family_of(dm)

    def sample(model):
        t0 = time.perf_counter()
        out = factory.sample(model, fam.name, s.size, steps=s.steps, cfg=s.cfg, seed=s.seed,
                             width=s.width, height=s.height)
        return out, time.perf_counter() - t0

    def decode(latent):
        with torch.inference_mode():
            return vae.decode(latent).float().cpu()

    ref, ref_s = sample(base)
    ref_img = decode(ref)
    rows = []

    def record(label, kind, model, weight_bytes, extra=None):
        out, secs = sample(model)
        rms = float(torch.sqrt(torch.mean((out.double() - ref.double()) ** 2)))
        img = decode(out)
        row = {"arm": label, "kind": kind, "latent_psnr_db": psnr(ref, out), "latent_rms": rms,
               "image_psnr_db": psnr(ref_img, img, data_range=1.0), "image_ssim": ssim(ref_img, img),
               "weight_mb": weight_bytes / 2**20, "sample_s": secs, **(extra or {})}
        rows.append(row)
        log(f"  {label:28s} latent PSNR {row['latent_psnr_db']:6.2f} dB, image PSNR "
            f"{row['image_psnr_db']:6.2f} dB, weights {row['weight_mb']:8.1f} MiB, {secs:.1f} s")

    full_bytes = base.model_size()
    rows.append({"arm": "fp32 (reference)", "kind": "reference", "latent_psnr_db": math.inf, "latent_rms": 0.0,
                 "image_psnr_db": math.inf, "image_ssim": 1.0, "weight_mb": full_bytes / 2**20,
                 "sample_s": ref_s})
    sd = factory.diffusion_state_dict(base)
    for name, dtype in (("fp8_e4m3fn", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)):
        builtin = comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options={"dtype": dtype})
        extra = {"compute_dtype": str(builtin.model.manual_cast_dtype or builtin.model.get_dtype())}
        record(f"ComfyUI {name} load", "builtin", builtin, mm.module_size(builtin.model), extra)
        del builtin
    del sd
    for label, storage, groups in ALL_ARMS:
        if not s.all_arms and label not in QUICK_ARMS:
            continue
        patched = base.clone()
        scaled = "unscaled" not in label
        search = 20 if "searched" in label else 0   # per-channel MSE-optimal scale multipliers
        plan = lc.attach(patched, lc.SkipRules(family=family, groups=groups), lc.STORAGE_DTYPES[storage], None,
                         scaled=scaled, scale_search=search)
        record(label, "ours", patched, patched.model_size(),
               {"storage_dtype": storage, "skip_groups": list(groups), "per_channel_scale": scaled,
                "scale_search": search,
                **plan.summary()})
        del patched
    sample(base)  # leave the base model loaded plainly

    builtin_rms = next(r["latent_rms"] for r in rows if r["arm"] == "ComfyUI fp8_e4m3fn load")
    builtin_mb = next(r["weight_mb"] for r in rows if r["arm"] == "ComfyUI fp8_e4m3fn load")
    for r in rows:
        r["rms_vs_builtin_e4m3fn"] = r["latent_rms"] / builtin_rms if builtin_rms else None
        r["weight_vs_builtin_e4m3fn"] = r["weight_mb"] / builtin_mb
    return {"technique": "layerwise_cast", "family": fam.name, "size": s.size, "steps": s.steps,
            "cfg": s.cfg, "sampler": "euler", "scheduler": "normal", "resolution": [s.width, s.height],
            "device": s.device, "weights": "generated", "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "versions": _versions(), "arms": rows,
            "note": "weight_mb is what ComfyUI accounts for the model (ModelPatcher.model_size()); on a "
                    "CPU the original weights stay in RAM beside the fp8 copies (they are shared with "
                    "the unpatched model)"}


def summary(result: dict) -> str:
    lines = [f"layerwise casting on {result['family']} ({result['size']}, {result['steps']} euler steps, "
             f"{result['resolution'][0]}x{result['resolution'][1]}, {result['device']})",
             f"  {'arm':28s} {'latent PSNR':>11s} {'RMS/builtin':>11s} {'image PSNR':>10s} {'SSIM':>7s} "
             f"{'weights MiB':>11s} {'vs builtin':>10s}"]
    for r in result["arms"]:
        fmt = lambda x: "inf" if math.isinf(x) else f"{x:.2f}"   # noqa: E731
        lines.append(f"  {r['arm']:28s} {fmt(r['latent_psnr_db']):>11s} {r['rms_vs_builtin_e4m3fn']:11.3f} "
                     f"{fmt(r['image_psnr_db']):>10s} {r['image_ssim']:7.4f} {r['weight_mb']:11.1f} "
                     f"{r['weight_vs_builtin_e4m3fn']:10.3f}")
    return "\n".join(lines)


def save(result: dict, out: Path | None = None) -> Path:
    out = out or RESULTS_DIR / f"layerwise_cast-{result['family']}-{result['size']}-{result['device']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return out
