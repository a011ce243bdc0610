"""A TAESD-format VAE trained on the procedural scenes, for the reference denoisers' latents.

ComfyUI's `VAELoader` detects TAESD from its keys (`taesd_decoder.1.weight`; latent channels from
that weight's shape) and loads `vae_scale` / `vae_shift` with the rest of the state dict, so the
shipped file also carries the scaling that maps our encoder's latents to unit variance in the
denoiser's latent space (after the family's own `latent_format` scale and shift).

Training a full-width TAESD (64 channels at every resolution, 2.4M parameters) takes hours on a
2-core CPU. We train a *slim* network instead whose function embeds exactly in TAESD's layout:
each resolution uses fewer channels (the rest are zero weights, so they stay zero through every
ReLU), and unused blocks have zero convolutions, which makes `Block(x) = relu(0 + x)`: the slim
network's skipped blocks are plain ReLUs. `export()` writes the zero-padded TAESD state dict and
`tests/bench/test_reference.py` checks it against ComfyUI's TAESD.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn

from bench.reference import dataset as ds

TAESD_WIDTH = 64


# (kind, in, out, active): kinds "conv" (3x3, bias), "down" (3x3 stride 2, no bias),
# "up" (nearest x2 then 3x3, no bias), "block" (TAESD Block, in == out), "clamp", "relu".
def encoder_layout(latent_channels: int) -> list[tuple]:
    return [("conv", 3, 8, True), ("block", 8, 8, True),
            ("down", 8, 16, True), ("block", 16, 16, True), ("block", 16, 16, False), ("block", 16, 16, False),
            ("down", 16, 32, True), ("block", 32, 32, True), ("block", 32, 32, False), ("block", 32, 32, False),
            ("down", 32, 64, True), ("block", 64, 64, True), ("block", 64, 64, False), ("block", 64, 64, False),
            ("conv", 64, latent_channels, True)]


def decoder_layout(latent_channels: int) -> list[tuple]:
    return [("clamp", 0, 0, True), ("conv", latent_channels, 64, True), ("relu", 0, 0, True),
            ("block", 64, 64, True), ("block", 64, 64, True), ("block", 64, 64, False),
            ("up", 64, 32, True),
            ("block", 32, 32, True), ("block", 32, 32, False), ("block", 32, 32, False),
            ("up", 32, 16, True),
            ("block", 16, 16, True), ("block", 16, 16, False), ("block", 16, 16, False),
            ("up", 16, 8, True),
            ("block", 8, 8, True), ("conv", 8, 3, True)]


def _conv(cin, cout, stride=1, bias=True):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias)


class SlimBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Sequential(_conv(c, c), nn.ReLU(), _conv(c, c), nn.ReLU(), _conv(c, c))

    def forward(self, x):
        return torch.relu(self.conv(x) + x)


class Clamp(nn.Module):
    def forward(self, x):
        return torch.tanh(x / 3) * 3


class Up(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = _conv(cin, cout, bias=False)

    def forward(self, x):
        return self.conv(nn.functional.interpolate(x, scale_factor=2, mode="nearest"))


def _layer(kind, cin, cout, active):
    if kind == "conv":
        return _conv(cin, cout)
    if kind == "down":
        return _conv(cin, cout, stride=2, bias=False)
    if kind == "up":
        return Up(cin, cout)
    if kind == "block":
        return SlimBlock(cin) if active else nn.ReLU()
    if kind == "clamp":
        return Clamp()
    return nn.ReLU()


class SlimTAESD(nn.Module):
    """Encoder (image in [0, 1] -> latent) and decoder (latent -> image in [0, 1]) whose weights
    export to TAESD's layout."""

    def __init__(self, latent_channels: int):
        super().__init__()
        self.latent_channels = latent_channels
        self.enc_layout = encoder_layout(latent_channels)
        self.dec_layout = decoder_layout(latent_channels)
        self.encoder = nn.Sequential(*[_layer(*spec) for spec in self.enc_layout])
        self.decoder = nn.Sequential(*[_layer(*spec) for spec in self.dec_layout])
        self._init_colour_path()

    @torch.no_grad()
    def _init_colour_path(self, colour: int = 3):
        """Start as a working autoencoder of the blurry picture: channels 0-2 carry the RGB
        colour through every layer (2x2 mean pooling in the strided convolutions, copies
        elsewhere, blocks leave them alone), so latent channels 0-2 begin as the 8x8 block means
        and the decoder begins by upsampling them. Training refines from there; it converges
        several times faster than from a random start, which matters on a CPU."""
        eye = torch.zeros(colour, colour, 3, 3)
        pool = torch.zeros(colour, colour, 3, 3)
        for c in range(colour):
            eye[c, c, 1, 1] = 1.0
            pool[c, c, 1:, 1:] = 0.25  # rows/cols 2i, 2i+1 of a stride-2, padding-1 kernel
        for layout, seq in ((self.enc_layout, self.encoder), (self.dec_layout, self.decoder)):
            for (kind, cin, cout, active), mod in zip(layout, seq):
                if kind == "block" and active:
                    last = mod.conv[4]
                    last.weight[:colour] = 0.0
                    last.bias[:colour] = 0.0
                elif kind in ("conv", "down", "up"):
                    conv = mod.conv if kind == "up" else mod
                    conv.weight[:colour] *= 0.05
                    conv.weight[:colour, :colour] = pool if kind == "down" else eye
                    if conv.bias is not None:
                        conv.bias[:colour] = 0.0

    def encode(self, img01):
        return self.encoder(img01)

    def decode(self, z):
        return self.decoder(z)

    def export(self, vae_scale: float = 1.0, vae_shift: float = 0.0) -> dict[str, torch.Tensor]:
        """The TAESD state dict (keys as `comfy.taesd.taesd.TAESD` names them), zero-padded."""
        out: dict[str, torch.Tensor] = {}
        for prefix, layout, seq in (("taesd_encoder", self.enc_layout, self.encoder),
                                    ("taesd_decoder", self.dec_layout, self.decoder)):
            i = -1  # index in TAESD's nn.Sequential: an "up" is two entries there (Upsample, conv)
            for n, ((kind, cin, cout, active), mod) in enumerate(zip(layout, seq)):
                i += 2 if kind == "up" else 1
                full_in = 3 if cin == 3 else TAESD_WIDTH
                full_out = cout if cout in (3, self.latent_channels) and n == len(layout) - 1 else TAESD_WIDTH
                if kind == "conv":
                    out.update(_padded(f"{prefix}.{i}", mod, full_in, full_out, bias=True))
                elif kind in ("down", "up"):
                    conv = mod.conv if kind == "up" else mod
                    out.update(_padded(f"{prefix}.{i}", conv, TAESD_WIDTH, TAESD_WIDTH, bias=False))
                elif kind == "block":
                    for j in (0, 2, 4):
                        name = f"{prefix}.{i}.conv.{j}"
                        if active:
                            out.update(_padded(name, mod.conv[j], TAESD_WIDTH, TAESD_WIDTH, bias=True))
                        else:
                            out[name + ".weight"] = torch.zeros(TAESD_WIDTH, TAESD_WIDTH, 3, 3)
                            out[name + ".bias"] = torch.zeros(TAESD_WIDTH)
        # encoder's first conv reads 3 channels; the decoder's first conv reads the latent
        out["taesd_decoder.1.weight"] = _pad(self.decoder[1].weight, (TAESD_WIDTH, self.latent_channels, 3, 3))
        out["vae_scale"] = torch.tensor(float(vae_scale))
        out["vae_shift"] = torch.tensor(float(vae_shift))
        return out


