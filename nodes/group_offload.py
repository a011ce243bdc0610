"""OptimGroupOffload: stream the weights ComfyUI leaves off the GPU in execution-ordered groups,
prefetched on a side stream (MODEL -> MODEL)."""
import copy
import logging

from comfy_api.latest import io

from ..optim import device_placement, group_offload
from .messages import current_prompt_id, node_id_of, stats_sender

log = logging.getLogger("comfyui-optim")


def checked_params(node: str, *values) -> group_offload.GroupOffloadParams:
    """The node's inputs as parameters, or a ValueError naming the node and what is wrong."""
    params = group_offload.GroupOffloadParams(*values)
    problems = params.problems()
    if problems:
        raise ValueError(f"{node}: " + "; ".join(problems))
    return params


class OptimGroupOffload(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OptimGroupOffload",
            display_name="Optim Group Offload",
            category="optim/memory",
            description="Keeps at most vram_budget_gb of the diffusion model's weights on the GPU and "
                        "streams the rest in, block group by block group in the order the model runs "
                        "them, prefetching the next group from pinned memory on a side CUDA stream. "
                        "Works with ComfyUI's memory management (its low-VRAM layers, accounting, "
                        "unloading and LoRA patches) instead of around it.",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("offload_type", options=list(group_offload.OFFLOAD_TYPES), default="block_level",
                               tooltip="block_level: groups of num_blocks_per_group transformer/UNet blocks. "
                                       "leaf_level: every layer on its own (least VRAM, most transfers)."),
                io.Int.Input("num_blocks_per_group", default=1, min=1, max=1000,
                             tooltip="block_level only: blocks moved together."),
                io.Boolean.Input("use_stream", default=True,
                                 tooltip="Prefetch the next group on a side CUDA stream while the current one "
                                         "computes (no effect without CUDA)."),
                io.Boolean.Input("record_stream", default=False,
                                 tooltip="With use_stream: let copies start before earlier work finishes "
                                         "(faster, a little more VRAM)."),
                io.Boolean.Input("low_cpu_mem_usage", default=False,
                                 tooltip="Pin each transfer on the fly instead of holding a pinned copy of the "
                                         "offloaded weights (less RAM, slower)."),
                io.Float.Input("vram_budget_gb", default=0.0, min=0.0, max=4096.0, step=0.25,
                               tooltip="GPU memory for the weights: resident layers plus the groups in flight. "
                                       "0 streams every layer ComfyUI can stream."),
                io.Boolean.Input("offload_to_disk", default=False,
                                 tooltip="Keep the streamed weights in a memory-mapped file under ComfyUI's temp "
                                         "folder instead of RAM (for machines with little RAM); the file is "
                                         "removed when the model is unloaded."),
            ],
            outputs=[io.Model.Output(display_name="model")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, offload_type, use_stream=True, record_stream=False):
        # this ComfyUI does not check V3 combos itself
        if offload_type not in group_offload.OFFLOAD_TYPES:
            return f"offload_type must be one of {group_offload.OFFLOAD_TYPES}, got {offload_type!r}"
        if record_stream and not use_stream:
            return "record_stream needs use_stream"
        return True

    @classmethod
    def execute(cls, model, offload_type="block_level", num_blocks_per_group=1, use_stream=True,
                record_stream=False, low_cpu_mem_usage=False, vram_budget_gb=0.0,
                offload_to_disk=False) -> io.NodeOutput:
        params = checked_params("OptimGroupOffload", offload_type, num_blocks_per_group, use_stream, record_stream,
                                low_cpu_mem_usage, vram_budget_gb, offload_to_disk)
        dm = model.get_model_object("diffusion_model")
        if not group_offload.managed_leaves(dm):
            log.warning("OptimGroupOffload: %s (%s) has no layers ComfyUI can stream; the model passes "
                        "through unchanged", type(model.model).__name__, type(dm).__name__)
            return io.NodeOutput(model)
        if model.get_injections(device_placement.KEY):
            raise ValueError("OptimGroupOffload: this model goes through OptimDevicePlacement, which runs blocks on "
                             "other devices; the two cannot share a model yet (use one of them, or set the "
                             "placement's strategy to none)")
        patched = model.clone()
        group_offload.attach(patched, params, on_run_end=stats_sender(node_id_of(cls), "group_offload"))
        return io.NodeOutput(patched)


