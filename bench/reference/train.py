"""Train the reference models from scratch, reproducibly from a seed, on the CPU (or a GPU).

    python -m bench.reference.train [--stages vae vae-decoder embed dit dit-continue vae4 vae4-decoder unet]
                                    [--seed 0] [--jobs 2]

Stages (each reads what the previous ones left in the work folder, so a stage can be rerun alone):
  vae    the 16-channel TAESD-format VAE (bench/reference/vae.py)
  vae-decoder  more decoder training, encoder frozen (same latents: the DiT stays valid)
  embed  the generated CLIP-L's CLIPTextEncode output for every caption of the grammar
  dit    the SD3-architecture MMDiT (bench/reference/dit.py)
  dit-continue  a second DiT run from the first one's EMA weights, with a fresh schedule
  vae4   the 4-channel (SD-style latents) TAESD-format VAE, for the UNet
  vae4-decoder  its decoder-only fine-tune
  unet   the SD1.5-architecture UNet, trained slim and shipped slim (bench/reference/unet.py)
Shipped results go to bench/reference/weights/ (fp16 safetensors); intermediates (the generated
CLIP-L, slim VAE, encoded latents, embeddings) to ~/.cache/comfyui-optim/reference/.
Each stage logs its wall time; the totals land in weights/training.json.

With --jobs 2 (the default) the 16-channel chain (vae, vae-decoder, dit, dit-continue) and the
4-channel chain (vae4, vae4-decoder, unet) run as two single-threaded processes, after `embed`,
which both denoisers read. Every stage seeds its own generators and runs on one thread either way,
so the weights are the same as one process running the stages in order; only the wall time halves.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench import comfy_env
from bench.reference import WEIGHTS_DIR, work_dir

VAE_FILE = "optim-ref-taesd3.safetensors"
DIT_FILE = "optim-ref-sd3.safetensors"
VAE4_FILE = "optim-ref-taesd15.safetensors"   # 4-channel SD-style latents (the UNet's)


def vae_layout(channels: int) -> tuple[str, str, str]:
    """(shipped file, slim state file in the work folder, ComfyUI latent format) per latent width."""
    return {16: (VAE_FILE, "slim_vae16.pt", "SD3"), 4: (VAE4_FILE, "slim_vae4.pt", "SD15")}[channels]


def encoded_scenes(channels: int, n: int, seed: int, log, tag: str) -> tuple[torch.Tensor, list[str]]:
    """`n` rendered scenes encoded by the trained `channels`-wide VAE and normalised to the
    denoiser's latent space (cached in the work folder: the name is what the VAE stage clears)."""
    import safetensors
    from bench.reference import dataset as ds
    from bench.reference import vae as rv
    file, slim_file, _ = vae_layout(channels)
    cache = work_dir() / f"latents{'' if channels == 16 else channels}_{n}_{seed}.pt"
    if cache.exists():
        d = torch.load(cache)
        return d["latents"], d["captions"]
    slim = rv.SlimTAESD(channels)
    slim.load_state_dict(torch.load(work_dir() / slim_file))
    with safetensors.safe_open(str(WEIGHTS_DIR / file), "pt") as f:
        meta = f.metadata()
    mean, std = float(meta["latent_mean"]), float(meta["latent_std"])
    images, captions = ds.make_dataset(n, seed)
    out = []
    with torch.no_grad():
        for i in range(0, n, 256):
            x = torch.from_numpy(images[i:i + 256]).permute(0, 3, 1, 2)
            out.append((slim.encode(x) - mean) / std)
    latents = torch.cat(out)
    torch.save({"latents": latents, "captions": captions}, cache)
    log(f"[{tag}] encoded {n} scenes: latent std {latents.std():.3f} mean {latents.mean():.3f}")
    return latents, captions


def _save_fp16(sd: dict, path: Path, meta: dict) -> None:
    import safetensors.torch
    out = {}
    for k, v in sd.items():
        v = v.detach().float().to(torch.float16).contiguous()
        if not torch.isfinite(v).all():
            raise ValueError(f"{k} is not finite in fp16")
        out[k] = v
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")  # readers (a check while training runs) never see half a file
    safetensors.torch.save_file(out, str(tmp), metadata={k: str(v) for k, v in meta.items()})
    tmp.replace(path)


