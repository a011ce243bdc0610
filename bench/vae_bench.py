"""OptimVAE against ComfyUI's VAE Decode (untiled) and VAE Decode (Tiled) / VAE Encode (Tiled) at
the same tile size, in one process, alternating repeats.

Model: the SD1.x/SD2.x/SDXL VAE architecture at its real size (AutoencoderKL, ch 128, ch_mult
1-2-4-4, 83M parameters, mid-block attention) with generated weights, loaded through ComfyUI's
`VAE` class as VAELoader would. Input: a smooth synthetic image (so seams would show), encoded
untiled. Reported: wall time (median), speedup over the tiled built-in, PSNR/SSIM against the
untiled result, the worst column/row jump in the error (a seam measure) and the process's peak
memory above the start (RSS on a CPU; CUDA allocated bytes on a GPU) against untiled decode,
also for a bigger image and a video latent (Wan 2.1 VAE, spatial tiles, every frame per tile).
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.runner import RESULTS_DIR, _versions

SD_VAE_CONFIG = {'double_z': True, 'z_channels': 4, 'resolution': 256, 'in_channels': 3, 'out_ch': 3,
                 'ch': 128, 'ch_mult': [1, 2, 4, 4], 'num_res_blocks': 2, 'attn_resolutions': [],
                 'dropout': 0.0}


@dataclass
class Settings:
    size: int = 512             # image side for the speed and fidelity comparison
    tile: int = 256             # tile size in pixels for both tilers
    overlap: int = 64
    repeats: int = 2
    memory_size: int = 1024     # image side for the peak-memory comparison (0: skip)
    video: bool = True
    device: str = "cpu"
    speed: bool = True          # the speed / fidelity comparison at `size`
    video_frames: int = 13      # latent frames of the video run (13 -> 49 frames)
    video_side: int = 24        # latent cells per side of the video run (24 -> 192x192 pixels)
    video_tile: int = 128       # OptimVAE tile size (pixels) in the video run
    video_chunk: int = 1        # OptimVAE temporal_chunk (latent frames) in the video run


def build_sd_vae(seed: int = 0):
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from bench import factory
    model = AutoencoderKL(ddconfig=dict(SD_VAE_CONFIG), embed_dim=4)
    sd = factory.fill_module(model, seed).state_dict()
    return comfy.sd.VAE(sd=sd)


def smooth_image(h: int, w: int):
    import torch
    y, x = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    img = torch.stack([0.5 + 0.4 * torch.sin(3 * x + 1), 0.5 + 0.4 * torch.cos(2 * y), (x + y) / 2], -1)
    return img[None]


def worst_jump(out, ref) -> float:
    """Largest mean absolute step, between neighbouring rows or columns, of the error image."""
    d = (out - ref).float()
    return max(float(d.diff(dim=-3).abs().mean(dim=(0, -2, -1)).max()),
               float(d.diff(dim=-2).abs().mean(dim=(0, -3, -1)).max()))


def run(s: Settings, log=print) -> dict:
    from bench import comfy_env
    comfy_env.load_comfyui_in_process(Path(tempfile.mkdtemp(prefix="optim-vae-")), s.device)
    import torch
    with torch.inference_mode():   # as ComfyUI runs every node
        return _run(s, log)


def _run(s: Settings, log) -> dict:
    import nodes
    import torch
    from bench.memory import PeakMemory
    from optim.metrics import psnr, ssim

    optim_node = nodes.NODE_CLASS_MAPPINGS["OptimVAE"]
    decode_node = nodes.NODE_CLASS_MAPPINGS["VAEDecode"]()

    log("building the SD VAE (real size, generated weights) ...")
    vae = build_sd_vae()
    ours = optim_node.execute(vae=vae, tiling="always", tile_size=s.tile, overlap=s.overlap, slice_size=0,
                              vram_budget_gb=0.0).result[0]

    def timed(fn):
        with PeakMemory(s.device) as mem:
            t0 = time.perf_counter()
            out = fn()
            secs = time.perf_counter() - t0
        return out, secs, mem.peak_mb

    def compare(arms: dict, kind: str, reference: str, image: bool) -> dict:
        times = {k: [] for k in arms}
        outs, peaks = {}, {k: [] for k in arms}
        for r in range(s.repeats):
            for name in (list(arms) if r % 2 == 0 else list(reversed(arms))):
                outs[name], secs, peak = timed(arms[name])
                times[name].append(secs)
                peaks[name].append(peak)
                log(f"  {kind} {name:28s} {secs:7.2f} s, peak +{peak:.0f} MiB")
        ref = outs[reference]
        rows = {}
        for name in arms:
            row = {"median_s": statistics.median(times[name]), "times_s": times[name],
                   "peak_mem_mb": max(peaks[name])}
            if name != reference:
                row["psnr_db"] = psnr(ref, outs[name], data_range=1.0 if image else None)
                if image:
                    row["ssim"] = ssim(ref, outs[name])
                    row["worst_error_jump"] = worst_jump(outs[name], ref)
            rows[name] = row
        return rows

    result = {
        "technique": "vae_tiling", "model": "SD VAE (AutoencoderKL, real size)", "device": s.device,
        "resolution": [s.size, s.size], "tile_size": s.tile, "overlap": s.overlap, "repeats": s.repeats,
        "weights": "generated", "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"), "versions": _versions(),
        "threads": torch.get_num_threads(),
    }
    if s.speed:
        result.update(_speed(s, log, vae, ours, compare))
    if s.memory_size:
        result["memory"] = _memory(s, log, vae, ours, timed, decode_node)
    if s.video:
        result["video"] = _video(s, log, optim_node, timed, decode_node)
    return result


def _speed(s: Settings, log, vae, ours, compare) -> dict:
    import nodes
    decode_tiled_node = nodes.NODE_CLASS_MAPPINGS["VAEDecodeTiled"]()
    encode_tiled_node = nodes.NODE_CLASS_MAPPINGS["VAEEncodeTiled"]()
    decode_node = nodes.NODE_CLASS_MAPPINGS["VAEDecode"]()
    encode_node = nodes.NODE_CLASS_MAPPINGS["VAEEncode"]()
    img = smooth_image(s.size, s.size)
    latent = {"samples": vae.encode(img)}
    tiled_kw = dict(tile_size=s.tile, overlap=s.overlap, temporal_size=64, temporal_overlap=8)
    log(f"decode {s.size}x{s.size}, tile {s.tile} / overlap {s.overlap} ...")
    decode = compare({
        "untiled (VAEDecode)": lambda: decode_node.decode(vae, latent)[0],
        "ComfyUI VAEDecodeTiled": lambda: decode_tiled_node.decode(vae, latent, **tiled_kw)[0],
        "OptimVAE": lambda: decode_node.decode(ours, latent)[0],
    }, "decode", "untiled (VAEDecode)", image=True)
    log("encode ...")
    encode = compare({
        "untiled (VAEEncode)": lambda: encode_node.encode(vae, img)[0]["samples"],
        "ComfyUI VAEEncodeTiled": lambda: encode_tiled_node.encode(vae, img, **tiled_kw)[0]["samples"],
        "OptimVAE": lambda: encode_node.encode(ours, img)[0]["samples"],
    }, "encode", "untiled (VAEEncode)", image=False)
    return {
        "decode": decode, "encode": encode,
        "decode_speedup_vs_builtin_tiled": decode["ComfyUI VAEDecodeTiled"]["median_s"] / decode["OptimVAE"]["median_s"],
        "encode_speedup_vs_builtin_tiled": encode["ComfyUI VAEEncodeTiled"]["median_s"] / encode["OptimVAE"]["median_s"],
    }


def _memory(s: Settings, log, vae, ours, timed, decode_node) -> dict:
    import torch
    log(f"peak memory, decode {s.memory_size}x{s.memory_size} (tile {s.tile} / overlap {s.overlap}) ...")
    big = {"samples": torch.randn(1, 4, s.memory_size // 8, s.memory_size // 8,
                                  generator=torch.Generator().manual_seed(0))}
    decode_node.decode(vae, {"samples": big["samples"][..., :8, :8]})   # warm-up: load, lazy inits
    mem, outs = {}, {}
    for name, fn in (("untiled (VAEDecode)", lambda: decode_node.decode(vae, big)[0]),
                     ("OptimVAE", lambda: decode_node.decode(ours, big)[0])):
        outs[name], secs, peak = timed(fn)
        mem[name] = {"seconds": secs, "peak_mem_mb": peak}
        log(f"  {name:28s} {secs:7.2f} s, peak +{peak:.0f} MiB")
    output_mb = outs["untiled (VAEDecode)"].numel() * 4 / 2**20
    return {"resolution": [s.memory_size, s.memory_size], "tile_size": s.tile, "overlap": s.overlap,
            "output_mb": output_mb, **mem,
            "peak_ratio": mem["OptimVAE"]["peak_mem_mb"] / max(mem["untiled (VAEDecode)"]["peak_mem_mb"], 1e-9)}


def _video(s: Settings, log, optim_node, timed, decode_node) -> dict:
    """Wan 2.1 VAE (real size): ComfyUI's VAE Decode against OptimVAE with temporal chunks (no spatial
    tiles), spatial tiles (all frames per tile) and both."""
    import torch
    from bench import factory
    from optim.metrics import psnr
    frames_out = 4 * s.video_frames - 3
    px = s.video_side * 8
    log(f"peak memory, video latent (Wan 2.1 VAE, 1x16x{s.video_frames}x{s.video_side}x{s.video_side} -> "
        f"{frames_out} frames of {px}x{px}) ...")
    wan = factory.build_vae("wan21")

    def ours(**kw):
        args = dict(tiling="always", tile_size=s.video_tile, overlap=s.video_tile // 4, slice_size=0,
                    vram_budget_gb=0.0)
        args.update(kw)
        return optim_node.execute(vae=wan, **args).result[0]
    z = {"samples": torch.randn(1, 16, s.video_frames, s.video_side, s.video_side,
                                generator=torch.Generator().manual_seed(0)) * 0.5}
    arms = {
        "untiled (VAEDecode)": wan,
        f"OptimVAE temporal_chunk {s.video_chunk}": ours(tiling="off", temporal_chunk=s.video_chunk),
        f"OptimVAE tile {s.video_tile}": ours(),
        f"OptimVAE tile {s.video_tile} + temporal_chunk {s.video_chunk}": ours(temporal_chunk=s.video_chunk),
    }
    decode_node.decode(wan, {"samples": z["samples"][:, :, :2, :4, :4]})   # warm-up: load, lazy inits
    vid, outs = {}, {}
    for name, v in arms.items():
        outs[name], secs, peak = timed(lambda v=v: decode_node.decode(v, z)[0])
        vid[name] = {"seconds": secs, "peak_mem_mb": peak}
        log(f"  {name:46s} {secs:7.2f} s, peak +{peak:.0f} MiB")
    ref = outs["untiled (VAEDecode)"]
    for name in list(arms)[1:]:
        vid[name]["psnr_db"] = psnr(ref, outs[name], data_range=1.0)
        vid[name]["max_abs_diff"] = float((outs[name] - ref).abs().max())
    tiled_names = list(arms)[2:]
    return {"chunked_tiles_equal_unchunked_tiles": bool(torch.equal(outs[tiled_names[0]], outs[tiled_names[1]])),"latent": list(z["samples"].shape), "frames": int(ref.shape[0]), "resolution": [px, px],
            "tile_size": s.video_tile, "temporal_chunk": s.video_chunk, "output_mb": ref.numel() * 4 / 2**20,
            "arms": vid}


def summary(r: dict) -> str:
    lines = [f"OptimVAE vs ComfyUI on the SD VAE ({r['device']}, {r.get('threads', '?')} threads)"]
    if "decode" in r:
        lines.append(f"  {r['resolution'][0]}x{r['resolution'][1]}, tile {r['tile_size']} / overlap {r['overlap']}:")
        for kind in ("decode", "encode"):
            for name, row in r[kind].items():
                extra = ""
                if "psnr_db" in row:
                    extra = f", PSNR {row['psnr_db']:.2f} dB" + (f", SSIM {row['ssim']:.4f}, worst jump "
                                                                f"{row['worst_error_jump']:.4f}" if "ssim" in row else "")
                lines.append(f"  {kind} {name:26s} {row['median_s']:7.2f} s, peak +{row['peak_mem_mb']:.0f} MiB{extra}")
        lines.append(f"  decode speedup vs VAEDecodeTiled: {r['decode_speedup_vs_builtin_tiled']:.2f}x; "
                     f"encode vs VAEEncodeTiled: {r['encode_speedup_vs_builtin_tiled']:.2f}x")
    if "memory" in r:
        m = r["memory"]
        lines.append(f"  peak memory at {m['resolution'][0]}x{m['resolution'][1]} (tile {m.get('tile_size')}): untiled "
                     f"+{m['untiled (VAEDecode)']['peak_mem_mb']:.0f} MiB, OptimVAE +{m['OptimVAE']['peak_mem_mb']:.0f} "
                     f"MiB ({m['peak_ratio']:.2f}x; the output itself is {m.get('output_mb', 0):.0f} MiB)")
    if "video" in r:
        v = r["video"]
        lines.append(f"  video, Wan 2.1 VAE, latent {v['latent']} -> {v['frames']} frames of "
                     f"{v['resolution'][0]}x{v['resolution'][1]} (output {v['output_mb']:.0f} MiB):")
        for name, row in v["arms"].items():
            extra = f", PSNR {row['psnr_db']:.2f} dB, max |diff| {row['max_abs_diff']:.2e}" if "psnr_db" in row else ""
            lines.append(f"    {name:46s} {row['seconds']:7.2f} s, peak +{row['peak_mem_mb']:.0f} MiB{extra}")
        lines.append(f"    tiles + temporal chunks bit-identical to tiles alone: {v['chunked_tiles_equal_unchunked_tiles']}")
    return "\n".join(lines)


def save(result: dict, out: Path | None = None) -> Path:
    name = "vae_tiling-sd" if "decode" in result else "vae_memory"
    out = out or RESULTS_DIR / f"{name}-{result['device']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out
