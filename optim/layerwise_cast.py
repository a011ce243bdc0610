"""Layerwise casting: store the weights of chosen layers in 8 bits (fp8, or int8 with block
scales), compute in a higher precision.

Built on ComfyUI's own per-layer cast path: every ComfyUI op (`comfy.ops` Linear, Conv, ...) with
`comfy_cast_weights` set casts its weight to the input's dtype at each forward
(`comfy.ops.cast_bias_weight`). The cast is installed as a `PatcherInjection` on one clone:

- inject runs after ComfyUI has loaded the model and applied LoRA patches, so the fp8 copy is made
  from the patched weight (in lowvram mode the LoRA still pending in `weight_function` is folded
  in first);
- each targeted layer gets a new 8-bit `Parameter` in place of its weight (the original Parameter is
  kept aside, and moved to the offload device when it sat on another one, which frees it there);
- eject (before ComfyUI moves, re-patches or unloads the weights) puts the original Parameters and
  flags back, so other clones and later prompts see the original weights.

Which layers stay in high precision is decided by skip rules: layer classes that have no safe fp8
path (norms, embeddings), per-family default groups (embedders, modulation, final layers, chosen
by measurement: see bench/layerwise_fidelity.py), a user regex and user class names.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import weight_swap

STORAGE_DTYPES = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2, "int8": torch.int8}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# int8 storage: one bf16 scale per INT8_BLOCK consecutive input weights of an output channel
# (GGUF's Q8_0 idea; 8.125 bits a weight). fp8's 3-bit mantissa leaves every weight a relative
# error of about 2.6%; int8 with block scales lands at 0.25x that weight error on generated
# Gaussian weights and 0.22x on the trained reference UNet (README: Layerwise casting).
INT8_BLOCK = 128
COMPUTE_DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16}
INJECTION_KEY = "comfyui-optim.layerwise_cast"

# Classes whose fp8 weight ComfyUI's ops cannot use (an fp8 Embedding returns fp8 activations)
ALWAYS_SKIP_CLASSES = ("Embedding",)
NORM_CLASS = re.compile(r"norm", re.IGNORECASE)

# Per-family skip groups: regexes searched in layer names relative to the diffusion model (or,
# for text encoders, the CLIP model). "norms" is matched on the class name, not here.
FAMILY_GROUPS: dict[str, dict[str, tuple[str, ...]]] = {
    "unet": {  # SD1.x / SD2.x / SDXL / SVD UNetModel
        "embedders": (r"^time_embed\.", r"^label_emb\.", r"^input_blocks\.0\.0$"),
        # measured (bench/results/layerwise_cast-sd15-tiny-cpu.json): keeping the resblocks' emb_layers
        # costs +19% memory for no fidelity gain on UNets, so they are cast
        "modulation": (),
        "final": (r"^out\.",),
    },
    "flux": {  # Flux, Chroma, HunyuanVideo, Qwen-Image (double/single stream DiTs)
        "embedders": (r"^(img_in|txt_in|time_in|vector_in|guidance_in|time_text_embed|txt_norm)\b",
                      r"^distilled_guidance_layer\."),
        "modulation": (r"_mod\.", r"\bmodulation\b", r"^norm_out\.", r"\badaLN"),
        "final": (r"^final_layer\.", r"^proj_out$"),
    },
    "mmdit": {  # SD3 / SD3.5 MMDiT, PixArt, AuraFlow, HunyuanDiT
        "embedders": (r"^(x_embedder|t_embedder|y_embedder|context_embedder|pos_embed|t_block|"
                      r"register_tokens|cond_seq_linear|init_x_linear)\b",),
        "modulation": (r"adaLN_modulation", r"\bmodF?\b", r"\bmodX\b"),
        "final": (r"^final_layer\.", r"^final_linear\."),
    },
    "wan": {  # Wan 2.1 / 2.2
        "embedders": (r"^(patch_embedding|text_embedding|time_embedding|time_projection|img_emb)\b",),
        "modulation": (),
        "final": (r"^head\.",),
    },
    "text": {  # CLIP / T5 text encoders
        "embedders": (r"embed",),
        "modulation": (),
        "final": (r"text_projection", r"final_layer_norm"),
    },
}
# A family we do not know gets every family's patterns (a superset keeps more in high precision)
FAMILY_GROUPS["generic"] = {
    group: tuple(sorted({p for fam in FAMILY_GROUPS.values() for p in fam.get(group, ())}))
    for group in ("embedders", "modulation", "final")}

GROUPS = ("norms", "embedders", "modulation", "final")
# Presets offered by the node. "default" is the measured choice (see README: Layerwise casting).
PRESETS: dict[str, tuple[str, ...]] = {
    "default": ("norms", "embedders", "modulation", "final"),
    "norms+embedders+final": ("norms", "embedders", "final"),
    "norms only": ("norms",),
    "none (cast everything)": (),
}

_FAMILY_OF_CLASS = {
    "UNetModel": "unet", "VideoUNetModel": "unet",
    "Flux": "flux", "Chroma": "flux", "HunyuanVideo": "flux", "QwenImageTransformer2DModel": "flux",
    "ChromaRadiance": "flux",
    "OpenAISignatureMMDITWrapper": "mmdit", "MMDiT": "mmdit", "PixArtMS": "mmdit", "PixArt": "mmdit",
    "MMDiT_AuraFlow": "mmdit", "HunYuanDiT": "mmdit",
    "WanModel": "wan", "VaceWanModel": "wan", "CameraWanModel": "wan", "WanModel_S2V": "wan",
}


def family_of(module: torch.nn.Module) -> str:
    return _FAMILY_OF_CLASS.get(type(module).__name__, "generic")


def compile_pattern(pattern: str) -> re.Pattern | None:
    """The user's regex, or None when empty; ValueError with the regex's own message if invalid."""
    if not pattern or not pattern.strip():
        return None
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"skip_modules_pattern is not a valid regular expression: {e}") from None


def parse_classes(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in (text or "").replace(";", ",").split(",") if n.strip())
    bad = [n for n in names if not n.isidentifier()]
    if bad:
        raise ValueError(f"skip_modules_classes must be comma-separated class names; not a name: {bad}")
    return names


@dataclass(frozen=True)
class SkipRules:
    family: str = "generic"
    groups: tuple[str, ...] = PRESETS["default"]
    pattern: re.Pattern | None = None
    classes: tuple[str, ...] = ()

    def reason(self, name: str, module: torch.nn.Module) -> str | None:
        """Why `module` (named `name`) stays in high precision, or None if it is cast."""
        cls = type(module).__name__
        bases = {c.__name__ for c in type(module).__mro__}
        if bases & set(ALWAYS_SKIP_CLASSES):
            return "class has no fp8 path"
        if "norms" in self.groups and any(NORM_CLASS.search(b) for b in bases if b != "Module"):
            return "norms"
        for group in self.groups:
            for pat in FAMILY_GROUPS[self.family].get(group, ()):
                if re.search(pat, name):
                    return group
        if self.pattern is not None and self.pattern.search(name):
            return "skip_modules_pattern"
        if bases & set(self.classes) or cls in self.classes:
            return "skip_modules_classes"
        return None


def castable(module: torch.nn.Module, owner: torch.nn.Module | None = None) -> bool:
    """A ComfyUI op layer with a floating-point weight of its own; with `owner` (the model whose
    swap registry to read), judged by the layer's original weight, not another clone's cast."""
    if not hasattr(module, "_parameters"):
        return False
    w = weight_swap.original_weight(owner, module) if owner is not None else module._parameters.get("weight")
    return (hasattr(module, "comfy_cast_weights") and w is not None and w.is_floating_point()
            and w.dtype not in FP8_DTYPES)


@dataclass
class CastPlan:
    names: list[str]                       # layers whose weight is stored in fp8
    skipped: dict[str, str]                # layer -> reason it stays in high precision
    bytes_before: int                      # weight bytes of the cast layers at their current dtype
    bytes_after: int                       # the same weights in fp8

    @property
    def saved_bytes(self) -> int:
        return self.bytes_before - self.bytes_after

    def summary(self) -> dict:
        by_reason: dict[str, int] = {}
        for reason in self.skipped.values():
            by_reason[reason] = by_reason.get(reason, 0) + 1
        return {"cast_layers": len(self.names), "skipped_layers": len(self.skipped),
                "skipped_by_reason": by_reason, "saved_mb": round(self.saved_bytes / 2**20, 2)}


def _inputs_per_channel(weight_shape) -> int:
    return math.prod(weight_shape[1:])


def int8_block(weight_shape) -> int:
    """Block length along a channel's flattened inputs: the largest divisor of their count between
    INT8_BLOCK / 4 and INT8_BLOCK (a 3x3 conv on 320 channels has 2880 inputs: blocks of 120), else
    the whole channel (one scale per output channel)."""
    per_channel = _inputs_per_channel(weight_shape)
    for block in range(min(INT8_BLOCK, per_channel), INT8_BLOCK // 4 - 1, -1):
        if per_channel % block == 0:
            return block
    return per_channel


def scale_bytes(weight_shape, storage_dtype: torch.dtype, scaled: bool) -> int:
    """Bytes of the scales `quantize` stores beside a weight of this shape."""
    if storage_dtype == torch.int8:
        return weight_shape[0] * (_inputs_per_channel(weight_shape) // int8_block(weight_shape)) * 2   # bf16
    return weight_shape[0] * 4 if scaled else 0                                  # fp32, per channel


def plan(root: torch.nn.Module, rules: SkipRules, storage_dtype: torch.dtype, scaled: bool = False,
         owner: torch.nn.Module | None = None) -> CastPlan:
    """Which layers to cast. `owner`: the model holding `root`, whose swap registry gives the
    original weights while another clone's cast is applied to the shared modules."""
    names, skipped, before, after = [], {}, 0, 0
    item = torch.empty((), dtype=storage_dtype).element_size()
    for name, module in root.named_modules():
        if not castable(module, owner):
            continue
        why = rules.reason(name, module)
        if why is not None:
            skipped[name] = why
            continue
        w = weight_swap.original_weight(owner, module) if owner is not None else module.weight
        names.append(name)
        before += w.numel() * w.element_size()
        after += w.numel() * item + scale_bytes(tuple(w.shape), storage_dtype, scaled)
    return CastPlan(names, skipped, before, after)


