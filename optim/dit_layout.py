"""Where the transformer blocks of each DiT family live, and how a pack may intercept them.

One adapter per family gives the block lists in the order the model runs them; together they form
the model's single block index space (Flux: its double blocks, then its single blocks). Families
whose forward honours ComfyUI's block replace (`patches_replace["dit"]`) are intercepted there;
the others (HiDream, Lumina 2, Cosmos, PixArt) by object-patching each block of the range with a
view that shares the block's weights (`optim.module_views`), so state-dict keys, LoRA and device
moves are unchanged.

On either path a block is seen as a dict of its hidden streams: "img" (image/video tokens) and,
for two-stream blocks, "txt".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Segment:
    """One block list of the model."""
    attr: str                  # attribute of the diffusion model holding the blocks
    replace_kind: str | None   # block-replace key ("double_block"/"single_block"); None: view path
    # view path only: hidden streams of a block call, and the call's return value from streams
    streams_in: Callable | None = None    # (args, kwargs) -> {"img": ..., "txt": ...}
    streams_out: Callable | None = None   # block's return value -> {"img": ..., "txt": ...}
    to_return: Callable | None = None     # (streams, args, kwargs) -> block's return value


@dataclass(frozen=True)
class Family:
    name: str                 # recorded in saved configurations
    classes: tuple[str, ...]  # qualified diffusion-model class names (subclasses match too)
    segments: tuple[Segment, ...]
    note: str = ""

    @property
    def method(self) -> str:
        return "block replace" if self.segments[0].replace_kind else "block views (model-level)"


def _first_tensor_in(kw_name: str):
    def streams(args, kwargs):
        return {"img": kwargs[kw_name] if kw_name in kwargs else args[0]}
    return streams


def _tensor_out(out):
    return {"img": out}


def _tensor_return(streams, args, kwargs):
    return streams["img"]


def _hidream_double_in(args, kwargs):
    return {"img": kwargs["image_tokens"], "txt": kwargs["text_tokens"]}


def _hidream_double_out(out):
    return {"img": out[0], "txt": out[1]}


def _hidream_double_return(streams, args, kwargs):
    return streams["img"], streams["txt"]


def _view_segment(attr, kw_name="x"):
    return Segment(attr, None, _first_tensor_in(kw_name), _tensor_out, _tensor_return)


_DOUBLE, _SINGLE = "double_block", "single_block"

FAMILIES: tuple[Family, ...] = (
    Family("flux", ("comfy.ldm.flux.model.Flux",),
           (Segment("double_blocks", _DOUBLE), Segment("single_blocks", _SINGLE)),
           "Flux.1 dev/schnell, Kontext, Fill"),
    Family("chroma", ("comfy.ldm.chroma.model.Chroma",),
           (Segment("double_blocks", _DOUBLE), Segment("single_blocks", _SINGLE)),
           "Chroma, Chroma Radiance"),
    Family("hunyuan_video", ("comfy.ldm.hunyuan_video.model.HunyuanVideo",),
           (Segment("double_blocks", _DOUBLE), Segment("single_blocks", _SINGLE)),
           "HunyuanVideo 1.0, I2V, HunyuanImage 2.1"),
    Family("wan", ("comfy.ldm.wan.model.WanModel",), (Segment("blocks", _DOUBLE),),
           "Wan 2.1 and 2.2 (T2V, I2V, VACE, camera, S2V, HuMo, Animate)"),
    Family("ltxv", ("comfy.ldm.lightricks.model.LTXVModel",), (Segment("transformer_blocks", _DOUBLE),)),
    Family("qwen_image", ("comfy.ldm.qwen_image.model.QwenImageTransformer2DModel",),
           (Segment("transformer_blocks", _DOUBLE),)),
    Family("sd3", ("comfy.ldm.modules.diffusionmodules.mmdit.MMDiT",), (Segment("joint_blocks", _DOUBLE),),
           "SD3 / SD3.5 MMDiT joint blocks"),
    Family("mochi", ("comfy.ldm.genmo.joint_model.asymm_models_joint.AsymmDiTJoint",),
           (Segment("blocks", _DOUBLE),)),
    Family("auraflow", ("comfy.ldm.aura.mmdit.MMDiT",),
           (Segment("double_layers", _DOUBLE), Segment("single_layers", _SINGLE))),
    Family("hunyuan_dit", ("comfy.ldm.hydit.models.HunYuanDiT",), (Segment("blocks", _DOUBLE),),
           "long skip connections of blocks inside a cached range carry that range's input"),
    Family("hidream", ("comfy.ldm.hidream.model.HiDreamImageTransformer2DModel",),
           (Segment("double_stream_blocks", None, _hidream_double_in, _hidream_double_out,
                    _hidream_double_return),
            _view_segment("single_stream_blocks", "image_tokens")),
           "on reused calls the text stream of double-stream blocks passes through unless its shape is kept"),
    Family("lumina2", ("comfy.ldm.lumina.model.NextDiT",), (_view_segment("layers"),),
           "main layers (the noise and context refiners always run)"),
    Family("cosmos", ("comfy.ldm.cosmos.predict2.MiniTrainDIT", "comfy.ldm.cosmos.model.GeneralDIT"),
           (_view_segment("blocks"),), "Cosmos Predict2 and Cosmos 1.0"),
    Family("pixart", ("comfy.ldm.pixart.pixartms.PixArtMS",), (_view_segment("blocks"),),
           "PixArt-alpha and PixArt-sigma"),
)


def _qualified_names(obj) -> set[str]:
    return {f"{c.__module__}.{c.__name__}" for c in type(obj).__mro__}


def family_of(diffusion_model) -> Family | None:
    names = _qualified_names(diffusion_model)
    for fam in FAMILIES:
        if names.intersection(fam.classes):
            return fam
    return None


@dataclass(frozen=True)
class BlockRef:
    index: int          # in the model's single index space
    segment: int        # which block list
    local: int          # index inside that list
    path: str           # module path from the diffusion model


def block_refs(diffusion_model, fam: Family) -> list[BlockRef]:
    refs = []
    for s, seg in enumerate(fam.segments):
        container = getattr(diffusion_model, seg.attr, None)
        if container is None:
            continue
        names = list(container._modules.keys()) if isinstance(container, torch.nn.Module) else []
        for local, name in enumerate(names):
            refs.append(BlockRef(len(refs), s, local, f"{seg.attr}.{name}"))
    return refs