def _attach_module(cls, patcher, params) -> None:
    """A VAE's or text encoder's patcher: its figures go to the node's badge after each call, the
    calls of one prompt adding up."""
    group_offload.attach_module(patcher, params, on_run_end=stats_sender(node_id_of(cls), "group_offload"),
                                run_id=current_prompt_id)


class OptimGroupOffloadVAE(io.ComfyNode):
    """The same streaming for a VAE (VAE -> VAE): its decoder's and encoder's up/down levels are the
    groups; the budget applies whenever ComfyUI loads the VAE."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        schema = OptimGroupOffload.define_schema()
        return io.Schema(
            node_id="OptimGroupOffloadVAE",
            display_name="Optim Group Offload (VAE)",
            category="optim/memory",
            description="Group offload for a VAE: keeps at most vram_budget_gb of its weights on the GPU "
                        "and streams the rest level by level, prefetched on a side CUDA stream.",
            inputs=[io.Vae.Input("vae")] + [i for i in schema.inputs if i.id != "model"],
            outputs=[io.Vae.Output(display_name="vae")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, offload_type, use_stream=True, record_stream=False):
        return OptimGroupOffload.validate_inputs(offload_type, use_stream, record_stream)

    @classmethod
    def execute(cls, vae, offload_type="block_level", num_blocks_per_group=1, use_stream=True,
                record_stream=False, low_cpu_mem_usage=False, vram_budget_gb=0.0,
                offload_to_disk=False) -> io.NodeOutput:
        params = checked_params("OptimGroupOffloadVAE", offload_type, num_blocks_per_group, use_stream, record_stream,
                                low_cpu_mem_usage, vram_budget_gb, offload_to_disk)
        patched = copy.copy(vae)               # shares the modules; its own patcher clone
        patched.patcher = vae.patcher.clone()
        _attach_module(cls, patched.patcher, params)
        return io.NodeOutput(patched)


class OptimGroupOffloadCLIP(io.ComfyNode):
    """The same streaming for a text encoder (CLIP -> CLIP): its transformer layers are the groups;
    the budget applies whenever ComfyUI loads the encoder."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        schema = OptimGroupOffload.define_schema()
        return io.Schema(
            node_id="OptimGroupOffloadCLIP",
            display_name="Optim Group Offload (CLIP)",
            category="optim/memory",
            description="Group offload for a text encoder: keeps at most vram_budget_gb of its weights on "
                        "the GPU and streams the rest layer group by layer group, prefetched on a side "
                        "CUDA stream.",
            inputs=[io.Clip.Input("clip")] + [i for i in schema.inputs if i.id != "model"],
            outputs=[io.Clip.Output(display_name="clip")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, offload_type, use_stream=True, record_stream=False):
        return OptimGroupOffload.validate_inputs(offload_type, use_stream, record_stream)

    @classmethod
    def execute(cls, clip, offload_type="block_level", num_blocks_per_group=1, use_stream=True,
                record_stream=False, low_cpu_mem_usage=False, vram_budget_gb=0.0,
                offload_to_disk=False) -> io.NodeOutput:
        params = checked_params("OptimGroupOffloadCLIP", offload_type, num_blocks_per_group, use_stream, record_stream,
                                low_cpu_mem_usage, vram_budget_gb, offload_to_disk)
        patched = clip.clone()
        _attach_module(cls, patched.patcher, params)
        return io.NodeOutput(patched)
