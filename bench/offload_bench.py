"""Group offload benchmark: the same KSampler graph, side by side in one process, with the model
fully resident, with ComfyUI's own low-VRAM mode at a VRAM budget, and with OptimGroupOffload at
the same budgets (with and without the prefetch stream). Also measures host-to-device bandwidth
(pinned and pageable copies) and reports the physical floor max(compute, streamed bytes / pinned
bandwidth) for each budget.

On CUDA the figures are the point. On a CPU (load and offload device both the CPU) the timings
say little; what counts there is that every arm's output is bit-identical to the resident one and
how many bytes each arm moves per step.

    python -m bench offload --model flux --size full --dtype bf16 --device cuda
    python -m bench offload --model sdxl --size bench --dtype fp16 --device cuda
    python -m bench offload --model sd15 --size tiny --steps 4            # CPU: correctness, bytes
"""
from __future__ import annotations

import json
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
LOWVRAM_KEY = "comfyui-optim.bench.lowvram"
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass
class OffloadSettings:
    family: str = "sd15"
    size: str = "tiny"
    dtype: str = "fp32"
    steps: int = 4
    cfg: float | None = None
    width: int = 64
    height: int = 64
    frames: int = 5
    repeats: int = 2
    device: str = "cpu"
    budgets: tuple[float, ...] = (0.25, 0.5)    # fractions of the model's weights
    offload_type: str = "block_level"
    num_blocks_per_group: int = 1


@dataclass
class Arm:
    name: str
    budget_fraction: float | None
    seconds: list[float] = field(default_factory=list)
    peak_vram_mb: float | None = None
    resident_mb: float = 0.0
    bytes_per_step: float = 0.0
    identical: bool | None = None
    psnr_db: float | None = None
    stats: dict | None = None


def _cuda(settings) -> bool:
    return settings.device == "cuda"


def bandwidth_gbs(device: str, mb: int = 256, repeats: int = 5) -> dict:
    """Host-to-device copy bandwidth, pinned and pageable (GB/s). None on a CPU-only run."""
    import torch
    if device != "cuda":
        return {"pinned_h2d_gbs": None, "pageable_h2d_gbs": None}
    n = mb * 2**20
    out = {}
    for kind, pin in (("pinned_h2d_gbs", True), ("pageable_h2d_gbs", False)):
        src = torch.empty(n, dtype=torch.uint8, pin_memory=pin)
        dst = torch.empty(n, dtype=torch.uint8, device="cuda")
        dst.copy_(src, non_blocking=pin)
        torch.cuda.synchronize()
        best = math.inf
        for _ in range(repeats):
            t = time.perf_counter()
            dst.copy_(src, non_blocking=pin)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        out[kind] = n / best / 1e9
    return out


def comfy_lowvram(model, budget_bytes: int):
    """A clone that ComfyUI runs in its own low-VRAM mode with `budget_bytes` of weights loaded:
    after ComfyUI's load, its own partial unload trims the resident layers to the budget, and its
    per-layer cast streams the rest (the same resident set our node starts from)."""
    clone = model.clone()
    clone.calls = 0

    def count(executor, *args, **kwargs):
        clone.calls += 1
        return executor(*args, **kwargs)

    def trim(executor, patcher, *args, **kwargs):
        out = executor(patcher, *args, **kwargs)
        loaded = patcher.loaded_size()
        if loaded > budget_bytes:
            patcher.partially_unload(patcher.offload_device, loaded - budget_bytes)
        return out
    clone.add_wrapper_with_key("prepare_sampling", LOWVRAM_KEY, trim)
    clone.add_wrapper_with_key("apply_model", LOWVRAM_KEY, count)
    return clone


def _psnr(a, b) -> float:
    import torch
    mse = float(torch.mean((a.float() - b.float()) ** 2))
    if mse == 0:
        return math.inf
    peak = float(torch.max(torch.abs(b.float())))
    return 10 * math.log10(peak * peak / mse)


