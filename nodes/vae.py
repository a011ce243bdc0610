"""OptimVAE (VAE -> VAE): single-pass feathered tiling, batch slicing and out-of-memory retry for
every downstream VAE Decode / VAE Encode."""
from comfy_api.latest import io

from ..optim import vae_tiling
from .messages import node_id_of, stats_sender


class OptimVAE(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OptimVAE",
            display_name="Optim VAE (tiling, slicing)",
            category="optim/memory",
            description="Returns the VAE with tiled, sliced decode and encode: one pass of evenly "
                        "sized tiles with feathered blending (ComfyUI's tiled decode runs three "
                        "passes), retried with smaller tiles on out-of-memory. Plain VAE Decode / "
                        "VAE Encode nodes downstream use it. Video latents are tiled in space and, "
                        "with temporal_chunk, decoded a few latent frames at a time with the causal "
                        "cache carried across chunks (Wan 2.1 / 2.2 VAEs: same output, no seams).",
            inputs=[
                io.Vae.Input("vae"),
                io.Combo.Input("tiling", options=list(vae_tiling.TILING_MODES), default="auto",
                               tooltip="auto: tile only when the estimated memory of a whole decode "
                                       "exceeds the free memory (or vram_budget_gb); always; off "
                                       "(slicing and the out-of-memory retry still apply)."),
                io.Int.Input("tile_size", default=512, min=64, max=8192, step=32,
                             tooltip="Largest tile side in pixels; tiles are made equal and as few as "
                                     "the overlap allows."),
                io.Int.Input("overlap", default=64, min=0, max=2048, step=8,
                             tooltip="Smallest overlap between tiles in pixels (at most tile_size/4); "
                                     "the overlap is cross-faded."),
                io.Int.Input("slice_size", default=0, min=0, max=4096,
                             tooltip="Samples decoded per call; 0: as many as the memory budget allows."),
                io.Float.Input("vram_budget_gb", default=0.0, min=0.0, max=1024.0, step=0.5,
                               tooltip="Memory budget for auto tiling and slicing; 0: the device's "
                                       "free memory."),
                io.Int.Input("min_tile_size", default=128, min=32, max=8192, step=32, optional=True,
                             tooltip="Out-of-memory retries halve the tile down to this many pixels, "
                                     "then stop with an error."),
                io.Int.Input("temporal_chunk", default=0, min=0, max=4096, optional=True,
                             tooltip="Video VAEs (Wan 2.1 / 2.2): latent frames per call, the causal "
                                     "cache carried from chunk to chunk so the video is the same as "
                                     "one call's; only one chunk's output (per tile) is on the device "
                                     "at a time. 0: all frames in one call."),
            ],
            hidden=[io.Hidden.unique_id],
            outputs=[io.Vae.Output(display_name="vae")],
        )

    @classmethod
    def validate_inputs(cls, tiling, tile_size, overlap, slice_size=0, vram_budget_gb=0.0,
                        min_tile_size=128, temporal_chunk=0):
        problems = vae_tiling.TilingParams(tiling, tile_size, overlap, slice_size, vram_budget_gb,
                                           min_tile_size, temporal_chunk).problems()
        return "; ".join(problems) if problems else True

    @classmethod
    def execute(cls, vae, tiling="auto", tile_size=512, overlap=64, slice_size=0, vram_budget_gb=0.0,
                min_tile_size=128, temporal_chunk=0) -> io.NodeOutput:
        params = vae_tiling.TilingParams(tiling, tile_size, overlap, slice_size, vram_budget_gb, min_tile_size,
                                         temporal_chunk)
        problems = params.problems()
        if problems:
            raise ValueError("OptimVAE: " + "; ".join(problems))
        return io.NodeOutput(vae_tiling.wrap_vae(vae, params, on_stats=stats_sender(node_id_of(cls), "vae")))
