"""OptimTGate: T-GATE on UNet models (MODEL -> MODEL)."""
import logging

from comfy_api.latest import io

from ..optim import tgate
from .messages import node_id_of, stats_sender

log = logging.getLogger("comfyui-optim")


class OptimTGate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OptimTGate",
            display_name="Optim T-GATE",
            category="optim/caching",
            description="Stops computing cross-attention after a gate step and reuses its CFG-averaged "
                        "output (T-GATE); drops the unconditional pass after the gate. For SD1.x, "
                        "SD2.x, SDXL and LCM UNets and PixArt-alpha/sigma; stacks with Optim "
                        "DeepCache in either order.",
            inputs=[
                io.Model.Input("model"),
                io.Float.Input("gate_percent", default=0.4, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps after which cross-attention is frozen; "
                                       "1.0 never gates (output identical to the input model)."),
                io.Int.Input("gate_step", default=-1, min=-1, max=10000,
                             tooltip="Absolute gate step; -1 uses gate_percent."),
                io.Int.Input("self_attn_interval", default=0, min=0, max=100,
                             tooltip="T-GATE v2: before the gate, compute self-attention every k "
                                     "steps and reuse it in between; 0 = off."),
                io.Boolean.Input("drop_uncond", default=True,
                                 tooltip="After the gate, skip the unconditional pass (cond and uncond "
                                         "then share cross-attention, so CFG has nothing to add)."),
            ],
            outputs=[io.Model.Output(display_name="model")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, gate_percent=0.4, gate_step=-1, self_attn_interval=0,
                drop_uncond=True) -> io.NodeOutput:
        dm = model.get_model_object("diffusion_model")
        if not tgate.supports(dm):
            log.warning("OptimTGate: %s (%s) is neither a UNet nor PixArt; T-GATE does not apply, the "
                        "model passes through unchanged", type(model.model).__name__, type(dm).__name__)
            return io.NodeOutput(model)
        params = tgate.TGateParams(gate_percent, gate_step, self_attn_interval, drop_uncond)
        problems = params.problems()
        if problems:
            raise ValueError("OptimTGate: " + "; ".join(problems))
        patched = model.clone()
        tgate.attach(patched, params, on_run_end=stats_sender(node_id_of(cls), "tgate"))
        return io.NodeOutput(patched)