def stage_vae(args, log, channels: int = 16) -> dict:
    import comfy.latent_formats
    import numpy as np
    from bench.reference import vae as rv
    file, slim_file, latent_format = vae_layout(channels)
    t0 = time.time()
    for stale in work_dir().glob(f"latents{'' if channels == 16 else channels}_*.pt"):  # encoded by the previous VAE
        stale.unlink()
    steps = args.vae_steps if channels == 16 else args.vae4_steps
    vae, stats = rv.train(channels, steps=steps, batch=args.vae_batch, seed=args.seed, lr=args.vae_lr,
                          log=log)
    torch.save(vae.state_dict(), work_dir() / slim_file)
    imgs = rv.batch_images(np.random.Generator(np.random.PCG64(args.seed + 7)), 1024)
    mean, std = rv.latent_stats(vae, imgs)
    scale, shift = rv.scaling_for(getattr(comfy.latent_formats, latent_format)(), mean, std)
    _save_fp16(vae.export(scale, shift), WEIGHTS_DIR / file,
               {"comfyui-optim": f"reference taesd {latent_format} seed {args.seed}", "latent_mean": mean,
                "latent_std": std})
    return {**stats, "latent_channels": channels, "steps": steps, "latent_mean": mean, "latent_std": std,
            "wall_s": time.time() - t0}


def stage_vae_decoder(args, log, channels: int = 16) -> dict:
    """Decoder-only fine-tune of the trained VAE (latents unchanged), re-exported with the same
    scaling."""
    import safetensors
    from bench.reference import vae as rv
    file, slim_file, _ = vae_layout(channels)
    t0 = time.time()
    vae = rv.SlimTAESD(channels)
    vae.load_state_dict(torch.load(work_dir() / slim_file))
    with safetensors.safe_open(str(WEIGHTS_DIR / file), "pt") as f:
        meta = f.metadata()
        scale, shift = float(f.get_tensor("vae_scale")), float(f.get_tensor("vae_shift"))
    steps = args.vae_decoder_steps if channels == 16 else args.vae4_decoder_steps
    stats = rv.finetune_decoder(vae, steps=steps, batch=args.vae_batch, seed=args.seed + 1, log=log)
    torch.save(vae.state_dict(), work_dir() / slim_file)
    _save_fp16(vae.export(scale, shift), WEIGHTS_DIR / file, {**meta, "decoder_finetune_steps": steps})
    return {**stats, "latent_channels": channels, "steps": steps, "wall_s": time.time() - t0}


STAGES = ("vae", "vae-decoder", "embed", "dit", "dit-continue", "vae4", "vae4-decoder", "unet")
CHAINS = (("vae", "vae-decoder", "dit", "dit-continue"), ("vae4", "vae4-decoder", "unet"))


def stage_dit_continue(args, log) -> dict:
    from bench.reference import dit
    return dit.stage_dit(argparse.Namespace(**{**vars(args), "dit_steps": args.dit_continue_steps,
                                               "dit_lr": args.dit_continue_lr, "dit_resume": True}), log)


@contextlib.contextmanager
def _locked(path: Path):
    """Two chains update training.json: one read-modify-write at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _run_chains(argv: list[str], stages: list[str], log) -> int:
    """Run `embed` (if asked) first, then each chain's asked stages in its own process."""
    base = [a for i, a in enumerate(argv) if not _is_stage_or_jobs_arg(argv, i)]
    command = [sys.executable, "-m", "bench.reference.train", *base, "--jobs", "1", "--stages"]
    if "embed" in stages:
        if subprocess.call(command + ["embed"]):
            return 1
    chains = [[s for s in stages if s in chain] for chain in CHAINS]
    procs = [subprocess.Popen(command + chain) for chain in chains if chain]
    codes = [p.wait() for p in procs]
    return max(codes, default=0)


