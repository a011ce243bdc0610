"""The registry of benchmarkable techniques.

A technique is applied exactly as a user's graph applies it: through the pack's node classes as
ComfyUI registered them (a stack of MODEL -> MODEL nodes, in order), on the model the baseline
uses. Later issues add their techniques here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

UNET_FAMILIES = ("sd15", "sdxl")
DEEPCACHE_FAMILIES = (*UNET_FAMILIES, "svd")
TGATE_FAMILIES = (*UNET_FAMILIES, "pixart")
DEEPCACHE = {"cache_branch_id": 0, "skip_mode": "uniform", "start_percent": 0.0, "end_percent": 1.0,
             "center": 15, "power": 1.4}
TGATE = {"gate_percent": 0.4, "gate_step": -1, "self_attn_interval": 0, "drop_uncond": True}
DIT_FAMILIES = ("flux", "chroma", "wan21", "wan22_5b", "sd3", "hunyuan_video", "qwen_image", "pixart", "ltxv",
                "mochi", "auraflow", "hunyuan_dit", "hidream", "lumina2", "cosmos_predict2")
DITCACHE = {"mode": "fixed", "cache_block_start": 1, "cache_num_blocks": -1, "cache_step_start": 2,
            "cache_step_interval": 2, "threshold": 0.15, "max_consecutive": 3, "force": False}
LAYERWISE = {"storage_dtype": "float8_e4m3fn", "compute_dtype": "auto", "skip_preset": "default",
             "skip_modules_pattern": "", "skip_modules_classes": "", "per_channel_scale": True}
BUILTIN_CACHE = {"reuse_threshold": 0.2, "start_percent": 0.15, "end_percent": 0.95, "verbose": False}


@dataclass(frozen=True)
class Technique:
    name: str
    description: str
    stack: tuple[tuple[str, dict[str, Any]], ...]   # (node id, inputs besides the model), applied in order
    families: tuple[str, ...] | None = None         # None: every family

    @property
    def node_ids(self) -> str:
        return " + ".join(node_id for node_id, _ in self.stack)

    def apply(self, model, overrides: dict[str, Any] | None = None):
        """Run the stack on `model` and return the patched MODEL; `overrides` go to every node that
        has such an input."""
        import nodes as comfy_nodes
        for node_id, params in self.stack:
            node_cls = comfy_nodes.NODE_CLASS_MAPPINGS[node_id]
            inputs = {**params, **{k: v for k, v in (overrides or {}).items() if k in params}}
            model = node_cls.execute(model=model, **inputs).result[0]
        return model


TECHNIQUES: dict[str, Technique] = {t.name: t for t in [
    Technique("noop", "pass-through hook on every model call (control: expect 1.0x, inf dB)",
              (("OptimNoop", {}),)),
    Technique("deepcache3", "DeepCache, full UNet every 3 steps, branch 0 (reference: 2.33x on SD2.1)",
              (("OptimDeepCache", {"cache_interval": 3, **DEEPCACHE}),), DEEPCACHE_FAMILIES),
    Technique("deepcache5", "DeepCache, full UNet every 5 steps, branch 0 (reference: 3.24x on SD2.1)",
              (("OptimDeepCache", {"cache_interval": 5, **DEEPCACHE}),), DEEPCACHE_FAMILIES),
    Technique("tgate", "T-GATE, gate at 40% of the steps, unconditional pass dropped after it",
              (("OptimTGate", TGATE),), TGATE_FAMILIES),
    Technique("tgate_deepcache3", "T-GATE (gate 0.4) stacked on DeepCache (interval 3, branch 0)",
              (("OptimDeepCache", {"cache_interval": 3, **DEEPCACHE}), ("OptimTGate", TGATE)), UNET_FAMILIES),
    Technique("ditcache", "DiT block cache, blocks 1..N-2, from step 2, refresh every 2nd step",
              (("OptimDiTCache", DITCACHE),), DIT_FAMILIES),
    Technique("ditcache_wide", "DiT block cache over every block but the last (fits the 2-block tiny models)",
              (("OptimDiTCache", {**DITCACHE, "cache_block_start": 0}),), DIT_FAMILIES),
    Technique("ditcache_adaptive", "DiT block cache, adaptive, threshold 0.15, at most 3 reuses in a row",
              (("OptimDiTCache", {**DITCACHE, "mode": "adaptive"}),), DIT_FAMILIES),
    Technique("ditcache_adaptive_wide", "DiT block cache, adaptive, over every block but the last (2-block models)",
              (("OptimDiTCache", {**DITCACHE, "mode": "adaptive", "cache_block_start": 0}),), DIT_FAMILIES),
    Technique("easycache", "ComfyUI's built-in EasyCache, reuse_threshold 0.2 (for comparison)",
              (("EasyCache", BUILTIN_CACHE),), DIT_FAMILIES),
    Technique("lazycache", "ComfyUI's built-in LazyCache, reuse_threshold 0.2 (for comparison)",
              (("LazyCache", BUILTIN_CACHE),), DIT_FAMILIES),
    Technique("layerwise_fp8", "fp8 e4m3fn weight storage, per-channel scales, family skip list (default preset)",
              (("OptimLayerwiseCast", LAYERWISE),)),
    Technique("layerwise_fp8_all", "fp8 e4m3fn weight storage of every layer, unscaled (like ComfyUI's fp8 load)",
              (("OptimLayerwiseCast", {**LAYERWISE, "skip_preset": "none (cast everything)",
                                       "per_channel_scale": False}),)),
    Technique("layerwise_int8", "int8 weight storage with a bf16 scale per 128 weights, family skip list (default preset)",
              (("OptimLayerwiseCast", {**LAYERWISE, "storage_dtype": "int8"}),)),
    Technique("channels_last", "UNet convolutions in channels_last (NHWC) layout", (("OptimChannelsLast", {}),),
              DEEPCACHE_FAMILIES),
    Technique("attention_sub_quad", "attention routed to ComfyUI's sub-quadratic kernel (vs the start-up SDPA)",
              (("OptimAttentionBackend", {"backend": "sub_quadratic"}),)),
]}


def technique(name: str) -> Technique:
    if name not in TECHNIQUES:
        raise KeyError(f"unknown technique {name!r}; known: {', '.join(TECHNIQUES)}")
    return TECHNIQUES[name]
