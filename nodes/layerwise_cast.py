"""OptimLayerwiseCast (MODEL -> MODEL) and OptimLayerwiseCastCLIP (CLIP -> CLIP): 8-bit weight
storage (fp8, or int8 with block scales) with high-precision compute, sensitive layers skipped."""
import logging

from comfy_api.latest import io

from ..optim import layerwise_cast as lc
from .messages import node_id_of, stats_sender

log = logging.getLogger("comfyui-optim")

_DTYPE_TIP = ("Dtype the cast layers' weights are stored in, 1 byte a weight. e4m3fn keeps more "
              "mantissa than e5m2. int8 stores one bf16 scale per 128 weights (like GGUF Q8_0): about "
              "a third of e4m3fn's error for 1.6% more weight memory.")
_COMPUTE_TIP = ("Dtype the layers compute in: auto keeps the model's own compute dtype; bf16/fp16 "
                "switch the whole model to it (ComfyUI's manual cast).")
_PRESET_TIP = ("Which layers stay in high precision. default: norms, embedders (img_in/txt_in/"
               "time_in/vector_in, time/label embeddings, conv_in), modulation (adaLN, *_mod; "
               "none on UNets) and final layers of the model's family (README: how they were measured).")
_PATTERN_TIP = "Extra layers to keep in high precision: a regular expression searched in layer names."
_CLASSES_TIP = "Extra layer classes to keep in high precision, comma-separated (e.g. Conv2d, Linear)."


def _inputs(first):
    return [
        first,
        io.Combo.Input("storage_dtype", options=list(lc.STORAGE_DTYPES), default="float8_e4m3fn",
                       tooltip=_DTYPE_TIP),
        io.Combo.Input("compute_dtype", options=list(lc.COMPUTE_DTYPES), default="auto",
                       tooltip=_COMPUTE_TIP),
        io.Combo.Input("skip_preset", options=list(lc.PRESETS), default="default", tooltip=_PRESET_TIP),
        io.String.Input("skip_modules_pattern", default="", tooltip=_PATTERN_TIP),
        io.String.Input("skip_modules_classes", default="", tooltip=_CLASSES_TIP),
        io.Boolean.Input("per_channel_scale", default=True, optional=True,
                         tooltip="Store each output channel scaled to fp8's full range (one fp32 "
                                 "scale per channel, <1% memory): small weights keep their precision "
                                 "instead of falling into fp8's subnormals. Off: a plain cast, as "
                                 "ComfyUI's fp8 load does. int8 is always block-scaled."),
    ]


def _validate(storage_dtype, compute_dtype, skip_preset, skip_modules_pattern, skip_modules_classes):
    if storage_dtype not in lc.STORAGE_DTYPES:
        return f"storage_dtype must be one of {list(lc.STORAGE_DTYPES)}, got {storage_dtype!r}"
    if compute_dtype not in lc.COMPUTE_DTYPES:
        return f"compute_dtype must be one of {list(lc.COMPUTE_DTYPES)}, got {compute_dtype!r}"
    if skip_preset not in lc.PRESETS:
        return f"skip_preset must be one of {list(lc.PRESETS)}, got {skip_preset!r}"
    try:
        lc.compile_pattern(skip_modules_pattern)
        lc.parse_classes(skip_modules_classes)
    except ValueError as e:
        return str(e)
    return True


def _rules(family, skip_preset, skip_modules_pattern, skip_modules_classes) -> lc.SkipRules:
    return lc.SkipRules(family=family, groups=lc.PRESETS[skip_preset],
                        pattern=lc.compile_pattern(skip_modules_pattern),
                        classes=lc.parse_classes(skip_modules_classes))


class OptimLayerwiseCast(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OptimLayerwiseCast",
            display_name="Optim Layerwise Cast (fp8 / int8 storage)",
            category="optim/memory",
            description="Stores the diffusion model's weights in 8 bits (fp8, or int8 with block scales) and upcasts each layer at its "
                        "forward, after LoRA patching; norms, embedders, modulation and final layers "
                        "stay in high precision. Works on this branch's clone only.",
            inputs=_inputs(io.Model.Input("model")),
            outputs=[io.Model.Output(display_name="model")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, storage_dtype, compute_dtype, skip_preset, skip_modules_pattern,
                        skip_modules_classes, **_):
        return _validate(storage_dtype, compute_dtype, skip_preset, skip_modules_pattern,
                         skip_modules_classes)

    @classmethod
    def execute(cls, model, storage_dtype="float8_e4m3fn", compute_dtype="auto", skip_preset="default",
                skip_modules_pattern="", skip_modules_classes="", per_channel_scale=True) -> io.NodeOutput:
        problem = _validate(storage_dtype, compute_dtype, skip_preset, skip_modules_pattern,
                            skip_modules_classes)
        if problem is not True:
            raise ValueError("OptimLayerwiseCast: " + problem)
        dm = model.get_model_object("diffusion_model")
        family = lc.family_of(dm)
        if family == "generic":
            log.warning("OptimLayerwiseCast: no tuned skip list for %s; using the union of every "
                        "family's skip patterns", type(dm).__name__)
        patched = model.clone()
        plan = lc.attach(patched, _rules(family, skip_preset, skip_modules_pattern, skip_modules_classes),
                         lc.STORAGE_DTYPES[storage_dtype], lc.COMPUTE_DTYPES[compute_dtype],
                         scaled=per_channel_scale, on_stats=stats_sender(node_id_of(cls), "layerwise_cast"))
        if not plan.names:
            log.warning("OptimLayerwiseCast: every layer of %s is skipped; nothing is stored in 8 bits",
                        type(dm).__name__)
        log.info("OptimLayerwiseCast on %s (%s): %s", type(dm).__name__, family, plan.summary())
        return io.NodeOutput(patched)


class OptimLayerwiseCastCLIP(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OptimLayerwiseCastCLIP",
            display_name="Optim Layerwise Cast CLIP (fp8 / int8 storage)",
            category="optim/memory",
            description="Stores the text encoder's weights in 8 bits (fp8, or int8 with block scales) and upcasts each layer at its "
                        "forward (after LoRA patching); embeddings, norms and projections stay in "
                        "high precision.",
            inputs=_inputs(io.Clip.Input("clip")),
            outputs=[io.Clip.Output(display_name="clip")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, storage_dtype, compute_dtype, skip_preset, skip_modules_pattern,
                        skip_modules_classes, **_):
        return _validate(storage_dtype, compute_dtype, skip_preset, skip_modules_pattern,
                         skip_modules_classes)

    @classmethod
    def execute(cls, clip, storage_dtype="float8_e4m3fn", compute_dtype="auto", skip_preset="default",
                skip_modules_pattern="", skip_modules_classes="", per_channel_scale=True) -> io.NodeOutput:
        problem = _validate(storage_dtype, compute_dtype, skip_preset, skip_modules_pattern,
                            skip_modules_classes)
        if problem is not True:
            raise ValueError("OptimLayerwiseCastCLIP: " + problem)
        patched = clip.clone()
        plan = lc.attach(patched.patcher, _rules("text", skip_preset, skip_modules_pattern,
                                                 skip_modules_classes),
                         lc.STORAGE_DTYPES[storage_dtype], lc.COMPUTE_DTYPES[compute_dtype], root_attr=None,
                         scaled=per_channel_scale, on_stats=stats_sender(node_id_of(cls), "layerwise_cast"))
        log.info("OptimLayerwiseCastCLIP: %s", plan.summary())
        return io.NodeOutput(patched)
