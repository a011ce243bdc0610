"""The reference UNet: an SD1.5-architecture UNet (ComfyUI's `UNetModel`, detected as SD15 by the
stock `UNETLoader`) trained on the procedural scenes' 4-channel latents, conditioned by the
generated CLIP-L through CLIPTextEncode.

SD1.5's detection fixes model_channels = 320 and context_dim = 768; the smallest layout it still
detects (2 levels of channel_mult 1, one res block per level, transformer depth 1: the factory's
`sd15` "tiny") has 36M parameters, 73 MB in fp16: over the 25 MB the repo ships, and slow to
train on a 2-core CPU. So the model is trained and shipped *slim*, and expanded exactly:

- A slim UNet of width 64 (`WIDTH`) is built from ComfyUI's own `UNetModel` with the same layout,
  8 heads and 768-wide cross-attention; only its norms are replaced (through UNetModel's
  `operations` argument) by GroupNorm / LayerNorm that take their statistics as if each group
  also held the 320-wide model's zero channels (`virtual_width_ops`).
- `expand()` writes the slim weights into a 320-wide SD1.5 state dict: every slim channel goes to
  a fixed channel of the wide model (each slim GroupNorm group inside the wide model's group,
  each attention head's dimensions inside the wide head), everything else is zero. Zero
  channels stay exactly zero through every layer (zero norm affine, zero convolution rows,
  SiLU(0) = 0), the wide sinusoidal time embedding holds the slim one's frequencies at every
  fifth position, and the query weights carry the factor sqrt(40 / 8) that makes the wide
  heads' 1/sqrt(40) attention scale equal the slim heads' 1/sqrt(8). So the wide model computes
  what the slim one does (tests/bench/test_reference_unet.py checks it through UNETLoader), and
  ComfyUI runs it as a real 320-channel SD1.5 UNet: the caching techniques see its real layout
  and pay its real cost.
- The repo ships the slim weights (fp16, 5 MB); `install()` expands them once into the work
  folder (`~/.cache/comfyui-optim/reference/`), deterministically: index copies and one exact
  scale, no random numbers, so every machine gets the same bits.

Trained with the objective ComfyUI samples SD1.5 with: eps prediction (`EPS` with
`ModelSamplingDiscrete`, the scaled-linear beta schedule, 1000 timesteps): x_t = x0 + sigma
noise, input x_t / sqrt(1 + sigma^2), timestep t, the model predicts the noise; t uniform;
10% empty captions for classifier-free guidance.
"""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import torch

from bench.reference import work_dir

WIDTH = 64            # the slim model's channels (a multiple of 32 that divides 320)
FULL = 320            # SD1.5's model_channels
HEADS = 8             # SD1.5's num_heads
CONTEXT = 768
TIME_EMBED = 4        # time_embed_dim = 4 x model_channels
UNCOND_RATE = 0.1
SLIM_FILE = "optim-ref-sd15-slim.safetensors"   # shipped
FULL_FILE = "optim-ref-sd15.safetensors"        # expanded into the work folder


def unet_config(width: int) -> dict:
    """The UNetModel config ComfyUI's detection produces for the SD1.5 layout at `width`."""
    from bench.factory import sd_unet_config
    return sd_unet_config(width, [1, 1], 1, [1, 1], 1, CONTEXT, False, heads=HEADS)


def virtual_width_ops(ratio: float):
    """ComfyUI's default ops with GroupNorm / LayerNorm whose statistics count the wide model's
    zero channels: mean and mean square over the slim channels, times `ratio` (slim / wide)."""
    import comfy.ops
    base = comfy.ops.disable_weight_init

    def _norm(x, dims, weight, bias, eps):
        xf = x.float()
        mean = xf.mean(dim=dims, keepdim=True) * ratio
        var = (xf.pow(2).mean(dim=dims, keepdim=True) * ratio - mean.pow(2)).clamp_min(0.0)
        return ((xf - mean) * torch.rsqrt(var + eps)).to(x.dtype), weight, bias

    class GroupNorm(base.GroupNorm):
        def forward(self, x):
            b, c = x.shape[:2]
            g = x.reshape(b, self.num_groups, -1)
            y, w, bias = _norm(g, (-1,), self.weight, self.bias, self.eps)
            shape = (1, c) + (1,) * (x.dim() - 2)
            return y.reshape(x.shape) * w.view(shape) + bias.view(shape)

    class LayerNorm(base.LayerNorm):
        def forward(self, x):
            y, w, bias = _norm(x, (-1,), self.weight, self.bias, self.eps)
            return y * w + bias

    return type("VirtualWidthOps", (base,), {"GroupNorm": GroupNorm, "LayerNorm": LayerNorm})


