"""python -m bench list | run <technique> [options] | sweep-ditcache [options] | reference [techniques] | report [--readme]"""
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
    sweep.add_argument("--model", default="flux", choices=sorted(factory.FAMILIES))
    sweep.add_argument("--size", default="bench", choices=factory.SIZES)
    sweep.add_argument("--steps", type=_positive, default=20)
    sweep.add_argument("--cfg", type=float, default=None, help="default: 4 (1 for guidance-distilled families)")
    sweep.add_argument("--width", type=_positive, default=256)
    sweep.add_argument("--height", type=_positive, default=256)
    sweep.add_argument("--frames", type=_positive, default=9, help="video families only")
    sweep.add_argument("--budget", type=_positive, default=4, help="configurations each search samples")
    sweep.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    sweep.add_argument("--out", type=Path, default=None)
    ref = sub.add_parser("reference", help="caching techniques on the trained reference DiT: speedup, "
                         "prompt adherence, PSNR, SSIM (bench/reference/bench.py)")
    ref.add_argument("techniques", nargs="*", default=None, help="default: noop, ditcache_wide, "
                     "ditcache_adaptive_wide, easycache, lazycache")
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
    if args.command == "reference":
        from bench.reference import bench as ref_bench
        names = args.techniques or ref_bench.DEFAULT_TECHNIQUES
        unknown = [n for n in names if n not in techniques.TECHNIQUES]
        if unknown:
            print(f"unknown technique(s) {unknown}; known: {', '.join(techniques.TECHNIQUES)}", file=sys.stderr)
            return 2
        result = ref_bench.run(names, prompts=args.prompts, steps=args.steps, repeats=args.repeats,
                               threads=args.threads)
        print(ref_bench.summary(result))
        print(f"saved {ref_bench.save(result, args.out)}")
        return 0
    if args.command == "sweep-ditcache":
        from bench import ditcache_sweep
        result = ditcache_sweep.run(ditcache_sweep.SweepSettings(
            family=args.model, size=args.size, steps=args.steps, cfg=args.cfg, width=args.width,
            height=args.height, frames=args.frames, budget=args.budget, device=args.device))
        print(ditcache_sweep.summary(result))
        print(f"saved {ditcache_sweep.save(result, args.out)}")
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
