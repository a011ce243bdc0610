"""`make demo`: a headless ComfyUI with the pack runs each example graph with and without the
pack's optimizations through the HTTP API, then prints the comparison and saves the images.

Models: the factory's small models of real architectures with generated weights, loaded by the
standard UNETLoader/VAELoader from files written on the first run (reused afterwards)."""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

from bench import comfy_env, graphs, techniques
from bench.comfy_env import REPO_ROOT
from bench.runner import fmt_db
from bench.server import ComfyServer, execution_error, read_images

OUTPUT = REPO_ROOT / "demo" / "output"
HELPERS = REPO_ROOT / "tests" / "helper_nodes" / "optim_test_nodes"

# family -> the optimization stacks to compare with the plain graph (the benchmark registry's
# stacks, so the demo shows what the benchmarks measure). Techniques join as they land.
DEMOS: dict[str, list[str]] = {
    "sd15": ["noop", "deepcache3", "tgate", "tgate_deepcache3"],
    "sd3": ["noop", "ditcache_wide"],
    "wan21": ["noop", "ditcache_wide"],
}


def wall_time_s(entry: dict) -> float:
    """Execution time of a prompt from the server's own timestamps (ms)."""
    stamps = {kind: data.get("timestamp") for kind, data in entry["status"]["messages"]}
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000.0


def psnr_ssim(a, b) -> tuple[float, float]:
    import torch
    from optim.metrics import psnr, ssim
    ta, tb = torch.from_numpy(a).float() / 255, torch.from_numpy(b).float() / 255
    return psnr(ta, tb, data_range=1.0), ssim(ta, tb)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--families", nargs="*", default=list(DEMOS), choices=list(DEMOS))
    parser.add_argument("--reference-prompts", type=int, default=8,
                        help="prompts for the trained reference models' part (0: skip it)")
    args = parser.parse_args(argv)

    root, why = comfy_env.find_comfyui()
    if root is None:
        print(f"demo needs ComfyUI: {why}", file=sys.stderr)
        return 2
    base = OUTPUT / "comfyui-base"
    print(f"[demo] writing the small models (first run only) under {base / 'models'}")
    comfy_env.load_comfyui_in_process(base)
    for family in args.families:
        graphs.write_model_files(base / "models", family)
    if args.reference_prompts:
        from bench.reference import demo as ref_demo
        from bench.reference import graphs as ref_graphs
        ref_graphs.install(base / "models")  # trained DiT, UNet, VAEs (shipped), CLIP-L (regenerated)

    results = []  # (family, variant, median wall s, PSNR, SSIM)
    print(f"[demo] starting ComfyUI ({root}) headless on a loopback port ...")
    with ComfyServer(base, extra_custom_nodes=(HELPERS,)) as server:
        def run(family, seed, optim=(), name="plain"):
            entry = server.run(graphs.txt2img(family, steps=args.steps, width=64, height=64, seed=seed,
                                              prompt="two red circles top left", optim=list(optim),
                                              filename_prefix=f"demo-{family}-{name}"))
            if execution_error(entry):
                raise RuntimeError(execution_error(entry)["exception_message"])
            paths = server.output_images(entry, "save")
            return wall_time_s(entry), read_images(paths), paths[0]

        for family in args.families:
            run(family, seed=99)  # warm-up: loads the models
            variants = {"plain": ()}
            variants.update({name: [(n, dict(p)) for n, p in techniques.technique(name).stack]
                             for name in DEMOS[family]})
            times = {name: [] for name in variants}
            fidelity = {}
            # Alternate the variants over the repeats, each repeat with its own seed (so ComfyUI's
            # cache cannot answer it); fidelity compares each variant with plain at the same seed.
            for seed in range(1, args.repeats + 1):
                ref = None
                for name, stack in variants.items():
                    t, imgs, first = run(family, seed, stack, name)
                    times[name].append(t)
                    ref = imgs if name == "plain" else ref
                    fidelity[name] = psnr_ssim(ref, imgs)
                    if seed == args.repeats:
                        _save(first, f"{family}-{name}.png")
            for name in variants:
                results.append((family, name, statistics.median(times[name]),
                                statistics.median(times["plain"]), *fidelity[name]))
        if args.reference_prompts:
            ref_rows = ref_demo.run(server, OUTPUT, steps=args.steps, prompts=args.reference_prompts)
            unet_rows = ref_demo.run(server, OUTPUT, steps=args.steps, prompts=args.reference_prompts,
                                     model="unet")

    print(f"\nHeadless ComfyUI, {args.steps} steps, 64x64, generated weights; wall time per prompt "
          f"from the server's timestamps, median of {args.repeats} alternating repeats:")
    print(f"{'model':8s} {'graph':18s} {'wall s':>8s} {'speedup':>8s} {'PSNR dB':>8s} {'SSIM':>7s}")
    for family, name, t, t_plain, p, s in results:
        print(f"{family:8s} {name:18s} {t:8.2f} {t_plain / t:7.2f}x {fmt_db(p):>8s} {s:7.4f}")
    if args.reference_prompts:
        print("\n" + ref_demo.report(ref_rows, args.steps, args.reference_prompts))
        print(f"grid (rows: prompts, columns: graphs): {OUTPUT / 'reference-grid.png'}")
        print("\n" + ref_demo.report(unet_rows, args.steps, args.reference_prompts, "unet"))
        print(f"grid (rows: prompts, columns: graphs): {OUTPUT / ref_demo.grid_name('unet')}")
    print(f"\nimages: {OUTPUT}")
    return 0


def _save(src: Path, name: str) -> None:
    OUTPUT.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, OUTPUT / name)


if __name__ == "__main__":
    sys.exit(main())
