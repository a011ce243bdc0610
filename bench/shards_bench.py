"""Peak RAM of loading a diffusion model shard by shard (OptimLoadShardedModel) against ComfyUI's
whole-file load (UNETLoader's `comfy.sd.load_diffusion_model`) of the same weights.

Each arm runs in a fresh process (a process's RSS high-water mark cannot be reset), which samples
its RSS in a thread during the load and reports the peak above its level before the load (ComfyUI
imported, nothing loaded). Both arms must produce the same weights (a digest of the state dict)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class ShardSettings:
    family: str = "sd3"
    size: str = "bench"
    dtype: str = "fp16"
    shards: int = 8          # max_shard_size = model bytes / shards


def _digest(sd) -> str:
    h = hashlib.blake2b(digest_size=16)
    for k in sorted(sd):
        t = sd[k].detach().contiguous().cpu()
        h.update(k.encode())
        h.update(t.view(-1).view(__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


def _arm(kind: str, path: str) -> dict:
    """In a child process: load once, report peak RSS above the start and the weights' digest."""
    from bench import comfy_env
    comfy_env.load_comfyui_in_process(Path(tempfile.mkdtemp(prefix="optim-shards-")))
    import torch
    torch.set_num_threads(1)
    from bench.memory import PeakMemory
    from optim import sharded
    t0 = time.perf_counter()
    with PeakMemory("cpu", interval_s=0.002) as peak:
        if kind == "sharded":
            model = sharded.load_sharded(Path(path))
        else:
            import comfy.sd
            model = comfy.sd.load_diffusion_model(path)
    seconds = time.perf_counter() - t0
    sd = model.model.diffusion_model.state_dict()
    weights = sum(t.nelement() * t.element_size() for t in sd.values())
    return {"arm": kind, "peak_rss_mb": round(peak.peak_mb, 1), "model_mb": round(weights / 2**20, 1),
            "seconds": round(seconds, 2), "digest": _digest(sd)}


def run(s: ShardSettings) -> dict:
    import torch
    from bench import comfy_env, factory
    comfy_env.load_comfyui_in_process(Path(tempfile.mkdtemp(prefix="optim-shards-")))
    import safetensors.torch
    from optim import sharded
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[s.dtype]
    base = factory.build_model(s.family, s.size, dtype=dtype, calibrate=False)
    key_map = sharded.diffusers_key_map(base.model)
    state = base.model.diffusion_model.state_dict()
    total = sum(t.nelement() * t.element_size() for t in state.values())
    work = Path(tempfile.mkdtemp(prefix="optim-shards-"))
    files = sharded.save_sharded(state, work / "sharded", max(total // s.shards, 1 << 20), key_map)
    whole = work / "whole.safetensors"
    merged = {}
    for f in files[:-1]:
        merged.update(safetensors.torch.load_file(str(f)))
    safetensors.torch.save_file(merged, str(whole))
    del merged, base, state
    shard_sizes = [f.stat().st_size for f in files[:-1]]
    arms = {}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for kind, path in (("sharded", work / "sharded"), ("whole_file", whole)):
        out = subprocess.run([sys.executable, "-m", "bench.shards_bench", kind, str(path)], capture_output=True,
                             text=True, env=env, cwd=str(Path(__file__).resolve().parent.parent), check=False)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        if out.returncode != 0 or not line:
            raise RuntimeError(f"{kind} arm failed:\n{out.stderr[-3000:]}")
        arms[kind] = json.loads(line[-1])
    for f in work.rglob("*"):
        if f.is_file():
            f.unlink()
    return {"settings": asdict(s), "model_file_mb": round(whole.stat().st_size / 2**20, 1) if whole.exists() else None,
            "weights_mb": round(total / 2**20, 1), "shards": len(shard_sizes),
            "largest_shard_mb": round(max(shard_sizes) / 2**20, 1), "arms": arms,
            "same_weights": arms["sharded"]["digest"] == arms["whole_file"]["digest"]}


def summary(r: dict) -> str:
    a, w = r["arms"]["sharded"], r["arms"]["whole_file"]
    return "\n".join([
        f"{r['settings']['family']} {r['settings']['size']} {r['settings']['dtype']}: weights {r['weights_mb']} MB, "
        f"{r['shards']} shards (largest {r['largest_shard_mb']} MB)",
        f"  sharded load:     peak RSS +{a['peak_rss_mb']} MB  ({a['seconds']} s)",
        f"  whole-file load:  peak RSS +{w['peak_rss_mb']} MB  ({w['seconds']} s)",
        f"  same weights: {r['same_weights']}; sharded peak = model + {a['peak_rss_mb'] - a['model_mb']:.1f} MB, "
        f"whole-file peak = model + {w['peak_rss_mb'] - w['model_mb']:.1f} MB"])


def save(r: dict, out: Path | None = None) -> Path:
    s = r["settings"]
    out = out or RESULTS / f"shards-{s['family']}-{s['size']}-{s['dtype']}-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=2))
    return out


if __name__ == "__main__":
    print(json.dumps(_arm(sys.argv[1], sys.argv[2])))
