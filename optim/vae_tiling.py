"""VAE tiling and batch slicing: one pass of evenly sized, feather-blended tiles.

ComfyUI's `VAE.decode_tiled` decodes the image three times (tiles of tile x tile, 2*tile x tile/2
and tile/2 x 2*tile) and averages the passes to hide seams, and its tiles start every
(tile - overlap) so the last one is often a sliver: about 3x the work of one pass. Here:

- the fewest tiles of at most `tile` that overlap by at least `overlap` cover each axis, all of
  the same size and evenly spread (so no sliver tiles and no wasted area);
- each tile's output is weighted by a linear ramp across every overlap it has with a neighbour
  (1 inside, falling towards its edge) and the weighted sum is normalised: a cross-fade that
  suppresses the tile-edge artefacts of the convolutions' zero padding in one pass;
- decode works on latents [B, C, H, W] and video latents [B, C, T, H, W] (spatial tiles, every
  frame in one tile: a video VAE's causal cache is never cut); encode the same in pixel space;
- out of memory: retry with tiles half the size, down to `min_tile` latent cells, then a clear
  error (never a partial or silently wrong image).

Plain torch; the ComfyUI adapter (`wrap_vae`) imports ComfyUI lazily.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch

log = logging.getLogger("comfyui-optim")
TILING_MODES = ("auto", "always", "off")


class TilingOutOfMemory(RuntimeError):
    pass


def is_oom(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def tile_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) spans covering [0, length): the fewest tiles of at most `tile` that overlap by
    at least `overlap`, all the same size, evenly spread."""
    if length <= tile:
        return [(0, length)]
    overlap = min(overlap, tile // 2)
    n = math.ceil((length - overlap) / (tile - overlap))
    size = min(tile, math.ceil((length + (n - 1) * overlap) / n))
    starts = [round(i * (length - size) / (n - 1)) for i in range(n)]
    return [(s, s + size) for s in starts]


def feather(spans: list[tuple[int, int]], i: int, scale: int) -> torch.Tensor:
    """Blend weights of tile `i` along one axis, in output cells (`scale` per input cell): a linear
    ramp over its overlap with each neighbour, 1 elsewhere."""
    start, end = spans[i]
    n = (end - start) * scale
    w = torch.ones(n, dtype=torch.float32)
    lo = (spans[i - 1][1] - start) * scale if i > 0 else 0
    hi = (end - spans[i + 1][0]) * scale if i + 1 < len(spans) else 0
    if lo > 0:
        w[:lo] = torch.minimum(w[:lo], torch.arange(1, lo + 1, dtype=torch.float32) / (lo + 1))
    if hi > 0:
        w[n - hi:] = torch.minimum(w[n - hi:], torch.arange(hi, 0, -1, dtype=torch.float32) / (hi + 1))
    return w


def tiled(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], grid_hw: tuple[int, int],
          in_scale: int, out_scale: int, tile: int, overlap: int, output_device=None) -> torch.Tensor:
    """Apply `fn` to overlapping spatial tiles of `x` ([..., H, W]) and blend the results.

    Spans are planned on a grid of `grid_hw` cells (the latent grid); a cell is `in_scale` input
    pixels and `out_scale` output pixels (decode: 1 and 8; encode: 8 and 1)."""
    ys, xs = tile_spans(grid_hw[0], tile, overlap), tile_spans(grid_hw[1], tile, overlap)
    acc = weight = None
    for iy, (y0, y1) in enumerate(ys):
        wy = feather(ys, iy, out_scale)
        for ix, (x0, x1) in enumerate(xs):
            part = fn(x[..., y0 * in_scale:y1 * in_scale, x0 * in_scale:x1 * in_scale].contiguous())
            part = part.to(output_device if output_device is not None else part.device, torch.float32)
            if part.shape[-2:] != ((y1 - y0) * out_scale, (x1 - x0) * out_scale):
                raise ValueError(f"tile output {tuple(part.shape[-2:])} does not match the scale "
                                 f"{out_scale} of its input span")
            w = wy[:, None] * feather(xs, ix, out_scale)[None, :]
            w = w.to(part.device)
            if acc is None:
                shape = (*part.shape[:-2], grid_hw[0] * out_scale, grid_hw[1] * out_scale)
                acc = torch.zeros(shape, dtype=torch.float32, device=part.device)
                weight = torch.zeros(shape[-2:], dtype=torch.float32, device=part.device)
            oy, ox = slice(y0 * out_scale, y1 * out_scale), slice(x0 * out_scale, x1 * out_scale)
            acc[..., oy, ox] += part * w
            weight[oy, ox] += w
            del part
    return acc / weight


