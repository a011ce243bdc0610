"""Fidelity of an optimized output against the unoptimized one: PSNR and SSIM.

Plain torch, no ComfyUI: used by the benchmarks, the configuration search and the tests.
"""
from __future__ import annotations

import math

import torch


def psnr(reference: torch.Tensor, candidate: torch.Tensor, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB; +inf when the tensors are equal.

    `data_range` defaults to the reference's peak-to-peak range (latents have no fixed range;
    images in ComfyUI's IMAGE format use 1.0)."""
    if reference.shape != candidate.shape:
        raise ValueError(f"shape mismatch: {tuple(reference.shape)} vs {tuple(candidate.shape)}")
    ref, cand = reference.detach().double(), candidate.detach().double()
    mse = float(torch.mean((ref - cand) ** 2))
    if mse == 0.0:
        return math.inf
    if data_range is None:
        data_range = float(ref.max() - ref.min()) or 1.0
    return 10.0 * math.log10(data_range ** 2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(reference: torch.Tensor, candidate: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean structural similarity (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5,
    K1 0.01, K2 0.03) of images in ComfyUI's IMAGE layout ``[..., H, W, C]``; leading dimensions
    (batch, frames) are treated as separate images. 1.0 when equal."""
    if reference.shape != candidate.shape:
        raise ValueError(f"shape mismatch: {tuple(reference.shape)} vs {tuple(candidate.shape)}")
    if reference.dim() < 3:
        raise ValueError("ssim expects images shaped [..., H, W, C]")
    h, w, c = reference.shape[-3:]
    to_nchw = lambda t: t.detach().double().reshape(-1, h, w, c).permute(0, 3, 1, 2).reshape(-1, 1, h, w)
    x, y = to_nchw(reference), to_nchw(candidate)
    size = min(11, h, w)
    window = _gaussian_window(size).to(x)[None, None]
    conv = lambda t: torch.nn.functional.conv2d(t, window)
    mu_x, mu_y = conv(x), conv(y)
    var_x = conv(x * x) - mu_x ** 2
    var_y = conv(y * y) - mu_y ** 2
    cov = conv(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return float(s.mean())
