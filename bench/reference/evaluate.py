"""Prompt adherence of the shipped reference models through a standard ComfyUI graph, headless.

    python -m bench.reference.evaluate [--model dit|unet] [--prompts 72] [--steps 20] [--cfg 4] [--seed 0]

Starts `main.py --cpu` on a loopback port, submits one API-format graph per prompt of the fixed
prompt set (CLIPLoader + CLIPTextEncode, UNETLoader, VAELoader, EmptySD3LatentImage, KSampler,
VAEDecode, SaveImage: `bench.reference.graphs.txt2img`), reads the saved PNGs back and scores
them with `bench.reference.adherence`. Prints and saves the figures (and a grid of the images)
under bench/results/.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from bench.comfy_env import REPO_ROOT, find_comfyui
from bench.reference import adherence as ad
from bench.reference import dataset as ds
from bench.reference import graphs

RESULTS = REPO_ROOT / "bench" / "results" / "reference"  # not a `bench run` result: own folder


def run_prompts(server, prompts, *, seed=0, steps=graphs.STEPS, cfg=graphs.CFG, optim=(),
                prefix="ref", model="dit") -> tuple[np.ndarray, list[float]]:
    """Images (uint8 [N, 64, 64, 3]) and per-prompt execution seconds, one graph per prompt."""
    from bench.server import execution_error, read_images
    images, seconds = [], []
    for i, prompt in enumerate(prompts):
        entry = server.run(graphs.txt2img(prompt, seed=seed + i, steps=steps, cfg=cfg, optim=list(optim),
                                          filename_prefix=f"{prefix}-{i:03d}", model=model))
        err = execution_error(entry)
        if err:
            raise RuntimeError(f"prompt {prompt!r} failed: {err.get('exception_message')}")
        stamps = {kind: data.get("timestamp") for kind, data in entry["status"]["messages"]}
        seconds.append((stamps["execution_success"] - stamps["execution_start"]) / 1000.0)
        images.append(read_images(server.output_images(entry, "save"))[0][..., :3])
    return np.stack(images), seconds


def grid(images: np.ndarray, columns: int = 12) -> np.ndarray:
    n = len(images)
    rows = (n + columns - 1) // columns
    out = np.zeros((rows * ds.SIDE, columns * ds.SIDE, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        out[r * ds.SIDE:(r + 1) * ds.SIDE, c * ds.SIDE:(c + 1) * ds.SIDE] = img
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reference.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dit", choices=sorted(graphs.MODELS),
                        help="dit: the SD3 MMDiT; unet: the SD1.5 UNet")
    parser.add_argument("--prompts", type=int, default=len(ds.PROMPTS))
    parser.add_argument("--steps", type=int, default=graphs.STEPS)
    parser.add_argument("--cfg", type=float, default=graphs.CFG)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base", type=Path, default=None, help="ComfyUI base directory (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: bench/results/reference/adherence.json (dit), adherence-unet.json (unet)")
    parser.add_argument("--server-threads", type=int, default=1,
                        help="OMP_NUM_THREADS of the server (0: leave it; 1 is far faster for this "
                             "small model on a shared CPU)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = RESULTS / ("adherence.json" if args.model == "dit" else f"adherence-{args.model}.json")
    root, why = find_comfyui()
    if root is None:
        print(f"needs ComfyUI: {why}", file=sys.stderr)
        return 2
    import tempfile

    from PIL import Image

    from bench import comfy_env
    from bench.server import ComfyServer
    base = args.base or Path(tempfile.mkdtemp(prefix="optim-ref-eval-"))
    comfy_env.load_comfyui_in_process(base)  # only to generate the CLIP-L file if it is missing
    graphs.install(base / "models")
    prompts = ds.PROMPTS[:args.prompts]
    if args.server_threads:
        import os
        os.environ["OMP_NUM_THREADS"] = str(args.server_threads)  # the server inherits it
    t0 = time.time()
    with ComfyServer(base) as server:
        images, seconds = run_prompts(server, prompts, seed=args.seed, steps=args.steps, cfg=args.cfg,
                                      model=args.model)
    result = ad.adherence(images, prompts)
    record = {"model": graphs.MODELS[args.model]["title"], "adherence": result["adherence"], "per_attribute": result["per_attribute"],
              "prompts": len(prompts), "steps": args.steps, "cfg": args.cfg, "seed": args.seed,
              "sampler": graphs.SAMPLER, "scheduler": graphs.SCHEDULER,
              "median_prompt_s": float(np.median(seconds)), "wall_s": time.time() - t0,
              "scores": dict(zip(prompts, result["scores"]))}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    grid_path = args.out.with_suffix(".png")
    Image.fromarray(grid(images)).save(grid_path)
    print(f"{graphs.MODELS[args.model]['title']}: adherence {result['adherence']:.3f} over {len(prompts)} prompts ({args.steps} steps, "
          f"cfg {args.cfg}); per attribute: "
          + ", ".join(f"{k} {v:.2f}" for k, v in result["per_attribute"].items()))
    print(f"saved {args.out} and {grid_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
