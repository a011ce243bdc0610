"""The reference DiT: an SD3-architecture MMDiT (ComfyUI's `comfy.ldm.modules.diffusionmodules.mmdit`)
trained on the procedural scenes, conditioned by the generated CLIP-L through CLIPTextEncode.

ComfyUI's detection reads the MMDiT's depth (width = 64 x depth), patch size, context and pooled
widths and position-embedding grid from the weights, so `UNETLoader` loads the shipped file as
SD3 with a 768-wide context and pooled input: the standard `CLIPLoader(type="stable_diffusion")`
+ `CLIPTextEncode` conditions it. It is trained with the objective ComfyUI samples SD3 with:
rectified flow (`ModelSamplingDiscreteFlow`, CONST prediction: the model predicts
noise - x0 at x_t = (1 - sigma) x0 + sigma noise, timestep = 1000 sigma), sigmas drawn like the
shifted (shift 3) schedule KSampler uses, 10% empty captions for classifier-free guidance.
"""
from __future__ import annotations

import copy
import math
import time

import numpy as np
import torch

from bench.reference import dataset as ds
from bench.reference import work_dir

DEPTH = 2          # width 128, 2 heads of 64
PATCHES = 8        # position-embedding grid: latents up to 16x16 (128 px images)
UNCOND_RATE = 0.1
SHIFT = 3.0        # ComfyUI's SD3 sampling_settings


def unet_config(depth: int = DEPTH) -> dict:
    from bench.factory import _sd3
    return _sd3(depth, context=768, pooled=768, patches=PATCHES)


def build(depth: int = DEPTH, seed: int = 0):
    """A fresh SD3 BaseModel (ComfyUI's model_base.SD3) ready to train: DiT-style init (fan-in
    weights, zero adaLN modulation and output layer), fixed 2D sin-cos position embedding."""
    from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed
    from bench import factory
    cfg = factory.model_config(factory.family("sd3"), "tiny", torch.float32, unet_config(depth))
    model = cfg.get_model({})
    dm = model.diffusion_model
    factory.fill_module(dm, seed)
    with torch.no_grad():
        for name, p in dm.named_parameters():
            if "adaLN_modulation" in name or name.startswith("final_layer.linear"):
                p.zero_()
            elif name.endswith("bias"):
                p.zero_()
            p.requires_grad_(True)
        pe = get_2d_sincos_pos_embed(dm.hidden_size, PATCHES)
        dm.pos_embed.copy_(torch.from_numpy(pe).float().unsqueeze(0))
    return model


def predict(model, x_t: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
            pooled: torch.Tensor) -> torch.Tensor:
    """The raw model output as ComfyUI's `BaseModel._apply_model` computes it (before
    `calculate_denoised`), for sigma per sample."""
    ms = model.model_sampling
    xc = ms.calculate_input(sigma, x_t)
    t = ms.timestep(sigma).float()
    return model.diffusion_model(xc, t, context=context, y=pooled)


def sample_sigmas(n: int, gen: torch.Generator) -> torch.Tensor:
    """Sigmas distributed as the shifted flow schedule's steps: u uniform, sigma = shift(u)."""
    u = torch.rand(n, generator=gen)
    return SHIFT * u / (1 + (SHIFT - 1) * u)


# ---------------------------------------------------------------------------------------------
# training stages (called by bench.reference.train)

def _captions() -> list[str]:
    return [s.caption() for s in ds.all_scenes()] + [""]


def stage_embed(args, log) -> dict:
    """CLIPTextEncode output of the generated CLIP-L for every caption of the grammar and ""."""
    from bench.reference import text_encoder as te
    t0 = time.time()
    path = te.write_clip_l(work_dir() / te.FILE_NAME)
    clip = te.load_clip(path)
    captions = _captions()
    # the fast path must give what CLIPTextEncode gives
    check = [captions[0], captions[-2], ""]
    ref_c, ref_p = te.encode(clip, check)
    fast_c, fast_p = te.encode_fast(clip, check)
    err = max(float((ref_c - fast_c).abs().max()), float((ref_p - fast_p).abs().max()))
    if err > 1e-3:
        raise RuntimeError(f"encode_fast differs from CLIPTextEncode's output by {err}")
    log(f"[embed] fast path matches CLIPTextEncode (max diff {err:.2e}); {time.time() - t0:.0f}s")
    conds, pooleds = [], []
    for i in range(0, len(captions), 128):
        c, p = te.encode_fast(clip, captions[i:i + 128])
        conds.append(c.half())
        pooleds.append(p.half())
        log(f"[embed] {i + len(c)}/{len(captions)} {time.time() - t0:.0f}s")
    torch.save({"captions": captions, "cond": torch.cat(conds), "pooled": torch.cat(pooleds)},
               work_dir() / "embeddings.pt")
    return {"captions": len(captions), "wall_s": time.time() - t0}