class Rescale:
    """A `weight_function` for ComfyUI's cast path: multiplies the upcast weight by its scales,
    shaped (output channels, blocks, 1): one block per channel for fp8 (fp8 has few exponent steps
    below 1: small weights, stored unscaled, fall into its subnormal range and lose most of their
    precision), INT8_BLOCK-long blocks for int8."""

    def __init__(self, scale: torch.Tensor):
        self.scale = scale

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        s = self.scale.to(device=weight.device)
        blocks = weight.reshape(s.shape[0], s.shape[1], -1)
        if weight.dtype == torch.float16:   # a scale below 6e-5 is subnormal in fp16: multiply in fp32
            return (blocks.float() * s.float()).reshape(weight.shape).to(torch.float16)
        return (blocks * s.to(weight.dtype)).reshape(weight.shape)


def quantize_int8(source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 tensor, bf16 scales shaped (channels, blocks, 1)): each block's largest magnitude maps
    to 127. The scale is rounded to bf16 before the weights are divided by it, so dequantising
    (int8 * scale) reproduces exactly the grid the weights were rounded to."""
    src = source.float()
    blocks = src.reshape(src.shape[0], -1, int8_block(tuple(src.shape)))
    amax = blocks.abs().amax(dim=2, keepdim=True)
    scale = (amax / 127).to(torch.bfloat16).clamp_min(1e-30)   # an all-zero block stays zero
    q = (blocks / scale.float()).round().clamp(-127, 127).to(torch.int8)
    return q.reshape(src.shape), scale


def quantize(source: torch.Tensor, storage_dtype: torch.dtype, scaled: bool, scale_search: int = 0):
    """(stored tensor, scales shaped (channels, blocks, 1) or None). int8: see quantize_int8
    (always scaled). fp8: the scale maps each channel's largest magnitude to fp8's largest value;
    with `scale_search` > 0 each channel instead takes, of that many multipliers between 0.5 and 1
    of it, the one with the least squared rounding error (the larger values then clip at fp8's
    maximum; measured: 3-5% less weight MSE, see README)."""
    if storage_dtype == torch.int8:
        return quantize_int8(source)
    if not scaled:
        return source.to(storage_dtype), None
    src = source.float()
    fmax = torch.finfo(storage_dtype).max
    amax = src.abs().reshape(src.shape[0], -1).amax(dim=1).clamp_min(1e-12)
    scale = (amax / fmax).reshape(-1, *([1] * (src.dim() - 1)))
    if scale_search > 0:
        best_err, best = None, scale
        for m in torch.linspace(0.5, 1.0, scale_search + 1).tolist():
            s = scale * m
            err = ((src / s).clamp(-fmax, fmax).to(storage_dtype).float() * s - src).pow(2)
            err = err.reshape(src.shape[0], -1).sum(dim=1).reshape(scale.shape)
            if best_err is None:
                best_err, best = err, s
            else:
                better = err < best_err
                best_err, best = torch.where(better, err, best_err), torch.where(better, s, best)
        scale = best
    return (src / scale).clamp(-fmax, fmax).to(storage_dtype), scale.reshape(src.shape[0], 1, 1)


@dataclass
class LayerwiseCast:
    """The injection's state: what is cast (layers are swapped through `weight_swap`)."""
    root_attr: str | None                  # "diffusion_model" for MODEL; None: the patcher's model
    names: list[str]
    storage_dtype: torch.dtype
    scaled: bool = True
    scale_search: int = 0                  # see quantize
    kept: int = 0                          # castable layers the skip rules keep in high precision
    on_stats: Callable[[dict], None] | None = None
    last_stats: dict | None = None
    # bytes each cast layer's weight saves; ComfyUI's count of loaded weights holds the fp8 size of
    # the layers it has loaded while we are injected (that is what its own loads count when they
    # run without ejecting us), and the full size while we are ejected
    _saving: dict = field(default_factory=dict)

    def root(self, patcher) -> torch.nn.Module:
        return getattr(patcher.model, self.root_attr) if self.root_attr else patcher.model

    def inject(self, patcher) -> None:
        root = self.root(patcher)
        modules = dict(root.named_modules())
        offload = patcher.offload_device
        cast, saved = 0, 0
        self._saving = {}
        before = sum(p.numel() * p.element_size() for p in root.parameters())
        with torch.no_grad():
            for name in self.names:
                m = modules.get(name)
                if m is None or not castable(m):
                    continue  # another patch replaced the layer: leave it as it is
                w = m.weight
                source = w
                functions = list(m.weight_function) if m.weight_function else []
                if functions:  # lowvram: LoRA still pending; fold it in so fp8 holds the patched weight
                    source = w.to(torch.float32)
                    for f in functions:
                        source = f(source)
                q, scale = quantize(source, self.storage_dtype, self.scaled, self.scale_search)
                fp8 = torch.nn.Parameter(q, requires_grad=False)
                on_accelerator = offload is not None and w.device != torch.device(offload)
                weight_swap.swap(patcher.model, m, fp8, offload_device=offload if on_accelerator else None,
                                 weight_function=[Rescale(scale)] if scale is not None else [],
                                 comfy_cast_weights=True)
                cast += 1
                self._saving[name] = w.numel() * w.element_size() - fp8.numel() * fp8.element_size()
                saved += self._saving[name] - (scale.numel() * scale.element_size() if scale is not None else 0)
        self._count_loaded(patcher, modules, -1)
        self.last_stats = {"storage_dtype": str(self.storage_dtype).removeprefix("torch."),
                           "layers_cast": cast, "layers_kept": self.kept + len(self.names) - cast,
                           "weight_bytes_before": before, "weight_bytes_after": before - saved}
        if self.on_stats is not None:
            self.on_stats(dict(self.last_stats))

    def eject(self, patcher) -> None:
        self._count_loaded(patcher, dict(self.root(patcher).named_modules()), +1)
        self._saving = {}
        weight_swap.restore_all(patcher.model)

    def _count_loaded(self, patcher, modules: dict, sign: int) -> None:
        """Move ComfyUI's count of loaded weights between full and fp8 sizes, for the cast layers
        it has loaded now (its low-VRAM layers are not in the count)."""
        if not hasattr(patcher.model, "model_loaded_weight_memory"):
            return
        patcher.model.model_loaded_weight_memory += sign * sum(
            saving for name, saving in self._saving.items()
            if getattr(modules.get(name), "comfy_patched_weights", False) is True)

    def on_load(self, patcher, device_to, lowvram_model_memory, force_patch_weights, full_load) -> None:
        """After ComfyUI's load (we are ejected then): a full load counts the model at `patcher.size`,
        which we made the fp8 size; count it at its full size like every other ejected-state
        figure, since our injection takes the fp8 saving off the count itself."""
        if full_load and hasattr(patcher.model, "model_loaded_weight_memory"):
            import comfy.model_management as mm
            patcher.model.model_loaded_weight_memory = mm.module_size(patcher.model)