@dataclass(frozen=True)
class TilingParams:
    tiling: str = "auto"          # auto: tile only when the estimate exceeds the budget
    tile_size: int = 512          # pixels
    overlap: int = 64             # pixels
    slice_size: int = 0           # samples per decode call; 0: as many as the budget allows
    vram_budget_gb: float = 0.0   # 0: the device's free memory
    min_tile_size: int = 128      # pixels: the smallest tile an out-of-memory retry goes down to
    temporal_chunk: int = 0       # latent frames per video VAE call, causal cache carried; 0: off

    def floor_cells(self, ratio: int) -> int:
        return max(1, min(self.min_tile_size, self.tile_size) // ratio)

    def problems(self) -> list[str]:
        out = []
        if self.tiling not in TILING_MODES:
            out.append(f"tiling must be one of {TILING_MODES}, got {self.tiling!r}")
        if self.tile_size < 64:
            out.append(f"tile_size must be >= 64 pixels, got {self.tile_size}")
        if not 0 <= self.overlap <= self.tile_size // 4:
            out.append(f"overlap must be between 0 and tile_size / 4 ({self.tile_size // 4}), got {self.overlap}")
        if self.slice_size < 0:
            out.append(f"slice_size must be >= 0, got {self.slice_size}")
        if self.vram_budget_gb < 0:
            out.append(f"vram_budget_gb must be >= 0, got {self.vram_budget_gb}")
        if self.min_tile_size < 32:
            out.append(f"min_tile_size must be >= 32 pixels, got {self.min_tile_size}")
        if self.temporal_chunk < 0:
            out.append(f"temporal_chunk must be >= 0 latent frames (0: off), got {self.temporal_chunk}")
        return out


@dataclass
class Plan:
    tile: int | None              # latent cells per tile side; None: no tiling
    overlap: int
    slice_size: int


def plan(params: TilingParams, grid_hw: tuple[int, int], batch: int, ratio: int,
         estimate: Callable[[int, int, int], float], budget: float) -> Plan:
    """Tiling and slicing for a `batch` of `grid_hw` latents. `estimate(n, h, w)`: bytes a call on
    n samples of h x w latent cells needs; `budget`: bytes available."""
    tile = max(1, params.tile_size // ratio)
    overlap = params.overlap // ratio
    h, w = grid_hw
    whole = estimate(1, h, w)
    use_tiles = params.tiling == "always" or (params.tiling == "auto" and whole > budget)
    if use_tiles and max(h, w) <= tile and params.tiling == "auto":
        # the whole image is one tile already: tiling cannot help, smaller tiles might
        while tile > params.floor_cells(ratio) and estimate(1, min(h, tile), min(w, tile)) > budget:
            tile //= 2
    if not use_tiles:
        tile = None
        per = whole
    else:
        per = estimate(1, min(h, tile), min(w, tile))
    slice_size = params.slice_size or max(1, int(budget // max(per, 1)))
    return Plan(tile, overlap, min(slice_size, batch))


def run_sliced(x: torch.Tensor, plan_: Plan, call: Callable[[torch.Tensor, Plan], torch.Tensor]) -> torch.Tensor:
    out = None
    for i in range(0, x.shape[0], plan_.slice_size):
        part = call(x[i:i + plan_.slice_size], plan_)
        if out is None:
            out = torch.empty((x.shape[0], *part.shape[1:]), dtype=part.dtype, device=part.device)
        out[i:i + part.shape[0]] = part
    return out


def with_oom_retry(x: torch.Tensor, plan_: Plan, call, grid_hw: tuple[int, int], min_tile: int,
                   what: str = "VAE decode", record: dict | None = None) -> torch.Tensor:
    """`run_sliced` that, on out-of-memory, decodes one sample at a time, then tiles (halving the
    tile each time) down to `min_tile` cells, then raises TilingOutOfMemory. `record`, if given,
    gets the number of attempts ("passes") and the plan that succeeded ("plan")."""
    current = plan_
    attempts = 0
    while True:
        attempts += 1
        if record is not None:
            record.update(passes=attempts, plan=current)
        try:
            return run_sliced(x, current, call)
        except Exception as e:  # noqa: BLE001  only out-of-memory errors are retried
            if not is_oom(e):
                raise
            error = str(e).splitlines()[0] if str(e) else type(e).__name__
        if current.slice_size > 1:
            nxt = Plan(current.tile, current.overlap, 1)
        elif current.tile is None:
            nxt = Plan(max(min_tile, max(grid_hw) // 2), current.overlap, 1)
        elif current.tile // 2 >= min_tile:
            nxt = Plan(current.tile // 2, min(current.overlap, current.tile // 8), 1)
        else:
            raise TilingOutOfMemory(
                f"{what} ran out of memory even with {current.tile}x{current.tile}-cell tiles, one "
                f"sample at a time (the floor, min_tile_size, is {min_tile} cells): free memory, lower "
                f"min_tile_size or decode a smaller image. Last error: {error}")
        log.warning("%s ran out of memory (tile %s, slice %d); retrying with tile %s, slice %d",
                    what, current.tile, current.slice_size, nxt.tile, nxt.slice_size)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        current = nxt


# ---------------------------------------------------------------------------------------------
# ComfyUI adapter: a VAE whose decode/encode tile and slice (VAE Decode / VAE Encode call these)

_wrapped_classes: dict[type, type] = {}


def wrap_vae(vae, params: TilingParams, on_stats: Callable[[dict], None] | None = None):
    """A copy of ComfyUI's `vae` (same model, patcher and settings; nothing of `vae` changes) whose
    `decode` and `encode` use `params`. `decode_tiled`/`encode_tiled` (VAEDecodeTiled) are ComfyUI's.
    `on_stats(stats)` is called after each decode/encode with what it did."""
    base_cls = type(vae)
    if getattr(base_cls, "_optim_tiling", False):
        base_cls = base_cls.__mro__[1]
    if base_cls not in _wrapped_classes:
        _wrapped_classes[base_cls] = type("Optim" + base_cls.__name__, (base_cls,),
                                          {"decode": _decode, "encode": _encode, "_optim_tiling": True})
    new = object.__new__(_wrapped_classes[base_cls])
    new.__dict__.update(vae.__dict__)
    new.optim_tiling = params
    new.optim_on_stats = on_stats
    new.optim_last = None
    return new


def _spatial_kind(vae, ndim: int) -> bool:
    """Whether this VAE and input rank are handled here (2D images, 3D videos tiled in space)."""
    return vae.extra_1d_channel is None and vae.latent_dim in (2, 3) and ndim in (4, 5)


def _budget(vae, params: TilingParams) -> float:
    import comfy.model_management as mm
    if params.vram_budget_gb > 0:
        return params.vram_budget_gb * 2**30
    return float(mm.get_free_memory(vae.device))


def _temporal_chunk(vae, params: TilingParams, ndim: int) -> int:
    """Latent frames per call for a video input, 0 when not chunking (off, images, or a video VAE
    whose cache cannot be carried: a warning names it and every frame is decoded in one call)."""
    if not params.temporal_chunk or ndim != 5:
        return 0
    from . import vae_temporal
    if not vae_temporal.supports(vae.first_stage_model):
        log.warning("OptimVAE: temporal_chunk has no effect on %s (only Wan 2.1 / 2.2 VAEs carry their "
                    "causal cache across chunks); decoding all frames in one call",
                    type(vae.first_stage_model).__name__)
        return 0
    return params.temporal_chunk


def _frames(ratio, n: int) -> int:
    return int(ratio(n)) if callable(ratio) else n * ratio


class _RunStats:
    """What one decode/encode did, for the frontend badges (and `vae.optim_last`)."""

    def __init__(self, vae):
        self.vae = vae
        self.cuda = getattr(vae.device, "type", str(vae.device)) == "cuda" and torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(vae.device)
        self.record: dict = {}
        self.chunks = 0

    def finish(self, grid: tuple[int, int], ratio: int, slice_size_default: int) -> dict:
        p: Plan | None = self.record.get("plan")
        tile = p.tile if p is not None else None
        tiles = 1 if tile is None else len(tile_spans(grid[0], tile, p.overlap)) * len(tile_spans(grid[1], tile, p.overlap))
        stats = {"tiles": tiles, "passes": self.record.get("passes", 1), "tile_size": tile * ratio if tile else 0,
                 "temporal_chunks": self.chunks, "slice_size": p.slice_size if p else slice_size_default}
        if self.cuda:
            stats["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(self.vae.device))
        self.vae.optim_last = {"tile_px": tile * ratio if tile else None, "slice_size": stats["slice_size"],
                               **stats}
        if self.vae.optim_on_stats is not None:
            self.vae.optim_on_stats(dict(stats))
        return stats


def _decode(self, samples_in, vae_options={}):
    import comfy.model_management as mm
    from . import vae_temporal
    self.throw_exception_if_invalid()
    params: TilingParams = self.optim_tiling
    chunk = _temporal_chunk(self, params, samples_in.ndim)
    if params.tiling == "off" and params.slice_size == 0 and not chunk or not _spatial_kind(self, samples_in.ndim):
        return type(self).__mro__[1].decode(self, samples_in, vae_options)
    run_stats = _RunStats(self)
    ratio = self.spacial_compression_decode()
    grid = tuple(samples_in.shape[-2:])

    def estimate(n, h, w):
        return n * self.memory_used_decode((1, *samples_in.shape[1:-2], h, w), self.vae_dtype)

    mm.load_models_gpu([self.patcher], memory_required=estimate(1, *grid), force_full_load=self.disable_offload)
    the_plan = plan(params, grid, samples_in.shape[0], ratio, estimate, _budget(self, params))

    def decode_fn(z):
        return self.first_stage_model.decode(z.to(self.vae_dtype).to(self.device), **vae_options)

    def chunked(z):   # one tile (or the whole frame) as a video, `chunk` latent frames a call
        spans = vae_temporal.chunk_bounds(z.shape[2], chunk)
        run_stats.chunks = len(spans)
        return vae_temporal.run_chunked(z, spans, vae_temporal.CarriedCache(self.first_stage_model.decoder),
                                        decode_fn, self.output_device,
                                        out_frames=lambda n: _frames(self.upscale_ratio[0], n))

    def call(batch, p: Plan):
        run_stats.chunks = 1 if batch.ndim == 5 else 0
        fn = chunked if chunk and batch.shape[2] > chunk else decode_fn
        if p.tile is None:
            return fn(batch).to(self.output_device).float()
        return tiled(batch, fn, grid, 1, ratio, p.tile, p.overlap, self.output_device)

    out = with_oom_retry(samples_in, the_plan, call, grid, params.floor_cells(ratio), "VAE decode",
                         record=run_stats.record)
    run_stats.finish(grid, ratio, the_plan.slice_size)
    return self.process_output(out).to(self.output_device).movedim(1, -1)


def _encode(self, pixel_samples):
    import comfy.model_management as mm
    from . import vae_temporal
    self.throw_exception_if_invalid()
    params: TilingParams = self.optim_tiling
    if self.extra_1d_channel is not None or self.latent_dim not in (2, 3):
        return type(self).__mro__[1].encode(self, pixel_samples)
    chunk = _temporal_chunk(self, params, 5 if self.latent_dim == 3 else pixel_samples.ndim)
    if params.tiling == "off" and params.slice_size == 0 and not chunk:
        return type(self).__mro__[1].encode(self, pixel_samples)
    run_stats = _RunStats(self)
    pixels = self.vae_encode_crop_pixels(pixel_samples).movedim(-1, 1)
    if self.latent_dim == 3 and pixels.ndim < 5:   # as ComfyUI's encode: frames on their own axis
        pixels = pixels.movedim(1, 0).unsqueeze(0) if not self.not_video else pixels.unsqueeze(2)
    ratio = self.spacial_compression_encode()
    grid = (pixels.shape[-2] // ratio, pixels.shape[-1] // ratio)

    def estimate(n, h, w):
        return n * self.memory_used_encode((1, *pixels.shape[1:-2], h * ratio, w * ratio), self.vae_dtype)

    mm.load_models_gpu([self.patcher], memory_required=estimate(1, *grid), force_full_load=self.disable_offload)
    the_plan = plan(params, grid, pixels.shape[0], ratio, estimate, _budget(self, params))

    def encode_fn(px):
        return self.first_stage_model.encode(self.process_input(px).to(self.vae_dtype).to(self.device))

    def chunked(px):   # WanVAE groups pixel frames 1, 4, 4, ...: `chunk` latent frames a call
        spans = vae_temporal.chunk_bounds(px.shape[2], chunk, step=self.downscale_index_formula[0])
        run_stats.chunks = len(spans)
        return vae_temporal.run_chunked(px, spans, vae_temporal.CarriedCache(self.first_stage_model.encoder),
                                        encode_fn, self.output_device,
                                        out_frames=lambda n: _frames(self.downscale_ratio[0], n),
                                        dummy_after_first=True)

    def call(batch, p: Plan):
        run_stats.chunks = 1 if batch.ndim == 5 else 0
        first_span = 1 + self.downscale_index_formula[0] * (chunk - 1) if chunk else 0
        fn = chunked if chunk and batch.ndim == 5 and batch.shape[2] > first_span else encode_fn
        if p.tile is None:
            return fn(batch).to(self.output_device).float()
        return tiled(batch, fn, grid, ratio, 1, p.tile, p.overlap, self.output_device)

    out = with_oom_retry(pixels, the_plan, call, grid, params.floor_cells(ratio), "VAE encode",
                         record=run_stats.record)
    run_stats.finish(grid, ratio, the_plan.slice_size)
    return out
