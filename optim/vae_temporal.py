"""Temporal chunking for causal video VAEs (ComfyUI's Wan 2.1 and Wan 2.2 VAEs) with the causal
cache carried across chunks, so a chunked decode equals the whole-video decode (no temporal seams).

How ComfyUI's `WanVAE` works: `decode(z)` runs `self.decoder` once per latent frame and passes it a
list `feat_cache` holding, for every causal 3-D conv, the last frames it saw ('Rep' markers for the
temporal upsamplers' first frame); the list lives for one `decode` call only, and the outputs of all
frames are concatenated on the model's device. `encode(x)` does the same with pixel frames grouped
1, 4, 4, ... (Wan 2.2 keeps the list on the module and also passes `first_chunk=True` to the
decoder on a call's first frame.)

Chunking without copying that loop: `WanVAE.decode` / `encode` is called once per chunk of frames,
and a forward pre-hook on its `decoder` / `encoder` (registered only while our call runs) hands every
call one persistent cache list: the list the very first call created. A later chunk therefore starts
from exactly the state the whole-video call has at that frame; Wan 2.2's `first_chunk` is turned off
after the first chunk. Encode: a later chunk of 4n pixel frames is passed with one throwaway frame in
front (WanVAE.encode treats a call's first frame alone); the pre-hook shrinks that frame to 32x32,
runs it on a scratch cache, and a forward hook replaces its output by an empty tensor, so the 4-frame
groups behind it line up as in the whole-video encode.

With spatial tiles, each tile is decoded as its own video, chunk by chunk (tiles outside, chunks
inside): one tile's cache exists at a time and nothing needs moving between devices. What this
saves: WanVAE already decodes one latent frame at a time, so its activations are one frame's; but
it keeps the whole video's output on the VAE's device and copies it once per frame (`torch.cat`).
Chunked, only one chunk's output (of one tile) is on the device before it goes to the output
device (the CPU in ComfyUI).
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch

DUMMY_SIDE = 32   # pixels (or patchified cells) of the throwaway encode frame


def wan_classes() -> tuple[type, ...]:
    out = []
    for name in ("comfy.ldm.wan.vae", "comfy.ldm.wan.vae2_2"):
        try:
            out.append(importlib.import_module(name).WanVAE)
        except Exception:  # noqa: BLE001  an older ComfyUI without one of them
            pass
    return tuple(out)


def supports(first_stage_model) -> bool:
    """Whether `first_stage_model` decodes frame by frame with a `feat_cache` this module can carry."""
    classes = wan_classes()
    return bool(classes) and isinstance(first_stage_model, classes) \
        and hasattr(first_stage_model, "decoder") and hasattr(first_stage_model, "encoder")


class CarriedCache:
    """Hooks on a WanVAE's `decoder` or `encoder` that give all its calls one cache list, across any
    number of `WanVAE.decode` / `encode` calls (registered while used as a context manager)."""

    def __init__(self, part: torch.nn.Module):
        self.part = part
        self.cache: list | None = None
        self.dummy_pending = False     # the next call is the throwaway first frame of an encode chunk
        self._dummy: tuple | None = None
        self._handles: list = []

    def __enter__(self):
        self._handles = [self.part.register_forward_pre_hook(self._pre, with_kwargs=True),
                         self.part.register_forward_hook(self._post)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        self.dummy_pending, self._dummy = False, None
        return False

    def _pre(self, module, args, kwargs):
        cache = kwargs.get("feat_cache")
        if cache is None:
            return None
        if self.dummy_pending:
            x = args[0]
            small = x[..., :DUMMY_SIDE, :DUMMY_SIDE]
            self._dummy = (tuple(x.shape[-2:]), tuple(small.shape[-2:]))
            return (small, *args[1:]), {**kwargs, "feat_cache": [None] * len(cache)}
        self._dummy = None
        if self.cache is None:
            self.cache = cache                     # the first call's own list becomes the carried one
            return None
        kwargs = {**kwargs, "feat_cache": self.cache}
        if kwargs.get("first_chunk"):
            kwargs["first_chunk"] = False          # Wan 2.2: only the video's first frame is first
        return args, kwargs

    def _post(self, module, args, output):
        if self._dummy is None:
            return None
        (h, w), (sh, sw) = self._dummy
        self._dummy = None
        self.dummy_pending = False
        ry, rx = sh // output.shape[-2], sw // output.shape[-1]
        return output.new_empty((*output.shape[:2], 0, h // ry, w // rx))


def chunk_bounds(frames: int, chunk: int, first: int = 1, step: int = 1) -> list[tuple[int, int]]:
    """[start, end) input frame spans of `chunk` latent frames each. Decode: first=1, step=1 (latent
    frames). Encode (pixel frames, grouped 1 then `step`): the first span holds 1 + step*(chunk-1)
    frames, every later one step*chunk; trailing frames short of a group are dropped, as WanVAE.encode
    drops them."""
    if frames <= 0:
        return []
    usable = frames if step == 1 else 1 + step * ((frames - 1) // step)
    out, start = [], 0
    end = min(usable, first + step * (chunk - 1))
    while start < usable:
        out.append((start, end))
        start, end = end, min(usable, end + step * chunk)
    return out


def run_chunked(x: torch.Tensor, spans: list[tuple[int, int]], carried: CarriedCache,
                fn: Callable[[torch.Tensor], torch.Tensor], output_device,
                out_frames: Callable[[int], int] | None = None, dummy_after_first: bool = False) -> torch.Tensor:
    """`fn(x_chunk)` (one WanVAE decode/encode call) for each span of `x` ([B, C, T, H, W]), the
    cache carried from call to call; the outputs joined along time on `output_device`, each chunk's
    moved there as soon as it is made. `out_frames(T)`: output frames, to fill one preallocated
    tensor (else the chunks are concatenated)."""
    out, parts, written = None, [], 0
    with carried:
        for n, (t0, t1) in enumerate(spans):
            piece = x[:, :, t0:t1]
            if dummy_after_first and n > 0:
                piece = torch.cat([piece[:, :, :1], piece], dim=2)
                carried.dummy_pending = True
            part = fn(piece).to(output_device)
            if out_frames is not None:
                if out is None:
                    out = torch.empty((*part.shape[:2], out_frames(x.shape[2]), *part.shape[3:]),
                                      dtype=part.dtype, device=part.device)
                out[:, :, written:written + part.shape[2]] = part
            else:
                parts.append(part)
            written += part.shape[2]
            del part
    if out_frames is None:
        return torch.cat(parts, dim=2)
    if written != out.shape[2]:
        raise RuntimeError(f"temporal chunks gave {written} frames, expected {out.shape[2]}")
    return out