def _latents(n: int, seed: int, log) -> tuple[torch.Tensor, list[str]]:
    """`n` rendered scenes encoded by the trained VAE, in the denoiser's latent space."""
    from bench.reference.train import encoded_scenes
    return encoded_scenes(16, n, seed, log, "dit")


def stage_dit(args, log) -> dict:
    from bench.reference import WEIGHTS_DIR
    from bench.reference.train import DIT_FILE, _save_fp16
    t0 = time.time()
    emb = torch.load(work_dir() / "embeddings.pt")
    index = {c: i for i, c in enumerate(emb["captions"])}
    cond_all, pooled_all = emb["cond"], emb["pooled"]
    empty = index[""]
    latents, captions = _latents(args.dit_samples, args.seed + 100, log)
    cap_idx = torch.tensor([index[c] for c in captions])
    torch.manual_seed(args.seed)
    model = build(args.dit_depth, args.seed)
    dm = model.diffusion_model
    if args.dit_resume:  # continue from the shipped (EMA) weights
        import safetensors.torch
        sd = safetensors.torch.load_file(str(WEIGHTS_DIR / DIT_FILE))
        dm.load_state_dict({k: v.float() for k, v in sd.items()})
        log(f"[dit] resumed from {DIT_FILE}")
    params = [p for p in dm.parameters() if p.requires_grad]
    log(f"[dit] depth {args.dit_depth}: {sum(p.numel() for p in params) / 1e6:.2f}M parameters")
    opt = torch.optim.AdamW(params, lr=args.dit_lr, weight_decay=0.0, betas=(0.9, 0.99))
    ema = copy.deepcopy(dm).requires_grad_(False)
    gen = torch.Generator().manual_seed(args.seed)
    steps, batch = args.dit_steps, args.dit_batch
    warmup = min(200, steps // 10)
    for step in range(steps):
        lr = args.dit_lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, len(latents), (batch,), generator=gen)
        x0 = latents[idx]
        # flips keep the captions true only for symmetric layouts: no augmentation
        ci = cap_idx[idx].clone()
        ci[torch.rand(batch, generator=gen) < UNCOND_RATE] = empty
        context, pooled = cond_all[ci].float(), pooled_all[ci].float()
        sigma = sample_sigmas(batch, gen)
        noise = torch.randn(x0.shape, generator=gen)
        s = sigma.view(-1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        out = predict(model, x_t, sigma, context, pooled)
        loss = (out - (noise - x0)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.dit_ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), dm.parameters()):
                pe.lerp_(p, 1 - decay)
        if step % 50 == 0 or step == steps - 1:
            log(f"[dit] step {step}/{steps} loss {loss.item():.4f} lr {lr:.2e} {time.time() - t0:.0f}s")
        if (step + 1) % 250 == 0 or step == steps - 1:
            sd = {k: v for k, v in ema.state_dict().items()}
            _save_fp16(sd, WEIGHTS_DIR / DIT_FILE,
                       {"comfyui-optim": f"reference sd3 mmdit depth {args.dit_depth} seed {args.seed}",
                        "steps": step + 1})
    result = {"depth": args.dit_depth, "parameters": sum(p.numel() for p in params), "steps": steps,
              "batch": batch, "lr": args.dit_lr, "final_loss": loss.item(), "wall_s": time.time() - t0}
    if args.dit_resume:  # keep the runs this one continued, and the totals
        import json
        record = WEIGHTS_DIR / "training.json"
        prev = json.loads(record.read_text()).get("dit", {}) if record.exists() else {}
        runs = prev.pop("runs", [prev]) if prev else []
        runs = runs + [dict(result)]
        result = {**result, "runs": runs, "total_steps": sum(r["steps"] for r in runs),
                  "total_wall_s": sum(r["wall_s"] for r in runs)}
    return result