def _pad(t: torch.Tensor, shape) -> torch.Tensor:
    full = torch.zeros(shape, dtype=torch.float32)
    full[tuple(slice(0, s) for s in t.shape)] = t.detach().float()
    return full


def _padded(name, conv, full_in, full_out, bias):
    w = conv.weight
    sd = {name + ".weight": _pad(w, (full_out, full_in if w.shape[1] != 3 else 3, 3, 3))}
    if bias:
        sd[name + ".bias"] = _pad(conv.bias, (full_out,))
    return sd


def batch_images(rng: np.random.Generator, n: int) -> torch.Tensor:
    imgs = np.stack([ds.render(ds.random_scene(rng), rng) for _ in range(n)])
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()


def finetune_decoder(vae: SlimTAESD, steps: int = 1500, batch: int = 16, seed: int = 1, lr: float = 5e-4,
                     log=print) -> dict:
    """More decoder training with the encoder frozen: sharper images from the same latents, so a
    denoiser trained on those latents stays valid."""
    torch.manual_seed(seed)
    rng = np.random.Generator(np.random.PCG64(seed + 1000))
    vae.encoder.requires_grad_(False)
    opt = torch.optim.Adam(vae.decoder.parameters(), lr=lr)
    t0 = time.time()
    stats = {}
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        x = batch_images(rng, batch)
        with torch.no_grad():
            z = vae.encode(x)
        y = vae.decode(z + 0.05 * z.std() * torch.randn_like(z))
        rec = (y - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        rec.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            psnr = -10 * math.log10(max(rec.item(), 1e-10))
            log(f"[vae-decoder] step {step}/{steps} mse {rec.item():.5f} ({psnr:.1f} dB) {time.time() - t0:.0f}s")
            stats = {"mse": rec.item(), "psnr": psnr}
    stats["seconds"] = time.time() - t0
    return stats


def train(latent_channels: int = 16, steps: int = 1500, batch: int = 24, seed: int = 0,
          lr: float = 2e-3, crop_fraction: float = 0.5, log=print) -> tuple[SlimTAESD, dict]:
    """Train the slim VAE on freshly rendered scenes (reconstruction MSE, with noise on the
    latent so the decoder tolerates a denoiser's small errors, and a small latent penalty that
    keeps latents inside the decoder's tanh clamp)."""
    torch.manual_seed(seed)
    rng = np.random.Generator(np.random.PCG64(seed + 1))
    vae = SlimTAESD(latent_channels)
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    t0 = time.time()
    stats = {}
    for step in range(steps):
        for g in opt.param_groups:  # cosine decay to 5%
            g["lr"] = lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        x = batch_images(rng, batch)
        if step < steps * crop_fraction:  # random 32x32 crops on the 8-px latent grid: 4x cheaper
            oy, ox = (int(v) * 8 for v in rng.integers(0, 5, size=2))
            x = x[:, :, oy:oy + 32, ox:ox + 32]
        z = vae.encode(x)
        z_noisy = z + 0.05 * z.detach().std() * torch.randn_like(z)
        y = vae.decode(z_noisy)
        rec = (y - x).pow(2).mean()
        loss = rec + 1e-4 * z.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            psnr = -10 * math.log10(max(rec.item(), 1e-10))
            log(f"[vae{latent_channels}] step {step}/{steps} mse {rec.item():.5f} ({psnr:.1f} dB) "
                f"|z| {z.detach().abs().mean():.2f} {time.time() - t0:.0f}s")
            stats = {"mse": rec.item(), "psnr": psnr}
    stats["seconds"] = time.time() - t0
    return vae, stats


@torch.no_grad()
def latent_stats(vae: SlimTAESD, images: torch.Tensor) -> tuple[float, float]:
    z = torch.cat([vae.encode(images[i:i + 256]) for i in range(0, len(images), 256)])
    return float(z.mean()), float(z.std())


def scaling_for(latent_format, mean: float, std: float) -> tuple[float, float]:
    """(vae_scale, vae_shift) so that the denoiser sees (z - mean) / std: ComfyUI's TAESD encode
    gives z / vae_scale + vae_shift, and the model works on (that - shift) * scale_factor."""
    f = latent_format.scale_factor
    shift = getattr(latent_format, "shift_factor", 0.0) or 0.0
    return f * std, shift - mean / (std * f)
