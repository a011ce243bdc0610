"""OptimDevicePlacement: run the diffusion model's blocks on several devices (MODEL -> MODEL, plus
the resulting device map as text)."""
import logging

from comfy_api.latest import io

from ..optim import device_placement as dp
from ..optim import group_offload
from .messages import node_id_of, stats_sender

log = logging.getLogger("comfyui-optim")

EXAMPLE_MAP = '{"output_blocks": "cpu"}'


class OptimDevicePlacement(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OptimDevicePlacement",
            display_name="Optim Device Placement",
            category="optim/memory",
            description="Spreads the diffusion model's blocks over several devices (GPUs and the CPU), "
                        "as diffusers' device_map does: 'balanced' splits the blocks in execution order "
                        "evenly over the GPUs (within max_memory, the rest on the CPU), 'custom' reads a "
                        "map of module prefix -> device, 'none' removes a placement made upstream. "
                        "Activations move between devices at block boundaries; ComfyUI's own loading, "
                        "low-VRAM layers and LoRA patches keep working.",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("strategy", options=list(dp.STRATEGIES), default="balanced",
                               tooltip="balanced: even split over the GPUs present (the CPU takes what does not "
                                       "fit max_memory). custom: device_map below. none: no placement (removes "
                                       "one applied upstream)."),
                io.String.Input("device_map", multiline=True, default="",
                                tooltip="custom only: JSON {\"module.prefix\": device} or lines 'prefix: device'. "
                                        "Devices: 0, 1 (GPU index), cuda:1, cpu. Prefixes name blocks or lists of "
                                        "blocks, e.g. " + EXAMPLE_MAP + "; unnamed blocks stay on the load device. "
                                        "The map output lists the names."),
                io.String.Input("max_memory", multiline=False, default="",
                                tooltip="Weights allowed per device, JSON {\"0\": \"10GB\", \"cpu\": \"32GB\"}. With "
                                        "balanced, only the devices named here are used. Empty: free memory."),
            ],
            outputs=[io.Model.Output(display_name="model"), io.String.Output(display_name="device_map")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, strategy, device_map="", max_memory=""):
        # what can be checked without the model, so an API prompt gets it in the validation response
        # (module prefixes need the model: they are checked when the node runs)
        if strategy not in dp.STRATEGIES:
            return f"strategy must be one of {dp.STRATEGIES}, got {strategy!r}"
        try:
            available = dp.available_devices()
            mapping = dp.parse_map_text(device_map or "")
            for prefix, dev in mapping.items():
                if not str(prefix).strip():
                    return "device_map: empty module prefix"
                dp.normalize_device(dev, available)
            dp.parse_max_memory(max_memory or "", available)
        except dp.PlacementError as e:
            return str(e)
        if strategy == "custom" and not mapping:
            return "strategy 'custom' needs a device_map, e.g. " + EXAMPLE_MAP
        if strategy != "custom" and mapping:
            return "device_map is only read with strategy 'custom' (clear it, or choose 'custom')"
        return True

    @classmethod
    def execute(cls, model, strategy="balanced", device_map="", max_memory="") -> io.NodeOutput:
        dm = model.get_model_object("diffusion_model")
        if strategy != "none" and not dp.units_of(dm):
            log.warning("OptimDevicePlacement: %s (%s) has no layers to place; the model passes through unchanged",
                        type(model.model).__name__, type(dm).__name__)
            return io.NodeOutput(model, f"no placement: {type(dm).__name__} has no layers to place")
        main = str(model.load_device)
        main = f"{main}:0" if main in ("cuda", "xpu") else main
        loaded = model.loaded_size()

        def capacity(device):
            # free memory now, plus what this model already holds on its load device (it is ours to plan)
            free = dp.default_capacity(device)
            return free + loaded if free is not None and device == main else free
        try:
            plan = dp.make_plan(dm, strategy, device_map or "", max_memory or "", main, capacity=capacity)
        except dp.PlacementError as e:
            raise ValueError(f"OptimDevicePlacement: {e}") from None
        if strategy != "none" and model.get_injections(group_offload.KEY):
            raise ValueError("OptimDevicePlacement: this model goes through OptimGroupOffload, which streams its "
                             "layers to the load device; the two cannot share a model yet (use one of them)")
        patched = model.clone()
        removed = dp.detach(patched)
        if plan is None:
            text = f"no placement: ComfyUI places the model (load device {model.load_device})" + \
                   (", placement made upstream removed" if removed else "")
            return io.NodeOutput(patched, text)
        if not plan.hooked():
            log.info("OptimDevicePlacement: every block of %s fits on %s; nothing to place",
                     type(dm).__name__, plan.main_device)
        else:
            dp.attach(patched, plan, on_run_end=stats_sender(node_id_of(cls), "device_placement"))
        return io.NodeOutput(patched, plan.describe())