def _is_stage_or_jobs_arg(argv: list[str], i: int) -> bool:
    """Whether argv[i] belongs to --stages or --jobs (which the chains get their own values of)."""
    flag = None
    for j in range(i, -1, -1):
        if argv[j].startswith("--"):
            flag = argv[j].split("=")[0]
            break
    return flag in ("--stages", "--jobs")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reference.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--jobs", type=int, default=2, choices=(1, 2),
                        help="2: the 16- and 4-channel chains in two processes at once (same weights)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=1200)
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--vae-decoder-steps", type=int, default=1500)
    parser.add_argument("--vae4-steps", type=int, default=3000)
    parser.add_argument("--vae4-decoder-steps", type=int, default=600)
    parser.add_argument("--dit-steps", type=int, default=2000)
    parser.add_argument("--dit-batch", type=int, default=32)
    parser.add_argument("--dit-depth", type=int, default=2)
    parser.add_argument("--dit-lr", type=float, default=1e-3)
    parser.add_argument("--dit-ema", type=float, default=0.998)
    parser.add_argument("--dit-samples", type=int, default=12000)
    parser.add_argument("--dit-resume", action="store_true",
                        help="start from the shipped DiT weights instead of a fresh init")
    parser.add_argument("--dit-continue-steps", type=int, default=5000)
    parser.add_argument("--dit-continue-lr", type=float, default=6e-4)
    parser.add_argument("--unet-steps", type=int, default=5000)
    parser.add_argument("--unet-batch", type=int, default=32)
    parser.add_argument("--unet-lr", type=float, default=1e-3)
    parser.add_argument("--unet-ema", type=float, default=0.998)
    parser.add_argument("--unet-samples", type=int, default=12000)
    parser.add_argument("--unet-max-minutes", type=float, default=0,
                        help="stop the UNet stage after this many minutes (0: run all steps); the "
                             "learning-rate schedule still assumes --unet-steps")
    parser.add_argument("--unet-resume", action="store_true",
                        help="start from the shipped slim UNet weights instead of a fresh init")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (0: torch's default; 1 is fastest on a shared 2-core CPU, "
                             "where OpenMP threads otherwise wait on each other)")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    record_path = WEIGHTS_DIR / "training.json"
    if args.jobs == 2 and any(s in CHAINS[0] for s in args.stages) and any(s in CHAINS[1] for s in args.stages):
        t0 = time.time()
        code = _run_chains(argv, args.stages, print)
        with _locked(record_path):
            record = json.loads(record_path.read_text()) if record_path.exists() else {}
            record["total"] = {"stages": args.stages, "jobs": 2, "wall_s": time.time() - t0, "exit_code": code}
            record_path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"== all stages: {time.time() - t0:.0f}s wall, exit code {code}", flush=True)
        return code
    if args.threads:
        torch.set_num_threads(args.threads)
    comfy_env.load_comfyui_in_process()
    log_path = work_dir() / "train.log"

    def log(msg):
        print(msg, flush=True)
        with open(log_path, "a") as f:
            f.write(msg + "\n")

    stages = {"vae": stage_vae, "vae-decoder": stage_vae_decoder,
              "vae4": lambda a, lg: stage_vae(a, lg, 4), "vae4-decoder": lambda a, lg: stage_vae_decoder(a, lg, 4)}
    if {"embed", "dit", "dit-continue"} & set(args.stages):
        from bench.reference import dit
        stages["embed"] = dit.stage_embed
        stages["dit"] = dit.stage_dit
        stages["dit-continue"] = stage_dit_continue
    if "unet" in args.stages:
        from bench.reference import unet
        stages["unet"] = unet.stage_unet
    for name in args.stages:
        log(f"== stage {name}")
        cpu0 = time.process_time()
        result = stages[name](args, log)
        result["cpu_s"] = time.process_time() - cpu0  # wall time on a shared CPU says little
        key = "dit" if name == "dit-continue" else name   # the continued run's record holds both runs
        with _locked(record_path):
            record = json.loads(record_path.read_text()) if record_path.exists() else {}
            record[key] = {**result, "seed": args.seed, "torch_threads": torch.get_num_threads(),
                           "device": "cpu"}
            record_path.write_text(json.dumps(record, indent=2) + "\n")
        log(f"== stage {name} done: {json.dumps(record[key])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
