"""`make demo`: a headless ComfyUI with the pack runs each example graph with and without the
pack's optimizations through the HTTP API, then prints the comparison and saves the images.

Models: the factory's small models of real architectures with generated weights, loaded by the
standard UNETLoader/VAELoader from files written on the first run (reused afterwards)."""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from bench import comfy_env, graphs
from bench.comfy_env import REPO_ROOT
from bench.runner import fmt_db
from bench.server import ComfyServer, execution_error

OUTPUT = REPO_ROOT / "demo" / "output"
HELPERS = REPO_ROOT / "tests" / "helper_nodes" / "optim_test_nodes"

# family -> the optimization stacks to compare with the plain graph. Techniques join as they land.
DEMOS: dict[str, list[tuple[str, list[tuple[str, dict]]]]] = {
    "sd15": [("noop", [("OptimNoop", {})])],
    "sd3": [("noop", [("OptimNoop", {})])],
    "wan21": [("noop", [("OptimNoop", {})])],
}


def wall_time_s(entry: dict) -> float:
    """Execution time of a prompt from the server's own timestamps (ms)."""
    stamps = {kind: data.get("timestamp") for kind, data in entry["status"]["messages"]}
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000.0


def psnr_ssim(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    import torch
    from optim.metrics import psnr, ssim
    ta, tb = torch.from_numpy(a).float() / 255, torch.from_numpy(b).float() / 255
    return psnr(ta, tb, data_range=1.0), ssim(ta, tb)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--families", nargs="*", default=list(DEMOS), choices=list(DEMOS))
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

    rows = []
    print(f"[demo] starting ComfyUI ({root}) headless on a loopback port ...")
    with ComfyServer(base, extra_custom_nodes=(HELPERS,)) as server:
        for family in args.families:
            common = dict(steps=args.steps, width=64, height=64, prompt="two red circles top left")
            server.run(graphs.txt2img(family, **{**common, "seed": 1}))  # warm-up: loads the models
            plain = server.run(graphs.txt2img(family, **common, filename_prefix=f"demo-{family}-plain"))
            if execution_error(plain):
                raise RuntimeError(execution_error(plain)["exception_message"])
            ref = np.stack([np.asarray(Image.open(p)) for p in server.output_images(plain, "save")])
            t_plain = wall_time_s(plain)
            rows.append((family, "plain", t_plain, 1.0, float("inf"), 1.0))
            _save(server.output_images(plain, "save")[0], f"{family}-plain.png")
            for name, stack in DEMOS[family]:
                entry = server.run(graphs.txt2img(family, **common, optim=stack,
                                                  filename_prefix=f"demo-{family}-{name}"))
                if execution_error(entry):
                    raise RuntimeError(execution_error(entry)["exception_message"])
                imgs = np.stack([np.asarray(Image.open(p)) for p in server.output_images(entry, "save")])
                t = wall_time_s(entry)
                rows.append((family, name, t, t_plain / t, *psnr_ssim(ref, imgs)))
                _save(server.output_images(entry, "save")[0], f"{family}-{name}.png")

    print(f"\nHeadless ComfyUI, {args.steps} steps, 64x64, generated weights (wall time per prompt "
          f"from the server's timestamps):")
    print(f"{'model':8s} {'graph':12s} {'wall s':>8s} {'speedup':>8s} {'PSNR dB':>8s} {'SSIM':>7s}")
    for family, name, t, speedup, p, s in rows:
        print(f"{family:8s} {name:12s} {t:8.2f} {speedup:7.2f}x {fmt_db(p):>8s} {s:7.4f}")
    print(f"\nimages: {OUTPUT}")
    return 0


def _save(src: Path, name: str) -> None:
    OUTPUT.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, OUTPUT / name)


if __name__ == "__main__":
    sys.exit(main())