def build(width: int = WIDTH, seed: int = 0):
    """A fresh slim SD15 BaseModel (ComfyUI's model_base.BaseModel with the SD1.5 model sampling)
    ready to train: PyTorch's default init, zero output layers of every residual branch and of the
    model (as the original UNet's `zero_module`)."""
    from bench import factory
    cfg = factory.model_config(factory.family("sd15"), "tiny", torch.float32, unet_config(width))
    cfg.custom_operations = virtual_width_ops(width / FULL)
    torch.manual_seed(seed)
    model = cfg.get_model({})
    dm = model.diffusion_model
    with torch.no_grad():
        for name, m in dm.named_modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                torch.nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5))  # PyTorch's default
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                m.weight.fill_(1.0)
                m.bias.zero_()
        for name, p in dm.named_parameters():
            if name.endswith(("out_layers.3.weight", "proj_out.weight", "out.2.weight")):
                p.zero_()
            p.requires_grad_(True)
    return model


def predict(model, x_t: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """The raw model output (predicted noise) as ComfyUI's `BaseModel._apply_model` computes it."""
    ms = model.model_sampling
    xc = ms.calculate_input(sigma, x_t)
    t = ms.timestep(sigma).float()
    return model.diffusion_model(xc, t, context=context)


# ---------------------------------------------------------------------------------------------
# slim -> SD1.5 expansion

def _channel_map(space: str, n: int, width: int) -> torch.Tensor:
    """Indices in the wide model of the `n` slim channels of `space`."""
    c = torch.arange(n)
    gs = width // 32                      # slim GroupNorm group size; the wide one's is 10
    dh = width // HEADS                   # slim head dim; the wide one's is 40
    half = width // 2
    res = lambda i: (i // gs) * (FULL // 32) + i % gs  # noqa: E731
    if space == "res":
        return res(c)
    if space == "cat":                    # output blocks read cat(h, skip)
        return torch.where(c < width, res(c), FULL + res(c - width))
    if space == "attn":
        return (c // dh) * (FULL // HEADS) + c % dh
    if space == "sin":                    # [cos | sin] of half frequencies: slim i = wide (FULL/width) i
        k = FULL // width
        return torch.where(c < half, c * k, FULL // 2 + (c - half) * k)
    if space == "geglu":                  # [value | gate] of the feed-forward's inner width
        inner = TIME_EMBED * width
        return torch.where(c < inner, c, TIME_EMBED * FULL + (c - inner))
    if space in ("temb", "ff", "id"):
        return c
    raise ValueError(space)


_FULL_SIZE = {"res": FULL, "cat": 2 * FULL, "attn": FULL, "sin": FULL, "geglu": 2 * TIME_EMBED * FULL,
              "temb": TIME_EMBED * FULL, "ff": TIME_EMBED * FULL}


def _spaces(key: str, shape, width: int) -> tuple[str, ...]:
    """What each of the first two dimensions of a slim parameter indexes."""
    def generic(n):
        return {width: "res", 2 * width: "cat"}.get(n, "id")
    if key.startswith("time_embed.0."):
        out = ("temb", "sin")
    elif key.startswith("time_embed.2."):
        out = ("temb", "temb")
    elif ".emb_layers.1." in key:
        out = ("res", "temb")
    elif any(f".{n}." in key for n in ("to_q", "to_k", "to_v")):
        out = ("attn", "id" if shape[-1] == CONTEXT else "res")
    elif ".to_out.0." in key:
        out = ("res", "attn")
    elif ".ff.net.0.proj." in key:
        out = ("geglu", "res")
    elif ".ff.net.2." in key:
        out = ("res", "ff")
    else:
        out = tuple(generic(n) for n in shape[:2])
    return out[:len(shape)]


def expand(slim: dict[str, torch.Tensor], width: int = WIDTH) -> dict[str, torch.Tensor]:
    """The 320-wide SD1.5 UNet state dict (fp32) that computes what the slim one computes."""
    q_scale = math.sqrt((FULL // HEADS) / (width // HEADS))
    out = {}
    for key, t in slim.items():
        t = t.float()
        spaces = _spaces(key, t.shape, width)
        shape = list(t.shape)
        index = []
        for d, space in enumerate(spaces[:2]):
            if space != "id":
                shape[d] = _FULL_SIZE[space]
            index.append(_channel_map(space, t.shape[d], width))
        full = torch.zeros(shape, dtype=torch.float32)
        if len(index) == 1:
            full[index[0]] = t
        else:
            full[index[0][:, None], index[1][None, :]] = t
        if ".to_q." in key:
            full = full * q_scale
        out[key] = full
    return out


def expanded_fp16(slim: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What `write_full` writes for these slim weights (rounded to fp16 first, as shipped)."""
    slim16 = {k: v.detach().float().to(torch.float16) for k, v in slim.items()}
    return {k: v.to(torch.float16).contiguous() for k, v in expand(slim16).items()}


def state_dict_digest(sd: dict[str, torch.Tensor]) -> str:
    """sha256 over the keys, dtypes, shapes and bits of a state dict (in key order)."""
    import hashlib
    h = hashlib.sha256()
    for key in sorted(sd):
        t = sd[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def shipped_state_dict(path: Path) -> dict[str, torch.Tensor]:
    import safetensors.torch
    return safetensors.torch.load_file(str(path))


def write_full(slim_path: Path, out_path: Path | None = None) -> Path:
    """Expand the shipped slim weights into the SD1.5 file UNETLoader reads (fp16), once: the
    file is rewritten when the slim weights change (their hash is in its metadata)."""
    import hashlib
    import safetensors
    import safetensors.torch
    out_path = Path(out_path or work_dir() / FULL_FILE)
    digest = hashlib.sha256(Path(slim_path).read_bytes()).hexdigest()
    if out_path.exists():
        with safetensors.safe_open(str(out_path), "pt") as f:
            if (f.metadata() or {}).get("slim_sha256") == digest:
                return out_path
    full = expanded_fp16(shipped_state_dict(slim_path))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp")
    safetensors.torch.save_file(full, str(tmp), metadata={"comfyui-optim": "reference sd15 unet (expanded)",
                                                          "slim_sha256": digest})
    tmp.replace(out_path)
    return out_path


# ---------------------------------------------------------------------------------------------
# training stage (called by bench.reference.train)

def _latents(n: int, seed: int, log) -> tuple[torch.Tensor, list[str]]:
    """`n` rendered scenes encoded by the trained 4-channel VAE, in the UNet's latent space."""
    from bench.reference.train import encoded_scenes
    return encoded_scenes(4, n, seed, log, "unet")


def _save_slim(dm, step, args):
    from bench.reference import WEIGHTS_DIR
    from bench.reference.train import _save_fp16
    sd = dict(dm.state_dict())
    _save_fp16(sd, WEIGHTS_DIR / SLIM_FILE,
               {"comfyui-optim": f"reference sd15 unet, slim width {WIDTH} (expand with bench.reference.unet)",
                "width": WIDTH, "seed": args.seed, "steps": step,
                # the expansion's bits, so any machine can check it regenerates the same file
                "expanded_sha256": state_dict_digest(expanded_fp16(sd))})


def stage_unet(args, log) -> dict:
    from bench.reference import WEIGHTS_DIR
    t0 = time.time()
    emb = torch.load(work_dir() / "embeddings.pt")
    index = {c: i for i, c in enumerate(emb["captions"])}
    cond_all = emb["cond"]
    empty = index[""]
    latents, captions = _latents(args.unet_samples, args.seed + 100, log)
    cap_idx = torch.tensor([index[c] for c in captions])
    model = build(WIDTH, args.seed)
    dm = model.diffusion_model
    if args.unet_resume:
        sd = shipped_state_dict(WEIGHTS_DIR / SLIM_FILE)
        dm.load_state_dict({k: v.float() for k, v in sd.items()})
        log(f"[unet] resumed from {SLIM_FILE}")
    ms = model.model_sampling
    params = [p for p in dm.parameters() if p.requires_grad]
    log(f"[unet] slim width {WIDTH}: {sum(p.numel() for p in params) / 1e6:.2f}M parameters")
    opt = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=0.0, betas=(0.9, 0.99))
    ema = copy.deepcopy(dm).requires_grad_(False)
    gen = torch.Generator().manual_seed(args.seed)
    steps, batch = args.unet_steps, args.unet_batch
    warmup = min(200, steps // 10)
    deadline = t0 + args.unet_max_minutes * 60 if args.unet_max_minutes else None
    losses = []
    step = 0
    for step in range(steps):
        lr = args.unet_lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, len(latents), (batch,), generator=gen)
        x0 = latents[idx]
        ci = cap_idx[idx].clone()
        ci[torch.rand(batch, generator=gen) < UNCOND_RATE] = empty
        context = cond_all[ci].float()
        t = torch.randint(0, len(ms.sigmas), (batch,), generator=gen)
        sigma = ms.sigmas[t].float()
        noise = torch.randn(x0.shape, generator=gen)
        x_t = x0 + sigma.view(-1, 1, 1, 1) * noise
        out = predict(model, x_t, sigma, context)
        loss = (out - noise).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.unet_ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), dm.parameters()):
                pe.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            log(f"[unet] step {step}/{steps} loss {sum(losses[-50:]) / len(losses[-50:]):.4f} lr {lr:.2e} "
                f"{time.time() - t0:.0f}s")
        if (step + 1) % 250 == 0 or step == steps - 1:
            _save_slim(ema, step + 1, args)
        if deadline and time.time() > deadline:
            log(f"[unet] time limit reached after {step + 1} steps")
            _save_slim(ema, step + 1, args)
            break
    return {"width": WIDTH, "expanded_channels": FULL, "parameters_slim": sum(p.numel() for p in params),
            "steps": step + 1, "batch": batch, "lr": args.unet_lr, "ema": args.unet_ema,
            "final_loss": sum(losses[-100:]) / len(losses[-100:]), "wall_s": time.time() - t0}
