"""OptimDeepCache: DeepCache on UNet models (MODEL -> MODEL)."""
import logging

from comfy_api.latest import io

from ..optim import deepcache
from .messages import node_id_of, stats_sender

log = logging.getLogger("comfyui-optim")


class OptimDeepCache(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OptimDeepCache",
            display_name="Optim DeepCache (UNet)",
            category="optim/caching",
            description="Reuses the UNet's deep features between full steps and recomputes only the "
                        "shallow branch on the others (DeepCache). For SD1.x, SD2.x, SDXL and SVD; "
                        "other models pass through with a warning.",
            inputs=[
                io.Model.Input("model"),
                io.Int.Input("cache_interval", default=3, min=1, max=1000,
                             tooltip="Run the whole UNet every N steps; 1 means no caching."),
                io.Int.Input("cache_branch_id", default=0, min=0, max=64,
                             tooltip="Shallow branch that is recomputed: 0 is the shallowest (fastest); "
                                     "deeper branches are slower and closer to the original."),
                io.Combo.Input("skip_mode", options=list(deepcache.SKIP_MODES), default="uniform",
                               tooltip="uniform: full step every cache_interval steps. non-uniform: the "
                                       "paper's quadratic schedule, denser around `center`."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Caching is allowed from this point of the schedule."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="... up to this point; outside, every step is full."),
                io.Int.Input("center", default=15, min=0, max=1000,
                             tooltip="non-uniform only: step around which full steps are densest."),
                io.Float.Input("power", default=1.4, min=1.01, max=4.0, step=0.01,
                               tooltip="non-uniform only: exponent of the quadratic spacing."),
            ],
            outputs=[io.Model.Output(display_name="model")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, skip_mode, start_percent, end_percent):
        # ComfyUI keeps its own range checks (value_smaller_than_min, ...) for every input this
        # signature leaves out. skip_mode is here because this ComfyUI does not check V3 combos.
        if skip_mode not in deepcache.SKIP_MODES:
            return f"skip_mode must be one of {deepcache.SKIP_MODES}, got {skip_mode!r}"
        if not 0.0 <= start_percent < end_percent <= 1.0:
            return f"need 0 <= start_percent < end_percent <= 1, got {start_percent} / {end_percent}"
        return True

    @classmethod
    def execute(cls, model, cache_interval=3, cache_branch_id=0, skip_mode="uniform",
                start_percent=0.0, end_percent=1.0, center=15, power=1.4) -> io.NodeOutput:
        dm = model.get_model_object("diffusion_model")
        if not deepcache.supports(dm):
            log.warning("OptimDeepCache: %s (%s) is not a UNet model; DeepCache does not apply, the "
                        "model passes through unchanged", type(model.model).__name__, type(dm).__name__)
            return io.NodeOutput(model)
        params = deepcache.DeepCacheParams(cache_interval, cache_branch_id, skip_mode, center, power,
                                           start_percent, end_percent)
        problems = params.problems(max_branch=deepcache.max_branch(dm))
        if problems:
            raise ValueError("OptimDeepCache: " + "; ".join(problems))
        patched = model.clone()
        deepcache.attach(patched, params, on_run_end=stats_sender(node_id_of(cls), "deepcache"))
        return io.NodeOutput(patched)
