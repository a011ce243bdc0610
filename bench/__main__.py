"""python -m bench list | run <technique> [options] | sweep-ditcache [options] | reference [techniques] | offload [options] | shards [options] | layerwise [options] | vae [options] | report [--readme]"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _params(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--params must be a JSON object: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--params must be a JSON object")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def main(argv: list[str] | None = None) -> int:
    from bench import factory, techniques
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list techniques and model families")
    run = sub.add_parser("run", help="run a technique side by side with the same graph without it")
    run.add_argument("technique", choices=sorted(techniques.TECHNIQUES))
    run.add_argument("--model", default="sd15", choices=sorted(factory.FAMILIES))
    run.add_argument("--size", default="bench", choices=factory.SIZES)
    run.add_argument("--steps", type=_positive, default=20)
    run.add_argument("--cfg", type=float, default=None, help="default: 7 (1 for guidance-distilled families)")
    run.add_argument("--sampler", default="euler")
    run.add_argument("--scheduler", default="normal")
    run.add_argument("--width", type=_positive, default=None)
    run.add_argument("--height", type=_positive, default=None)
    run.add_argument("--frames", type=_positive, default=9, help="video families only")
    run.add_argument("--batch", type=_positive, default=1)
    run.add_argument("--repeats", type=_positive, default=3)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    run.add_argument("--no-flops", action="store_true", help="skip the untimed FLOP-counting runs")
    run.add_argument("--params", type=_params, default={}, help="node inputs as a JSON object")
    run.add_argument("--out", type=Path, default=None, help="results file (default bench/results/...)")
    sweep = sub.add_parser("sweep-ditcache", help="DiT block caching (fixed, searched, adaptive) against "
                           "ComfyUI's EasyCache and LazyCache on the same model, prompts and seeds")
    sweep.add_argument("--model", default="flux", choices=[*sorted(factory.FAMILIES), "reference"],
                       help="a factory family (generated weights), or `reference`: the trained reference DiT")
    sweep.add_argument("--prompts", type=_positive, default=8, help="--model reference: prompts of the fixed set")
    sweep.add_argument("--size", default="bench", choices=factory.SIZES)
    sweep.add_argument("--steps", type=_positive, default=20)
    sweep.add_argument("--cfg", type=float, default=None, help="default: 4 (1 for guidance-distilled families)")
    sweep.add_argument("--width", type=_positive, default=256)
    sweep.add_argument("--height", type=_positive, default=256)
    sweep.add_argument("--frames", type=_positive, default=9, help="video families only")
    sweep.add_argument("--budget", type=_positive, default=4, help="configurations each search samples")
    sweep.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    sweep.add_argument("--out", type=Path, default=None)
    off = sub.add_parser("offload", help="group offload against the resident model and ComfyUI's low-VRAM "
                         "mode at the same budgets; H2D bandwidth and the physical floor")
    off.add_argument("--model", default="sd15", choices=sorted(factory.FAMILIES))
    off.add_argument("--size", default="tiny", choices=factory.SIZES)
    off.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    off.add_argument("--steps", type=_positive, default=4)
    off.add_argument("--width", type=_positive, default=64)
    off.add_argument("--height", type=_positive, default=64)
    off.add_argument("--repeats", type=_positive, default=2)
    off.add_argument("--budgets", default="0.25,0.5", help="fractions of the weights, comma-separated")
    off.add_argument("--offload-type", default="block_level", choices=["block_level", "leaf_level"])
    off.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    off.add_argument("--out", type=Path, default=None)
    shards = sub.add_parser("shards", help="peak RAM of a shard-by-shard load (OptimLoadShardedModel) against "
                            "ComfyUI's whole-file load of the same weights")
    shards.add_argument("--model", default="sd3", choices=sorted(factory.FAMILIES))
    shards.add_argument("--size", default="bench", choices=factory.SIZES)
    shards.add_argument("--dtype", default="fp16", choices=["fp32", "fp16", "bf16"])
    shards.add_argument("--shards", type=_positive, default=8, help="max_shard_size = weights / shards")
    shards.add_argument("--out", type=Path, default=None)
    layerwise = sub.add_parser("layerwise", help="layerwise fp8 casting: each skip preset against casting "
                               "everything and ComfyUI's built-in fp8 load (fidelity, weight memory)")
    layerwise.add_argument("--model", default="sd15", choices=sorted(factory.FAMILIES))
    layerwise.add_argument("--size", default="full", choices=factory.SIZES)
    layerwise.add_argument("--steps", type=_positive, default=6)
    layerwise.add_argument("--cfg", type=float, default=7.0)
    layerwise.add_argument("--width", type=_positive, default=256)
    layerwise.add_argument("--height", type=_positive, default=256)
    layerwise.add_argument("--all-arms", action="store_true", help="every skip-group ablation, not the quick set")
    layerwise.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                           help="cuda: compute on the GPU (not yet run on a GPU)")
    layerwise.add_argument("--out", type=Path, default=None)
    vae = sub.add_parser("vae", help="OptimVAE against VAE Decode and VAE Decode/Encode (Tiled) on the SD VAE "
                         "at real size: speed, fidelity, seams, peak memory")
    vae.add_argument("--size", type=_positive, default=512)
    vae.add_argument("--tile", type=_positive, default=256)
    vae.add_argument("--overlap", type=int, default=64)
    vae.add_argument("--repeats", type=_positive, default=2)
    vae.add_argument("--memory-size", type=int, default=1024, help="image side of the peak-memory run; 0: skip")
    vae.add_argument("--no-video", action="store_true")
    vae.add_argument("--no-speed", action="store_true", help="only the peak-memory runs (saved as vae_memory-<device>.json)")
    vae.add_argument("--video-frames", type=_positive, default=13, help="latent frames of the Wan video run")
    vae.add_argument("--video-side", type=_positive, default=24, help="latent cells per side of the Wan video run")
    vae.add_argument("--video-chunk", type=_positive, default=1, help="OptimVAE temporal_chunk in the video run")
    vae.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                     help="cuda: peak memory is VRAM (not yet run on a GPU)")
    vae.add_argument("--out", type=Path, default=None)
    ref = sub.add_parser("reference", help="caching techniques on the trained reference DiT or UNet: "
                         "speedup, prompt adherence, PSNR, SSIM (bench/reference/bench.py)")
    ref.add_argument("techniques", nargs="*", default=None, help="default: noop, ditcache_wide, "
                     "ditcache_adaptive_wide, easycache, lazycache (dit); noop, deepcache3, deepcache5, "
                     "tgate, tgate_deepcache3 (unet)")
    ref.add_argument("--model", default="dit", choices=["dit", "unet"],
                     help="dit: the SD3 MMDiT; unet: the SD1.5 UNet")
    ref.add_argument("--prompts", type=_positive, default=24, help="first N of the fixed prompt set")
    ref.add_argument("--steps", type=_positive, default=20)
    ref.add_argument("--repeats", type=_positive, default=1, help="timed runs per prompt (the fastest counts)")
    ref.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ref.add_argument("--out", type=Path, default=None)
    report = sub.add_parser("report", help="turn bench/results/*.json into the README tables")
    report.add_argument("--readme", type=Path, default=None, help="rewrite the tables in this README")
    args = parser.parse_args(argv)

    if args.command == "list":
        print("techniques:")
        for t in techniques.TECHNIQUES.values():
            print(f"  {t.name:18s} {t.node_ids:30s} {t.description}")
        print("model families (sizes tiny/bench/full):")
        for f in factory.FAMILIES.values():
            print(f"  {f.name:14s} {f.notes}")
        return 0
    if args.command == "report":
        from bench import report as report_mod
        table = report_mod.markdown_tables(report_mod.load_results())
        if args.readme:
            report_mod.update_readme(args.readme, table)
            print(f"updated {args.readme}")
        print(table)
        return 0

    if getattr(args, "device", "cpu") == "cuda":
        import torch
        if not torch.cuda.is_available():
            print("--device cuda: no CUDA device is available here", file=sys.stderr)
            return 2
    if args.command == "vae":
        from bench import vae_bench
        result = vae_bench.run(vae_bench.Settings(size=args.size, tile=args.tile, overlap=args.overlap,
                                                  repeats=args.repeats, memory_size=args.memory_size,
                                                  video=not args.no_video, speed=not args.no_speed,
                                                  video_frames=args.video_frames, video_side=args.video_side,
                                                  video_chunk=args.video_chunk, device=args.device))
        print(vae_bench.summary(result))
        print(f"saved {vae_bench.save(result, args.out)}")
        return 0
    if args.command == "layerwise":
        from bench import layerwise_fidelity as lf
        result = lf.run(lf.Settings(family=args.model, size=args.size, steps=args.steps, cfg=args.cfg,
                                    width=args.width, height=args.height, all_arms=args.all_arms,
                                    device=args.device))
        print(lf.summary(result))
        print(f"saved {lf.save(result, args.out)}")
        return 0
    if args.command == "reference":
        from bench.reference import bench as ref_bench
        names = args.techniques or ref_bench.default_techniques(args.model)
        unknown = [n for n in names if n not in techniques.TECHNIQUES]
        if unknown:
            print(f"unknown technique(s) {unknown}; known: {', '.join(techniques.TECHNIQUES)}", file=sys.stderr)
            return 2
        out = args.out or ref_bench.results_path(args.model)
        result = ref_bench.run(names, prompts=args.prompts, steps=args.steps, repeats=args.repeats,
                               threads=args.threads, model=args.model, grid_path=out.with_suffix(".png"))
        print(ref_bench.summary(result))
        print(f"saved {ref_bench.save(result, out, args.model)}")
        return 0
    if args.command == "sweep-ditcache":
        from bench import ditcache_sweep
        result = ditcache_sweep.run(ditcache_sweep.SweepSettings(
            family=args.model, size=args.size, steps=args.steps, cfg=args.cfg, width=args.width,
            height=args.height, frames=args.frames, budget=args.budget, device=args.device,
            reference_prompts=args.prompts))
        print(ditcache_sweep.summary(result))
        print(f"saved {ditcache_sweep.save(result, args.out)}")
        return 0
    if args.command == "shards":
        from bench import shards_bench
        result = shards_bench.run(shards_bench.ShardSettings(family=args.model, size=args.size, dtype=args.dtype,
                                                             shards=args.shards))
        print(shards_bench.summary(result))
        print(f"saved {shards_bench.save(result, args.out)}")
        return 0
    if args.command == "offload":
        from bench import offload_bench
        result = offload_bench.run(offload_bench.OffloadSettings(
            family=args.model, size=args.size, dtype=args.dtype, steps=args.steps, width=args.width,
            height=args.height, repeats=args.repeats, device=args.device, offload_type=args.offload_type,
            budgets=tuple(float(b) for b in args.budgets.split(","))))
        print(offload_bench.summary(result))
        print(f"saved {offload_bench.save(result, args.out)}")
        return 0
    from bench import runner
    settings = runner.RunSettings(
        technique=args.technique, family=args.model, size=args.size, steps=args.steps, cfg=args.cfg,
        sampler=args.sampler, scheduler=args.scheduler, width=args.width, height=args.height,
        frames=args.frames, batch=args.batch, seed=args.seed, repeats=args.repeats,
        device=args.device, params=args.params, count_flops=not args.no_flops)
    result = runner.run(settings)
    print(runner.summary(result))
    print(f"saved {runner.save(result, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
