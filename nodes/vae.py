"""OptimVAE (VAE -> VAE): single-pass feathered tiling, batch slicing and out-of-memory retry for
every downstream VAE Decode / VAE Encode."""
from comfy_api.latest import io

from ..optim import vae_tiling


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
                        "VAE Encode nodes downstream use it. Video latents are tiled in space with "
                        "all frames in each tile.",
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
            ],
            outputs=[io.Vae.Output(display_name="vae")],
        )

    @classmethod
    def validate_inputs(cls, tiling, tile_size, overlap, slice_size=0, vram_budget_gb=0.0,
                        min_tile_size=128):
        problems = vae_tiling.TilingParams(tiling, tile_size, overlap, slice_size, vram_budget_gb,
                                           min_tile_size).problems()
        return "; ".join(problems) if problems else True

    @classmethod
    def execute(cls, vae, tiling="auto", tile_size=512, overlap=64, slice_size=0, vram_budget_gb=0.0,
                min_tile_size=128) -> io.NodeOutput:
        params = vae_tiling.TilingParams(tiling, tile_size, overlap, slice_size, vram_budget_gb, min_tile_size)
        problems = params.problems()
        if problems:
            raise ValueError("OptimVAE: " + "; ".join(problems))
        return io.NodeOutput(vae_tiling.wrap_vae(vae, params))
