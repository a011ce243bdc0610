"""OptimAttentionBackend and OptimChannelsLast (MODEL -> MODEL): the memory guide's speed knobs,
per model, without restarting ComfyUI with other flags."""
import logging

from comfy_api.latest import io

from ..optim import speed_knobs
from .messages import node_id_of, stats_sender

log = logging.getLogger("comfyui-optim")


class OptimAttentionBackend(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OptimAttentionBackend",
            display_name="Optim Attention Backend",
            category="optim/speed",
            description="Routes every attention call of this model to the chosen backend through "
                        "ComfyUI's attention override: PyTorch SDPA, sub-quadratic, split, or "
                        "xformers / flash-attn / SageAttention when installed (else a validation "
                        "error). Other branches keep ComfyUI's start-up choice.",
            inputs=[io.Model.Input("model"),
                    io.Combo.Input("backend", options=list(speed_knobs.BACKENDS), default="pytorch_sdpa")],
            outputs=[io.Model.Output(display_name="model")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, backend):
        return speed_knobs.backend_problem(backend) or True

    @classmethod
    def execute(cls, model, backend="pytorch_sdpa") -> io.NodeOutput:
        problem = speed_knobs.backend_problem(backend)
        if problem:
            raise ValueError("OptimAttentionBackend: " + problem)
        patched = model.clone()
        if speed_knobs.ATTENTION_KEY in patched.model_options.get("transformer_options", {}):
            log.warning("OptimAttentionBackend: replacing an attention override set upstream")
        speed_knobs.set_attention_backend(patched, backend,
                                          on_run_end=stats_sender(node_id_of(cls), "attention_backend"))
        return io.NodeOutput(patched)


class OptimChannelsLast(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OptimChannelsLast",
            display_name="Optim channels_last (UNet)",
            category="optim/speed",
            description="Runs a UNet's convolutions in channels_last (NHWC) memory layout, on this "
                        "clone only. Helps on GPUs with tensor cores (fp16/bf16); measured on CPU in "
                        "the README. Models without 2-D convolutions pass through with a warning.",
            inputs=[io.Model.Input("model")],
            outputs=[io.Model.Output(display_name="model")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        import torch
        dm = model.get_model_object("diffusion_model")
        convs = sum(1 for m in dm.modules() if isinstance(m, torch.nn.Conv2d))
        if type(dm).__name__ != "UNetModel" or convs == 0:
            log.warning("OptimChannelsLast: %s (%s) is not a UNet with 2-D convolutions; the model "
                        "passes through unchanged", type(model.model).__name__, type(dm).__name__)
            return io.NodeOutput(model)
        patched = model.clone()
        speed_knobs.set_channels_last(patched, on_run_end=stats_sender(node_id_of(cls), "channels_last"))
        return io.NodeOutput(patched)