def run(settings: OffloadSettings) -> dict:
    import torch
    from bench import comfy_env, factory
    comfy_env.load_comfyui_in_process(Path(__import__("tempfile").mkdtemp(prefix="optim-offload-")),
                                      device=settings.device)
    import comfy.model_management as mm
    import nodes as comfy_nodes
    dtype = getattr(torch, DTYPES[settings.dtype])
    fam = factory.family(settings.family)
    base = factory.build_model(settings.family, settings.size, dtype=dtype)
    size = base.model_size()
    cfg = settings.cfg if settings.cfg is not None else (1.0 if fam.guidance is not None else 5.0)
    node = comfy_nodes.NODE_CLASS_MAPPINGS["OptimGroupOffload"]

    def sample(model):
        return factory.sample(model, settings.family, settings.size, steps=settings.steps, cfg=cfg,
                              width=settings.width, height=settings.height, frames=settings.frames)

    arms: list[tuple[Arm, object]] = [(Arm("resident", None), base)]
    for frac in settings.budgets:
        budget = int(frac * size)
        arms.append((Arm(f"comfy_lowvram@{frac:.0%}", frac), comfy_lowvram(base, budget)))
        for stream in (False, True):
            m = node.execute(model=base, offload_type=settings.offload_type,
                             num_blocks_per_group=settings.num_blocks_per_group, use_stream=stream,
                             vram_budget_gb=budget / 2**30).result[0]
            arms.append((Arm(f"group_offload@{frac:.0%}{'+stream' if stream else ''}", frac), m))

    sample(base)                          # warm-up, untimed
    reference = None
    for r in range(settings.repeats):
        for arm, model in arms:
            mm.unload_all_models()        # every arm loads from the same state
            mm.soft_empty_cache()
            if _cuda(settings):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            if hasattr(model, "calls"):
                model.calls = 0
            t = time.perf_counter()
            out = sample(model)
            if _cuda(settings):
                torch.cuda.synchronize()
            arm.seconds.append(time.perf_counter() - t)
            if _cuda(settings):
                arm.peak_vram_mb = torch.cuda.max_memory_allocated() / 2**20
            arm.resident_mb = model.loaded_size() / 2**20
            if arm.name == "resident":
                reference = out
            arm.identical = bool(torch.equal(out, reference))
            arm.psnr_db = _psnr(out, reference)
            from bench.runner import technique_stats
            stats = technique_stats(model).get("comfyui-optim.group_offload")
            if stats is not None:
                arm.stats = stats
                arm.bytes_per_step = stats["bytes_moved"] / settings.steps
            elif arm.budget_fraction is not None:
                # ComfyUI's low-VRAM cast copies every layer it left off the device at each call
                arm.bytes_per_step = (size - model.loaded_size()) * model.calls / settings.steps
    bw = bandwidth_gbs(settings.device)
    resident = next(a for a, _ in arms if a.name == "resident")
    compute_s = statistics.median(resident.seconds) / settings.steps
    rows = []
    for arm, _ in arms:
        per_step = statistics.median(arm.seconds) / settings.steps
        floor = None
        if bw["pinned_h2d_gbs"]:
            floor = max(compute_s, arm.bytes_per_step / (bw["pinned_h2d_gbs"] * 1e9))
        rows.append({**asdict(arm), "s_per_step": per_step,
                     "vs_resident": per_step / compute_s,
                     "floor_s_per_step": floor,
                     "vs_floor": per_step / floor if floor else None,
                     "achieved_h2d_gbs": (arm.bytes_per_step / per_step / 1e9) if arm.bytes_per_step else None})
    device_name = torch.cuda.get_device_name() if _cuda(settings) else platform.processor() or "cpu"
    return {"settings": {**asdict(settings), "budgets": list(settings.budgets)}, "device": device_name,
            "model_mb": size / 2**20, "bandwidth": bw, "compute_s_per_step": compute_s, "arms": rows}


def summary(result: dict) -> str:
    s = result["settings"]
    lines = [f"group offload, {s['family']} {s['size']} {s['dtype']} on {result['device']}: model "
             f"{result['model_mb']:.0f} MB, {s['steps']} steps",
             f"H2D bandwidth: pinned {result['bandwidth']['pinned_h2d_gbs'] or 'n/a'} GB/s, pageable "
             f"{result['bandwidth']['pageable_h2d_gbs'] or 'n/a'} GB/s",
             f"{'arm':28s} {'s/step':>8s} {'x res.':>7s} {'x floor':>7s} {'MB/step':>9s} {'GB/s':>6s} "
             f"{'peak MB':>8s} {'resid. MB':>9s} identical"]
    for r in result["arms"]:
        lines.append(f"{r['name']:28s} {r['s_per_step']:8.3f} {r['vs_resident']:7.2f} "
                     f"{(r['vs_floor'] or float('nan')):7.2f} {r['bytes_per_step'] / 2**20:9.1f} "
                     f"{(r['achieved_h2d_gbs'] or 0):6.2f} {(r['peak_vram_mb'] or float('nan')):8.0f} "
                     f"{r['resident_mb']:9.1f} {r['identical']}")
    if result["bandwidth"]["pinned_h2d_gbs"] is None:
        lines.append("CPU run: load and offload device are the same, so timings say nothing about offload; "
                     "comfy_lowvram MB/step is what its per-layer cast would copy on a GPU (computed: on a CPU "
                     "it copies nothing), group_offload MB/step is counted copies")
    return "\n".join(lines)


def save(result: dict, out: Path | None = None) -> Path:
    s = result["settings"]
    out = out or RESULTS_DIR / f"offload-{s['family']}-{s['size']}-{s['dtype']}-{s['device']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    return out