def attach(patcher, rules: SkipRules, storage_dtype: torch.dtype, compute_dtype: torch.dtype | None,
           root_attr: str | None = "diffusion_model", scaled: bool = True,
           on_stats: Callable[[dict], None] | None = None, scale_search: int = 0) -> CastPlan:
    """Install layerwise casting on `patcher` (a clone the caller owns); returns the plan.
    `on_stats(stats)` is called each time the cast is applied (at model load) with the layers cast
    and kept and the weight bytes of the model before and after."""
    from comfy.patcher_extension import CallbacksMP, PatcherInjection
    if patcher.get_injections(INJECTION_KEY):
        raise ValueError("layerwise casting is already applied to this model")
    root = getattr(patcher.model, root_attr) if root_attr else patcher.model
    the_plan = plan(root, rules, storage_dtype, scaled, owner=patcher.model)
    state = LayerwiseCast(root_attr, the_plan.names, storage_dtype, scaled, scale_search,
                          kept=len(the_plan.skipped), on_stats=on_stats)
    patcher.set_injections(INJECTION_KEY, [PatcherInjection(inject=state.inject, eject=state.eject)])
    patcher.add_callback_with_key(CallbacksMP.ON_LOAD, INJECTION_KEY, state.on_load)
    if compute_dtype is not None:
        patcher.set_model_compute_dtype(compute_dtype)  # ComfyUI's own: manual_cast_dtype + cast ops
    # ComfyUI budgets loads with patcher.size (cached): make it the fp8 size
    patcher.size = max(1, patcher.model_size() - the_plan.saved_bytes)
    patcher.layerwise_cast_plan = the_plan
    return the_plan
