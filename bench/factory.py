"""Diffusion models of real ComfyUI architectures with generated weights: no downloads.

Every family is built from ComfyUI's own `supported_models` class and model code, so the modules,
block lists, conditioning path and sampling settings are the real ones; only the weights are
generated (deterministic for a seed, finite, fan-in scaled so activations stay sane over many
sampling steps). Sizes:

- ``tiny``: the smallest config of the architecture that keeps its kinds of blocks; used by tests.
  Where ComfyUI's loader can detect the architecture from a state dict (see ``Family.detectable``),
  the tiny config is chosen so that a saved file loads through the standard loader nodes.
- ``bench``: the real block structure at widths that keep compute ratios meaningful on a CPU.
- ``full``: the published config (for GPU runs).

Requires ComfyUI importable (see ``bench.comfy_env.load_comfyui_in_process``).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Family:
    name: str
    model_class: str                     # class name in comfy.supported_models
    configs: dict[str, dict]             # size -> unet_config
    latent_channels: int
    video: bool = False
    frames_as_batch: bool = False        # SVD: video frames are the batch of a 4D latent
    min_latent: int = 1                  # smallest latent side the model accepts
    temporal_ratio: int = 1              # video latents: frames = (F - 1) // ratio + 1
    spatial_ratio: int = 8
    context: tuple[int, int] = (77, 768)  # (tokens, width) of the text conditioning
    pooled: int | None = None            # width of the pooled text vector, if the family uses one
    guidance: float | None = None        # distilled guidance passed with the conditioning
    detectable: tuple[str, ...] = ()     # sizes ComfyUI's state-dict detection reconstructs exactly
    vae: str = "taesd"                   # taesd | wan21 | wan22 | ltxv | mochi
    output_layer: str = "final_layer.linear"  # the layer calibrated so the model's output has unit scale
    # what the family's text encoder adds to the conditioning besides the token states:
    # "attention_mask" (token mask), "no_pooled" (pooled_output None: a T5-only encoder),
    # "mt5" (HunyuanDiT's second, mT5 stream and masks), "llama3" (HiDream's Llama hidden states)
    cond_extras: tuple[str, ...] = ()
    notes: str = ""


def sd_unet_config(channels, mult, res_blocks, depth, depth_mid, context, linear, heads=None,
                   head_ch=None, adm=None) -> dict:
    return _sd_unet(channels, mult, res_blocks, depth, depth_mid, context, linear, heads, head_ch, adm)


def _sd_unet(channels, mult, res_blocks, depth, depth_mid, context, linear, heads=None, head_ch=None,
             adm=None):
    """A UNetModel config in the layout ComfyUI's detection produces."""
    n = len(mult)
    tdepth = []
    for level in range(n):
        tdepth += [depth[level]] * res_blocks
    tdepth_out = []
    for level in range(n):
        tdepth_out += [depth[level]] * (res_blocks + 1)
    cfg = {
        "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
        "use_spatial_transformer": True, "legacy": False, "adm_in_channels": adm,
        "model_channels": channels, "num_res_blocks": [res_blocks] * n, "channel_mult": list(mult),
        "transformer_depth": tdepth, "transformer_depth_middle": depth_mid,
        "transformer_depth_output": tdepth_out, "use_linear_in_transformer": linear,
        "context_dim": context, "use_temporal_attention": False, "use_temporal_resblock": False,
    }
    if adm is not None:
        cfg["num_classes"] = "sequential"
    if heads is not None:
        cfg["num_heads"], cfg["num_head_channels"] = heads, -1
    else:
        cfg["num_head_channels"] = head_ch
    return cfg


def _svd(channels, mult=(1, 2, 4, 4)):
    cfg = _sd_unet(channels, list(mult), 2, [1, 1, 1, 0], 1, 1024, True, head_ch=64, adm=768)
    return {**cfg, "in_channels": 8, "use_temporal_attention": True, "use_temporal_resblock": True,
            "extra_ff_mix_layer": True, "use_spatial_context": True, "merge_strategy": "learned_with_images",
            "merge_factor": 0.0, "video_kernel_size": [3, 1, 1], "disable_temporal_crossattention": False}


def _pixart(hidden, depth, heads, caption=4096):
    return {"image_model": "pixart_alpha", "hidden_size": hidden, "depth": depth, "num_heads": heads,
            "patch_size": 2, "in_channels": 4, "input_size": 64, "caption_channels": caption,
            "micro_condition": False, "model_max_length": 120, "pred_sigma": False, "learn_sigma": False}


def _flux(hidden, heads, depth, single, context=4096):
    return {"image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2,
            "vec_in_dim": 768, "context_in_dim": context, "hidden_size": hidden, "mlp_ratio": 4.0,
            "num_heads": heads, "depth": depth, "depth_single_blocks": single,
            "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True, "guidance_embed": True}


def _sd3(depth, context=4096, pooled=2048, patches=192):
    return {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": depth,
            "input_size": None, "adm_in_channels": pooled, "pos_embed_scaling_factor": None,
            "context_embedder_config": {"target": "torch.nn.Linear",
                                        "params": {"in_features": context, "out_features": 64 * depth}},
            "num_patches": patches * patches, "pos_embed_max_size": patches,
            "x_block_self_attn_layers": []}


def _wan(dim, ffn, layers):
    return {"image_model": "wan2.1", "model_type": "t2v", "dim": dim, "out_dim": 16,
            "num_heads": dim // 128, "ffn_dim": ffn, "num_layers": layers, "patch_size": (1, 2, 2),
            "freq_dim": 256, "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True,
            "eps": 1e-6, "in_dim": 16}


def _hunyuan_video(hidden, depth, single, context=4096):
    return {"image_model": "hunyuan_video", "in_channels": 16, "out_channels": 16,
            "patch_size": [1, 2, 2], "vec_in_dim": 768, "axes_dim": [16, 56, 56], "meanflow": False,
            "context_in_dim": context, "hidden_size": hidden, "mlp_ratio": 4.0,
            "num_heads": hidden // 128, "depth": depth, "depth_single_blocks": single, "theta": 256,
            "qkv_bias": True, "byt5": False, "guidance_embed": True}


def _qwen_image(layers, heads, context=3584):
    return {"image_model": "qwen_image", "in_channels": 64, "out_channels": 16, "num_layers": layers,
            "attention_head_dim": 128, "num_attention_heads": heads, "joint_attention_dim": context}


def _ltxv(layers, head_dim, heads=32, caption=4096):
    # cross attention runs on the caption projected to the inner width, so cross_attention_dim is
    # that width; ComfyUI's detection assumes 32 heads (head dim = attn2.to_k rows // 32)
    return {"image_model": "ltxv", "num_layers": layers, "attention_head_dim": head_dim,
            "num_attention_heads": heads, "cross_attention_dim": heads * head_dim,
            "caption_channels": caption, "in_channels": 128}


def _chroma(hidden, heads, depth, single, context=4096, approx_hidden=5120, approx_layers=5):
    return {"image_model": "chroma", "in_channels": 64, "out_channels": 64, "patch_size": 2,
            "context_in_dim": context, "hidden_size": hidden, "mlp_ratio": 4.0, "num_heads": heads,
            "depth": depth, "depth_single_blocks": single, "axes_dim": [16, 56, 56], "theta": 10000,
            "qkv_bias": True, "in_dim": 64, "out_dim": hidden, "hidden_dim": approx_hidden,
            "n_layers": approx_layers}


def _wan22(dim, ffn, layers):
    return {**_wan(dim, ffn, layers), "in_dim": 48, "out_dim": 48}


def _mochi(hidden_x, hidden_y, heads, depth, t5=4096, t5_tokens=256):
    # ComfyUI's block asserts the visual MLP's width is 12288 whatever the model width
    return {"image_model": "mochi_preview", "depth": depth, "patch_size": 2, "num_heads": heads,
            "hidden_size_x": hidden_x, "hidden_size_y": hidden_y, "mlp_ratio_x": 12288 / hidden_x,
            "mlp_ratio_y": 4.0, "learn_sigma": False, "in_channels": 12, "qk_norm": True,
            "qkv_bias": False, "out_bias": True, "attn_drop": 0.0, "patch_embed_bias": True,
            "posenc_preserve_area": True, "timestep_mlp_bias": True, "attend_to_padding": False,
            "timestep_scale": 1000.0, "use_t5": True, "t5_feat_dim": t5, "t5_token_length": t5_tokens,
            "rope_theta": 10000.0}


def _auraflow(dim, heads, double, single, context=2048, max_seq=1024):
    # no "image_model" key: AuraFlow's MMDiT takes no extra arguments
    return {"in_channels": 4, "out_channels": 4, "patch_size": 2, "dim": dim, "n_heads": heads,
            "n_double_layers": double, "n_layers": double + single, "global_conddim": dim,
            "cond_seq_dim": context, "max_seq": max_seq}


def _hunyuan_dit(hidden, depth, heads=16, mlp_ratio=4.0, text=1024, text_t5=2048):
    return {"image_model": "hydit", "hidden_size": hidden, "depth": depth, "num_heads": heads,
            "mlp_ratio": mlp_ratio, "text_states_dim": text, "text_states_dim_t5": text_t5,
            "text_len": 77, "text_len_t5": 256}


def _hidream(heads, double, single, caption=4096, pooled=2048, llama_layers=None):
    if llama_layers is None:  # one Llama hidden state per block, as the full model's list does
        llama_layers = list(range(double + single))
    return {"image_model": "hidream", "attention_head_dim": 128, "axes_dims_rope": [64, 32, 32],
            "caption_channels": [caption, caption], "max_resolution": [128, 128], "in_channels": 16,
            "llama_layers": llama_layers, "num_attention_heads": heads, "num_routed_experts": 4,
            "num_activated_experts": 2, "num_layers": double, "num_single_layers": single,
            "out_channels": 16, "patch_size": 2, "text_emb_dim": pooled}


def _lumina2(dim, heads, kv_heads, layers, context=2304):
    return {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": dim,
            "cap_feat_dim": context, "n_layers": layers, "n_heads": heads, "n_kv_heads": kv_heads,
            "qk_norm": True, "axes_dims": [32, 32, 32], "axes_lens": [300, 512, 512]}


def _cosmos_predict2(channels, blocks, heads, context=1024):
    # what ComfyUI's detection gives a text-to-image Predict2 model (16 input channels)
    return {"image_model": "cosmos_predict2", "max_img_h": 240, "max_img_w": 240, "max_frames": 128,
            "in_channels": 16, "out_channels": 16, "patch_spatial": 2, "patch_temporal": 1,
            "model_channels": channels, "num_blocks": blocks, "num_heads": heads,
            "concat_padding_mask": True, "crossattn_emb_channels": context, "pos_emb_cls": "rope3d",
            "pos_emb_learnable": True, "pos_emb_interpolation": "crop", "min_fps": 1, "max_fps": 30,
            "use_adaln_lora": True, "adaln_lora_dim": 256, "extra_per_block_abs_pos_emb": False,
            "rope_h_extrapolation_ratio": 4.0, "rope_w_extrapolation_ratio": 4.0,
            "rope_t_extrapolation_ratio": 1.0, "extra_h_extrapolation_ratio": 1.0,
            "extra_w_extrapolation_ratio": 1.0, "extra_t_extrapolation_ratio": 1.0,
            "rope_enable_fps_modulation": False}


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("sd15", "SD15", {
        "tiny": _sd_unet(320, [1, 1], 1, [1, 1], 1, 768, False, heads=8),
        "bench": _sd_unet(320, [1, 2, 4, 4], 2, [1, 1, 1, 0], 1, 768, False, heads=8),
        "full": _sd_unet(320, [1, 2, 4, 4], 2, [1, 1, 1, 0], 1, 768, False, heads=8),
    }, latent_channels=4, detectable=("tiny", "bench", "full"),
        output_layer="out.2", notes="bench is the real SD1.5 UNet (860M parameters)"),
    Family("sdxl", "SDXL", {
        "tiny": _sd_unet(64, [1, 2], 1, [0, 1], 1, 2048, True, head_ch=32, adm=2816),
        "bench": _sd_unet(320, [1, 2, 4], 2, [0, 2, 10], 10, 2048, True, head_ch=64, adm=2816),
        "full": _sd_unet(320, [1, 2, 4], 2, [0, 2, 10], 10, 2048, True, head_ch=64, adm=2816),
    }, latent_channels=4, context=(77, 2048), pooled=1280, detectable=("bench", "full"),
        output_layer="out.2", notes="bench is the real SDXL UNet (2.6B parameters)"),
    Family("svd", "SVD_img2vid", {
        "tiny": _svd(64, (1, 1, 2, 2)),
        "bench": _svd(320),
        "full": _svd(320),
    }, latent_channels=4, frames_as_batch=True, context=(1, 1024), output_layer="out.2",
        notes="Stable Video Diffusion UNet (temporal res blocks and attention); frames are the batch"),
    Family("pixart", "PixArtAlpha", {
        "tiny": _pixart(128, 2, 2, caption=256),
        "bench": _pixart(1152, 8, 16),
        "full": _pixart(1152, 28, 16),
    }, latent_channels=4, context=(120, 4096), min_latent=48,
        notes="PixArt-alpha DiT; its position embedding needs latents of at least 48x48 (384 px)"),
    Family("sd3", "SD3", {
        "tiny": _sd3(2, context=256, pooled=128, patches=32),
        "bench": _sd3(8, context=1024, pooled=768, patches=64),
        "full": _sd3(24),
    }, latent_channels=16, context=(154, 4096), pooled=2048, detectable=("tiny", "bench", "full"),
        notes="MMDiT width is 64 x depth; context and pooled widths are read from the weights"),
    Family("flux", "Flux", {
        "tiny": _flux(256, 2, 2, 2, context=256),
        "bench": _flux(1024, 8, 4, 8),
        "full": _flux(3072, 24, 19, 38),
    }, latent_channels=16, context=(256, 4096), pooled=768, guidance=3.5, detectable=("full",),
        notes="ComfyUI's detection fixes Flux at hidden 3072 / 24 heads / 4096 context"),
    Family("wan21", "WAN21_T2V", {
        "tiny": _wan(256, 512, 2),
        "bench": _wan(768, 3072, 8),
        "full": _wan(1536, 8960, 30),
    }, latent_channels=16, video=True, temporal_ratio=4, context=(512, 4096),
        detectable=("tiny", "bench", "full"), vae="wan21", output_layer="head.head", notes="full is Wan 2.1 1.3B"),
    Family("hunyuan_video", "HunyuanVideo", {
        "tiny": _hunyuan_video(256, 1, 1, context=256),
        "bench": _hunyuan_video(1024, 4, 8),
        "full": _hunyuan_video(3072, 20, 40),
    }, latent_channels=16, video=True, temporal_ratio=4, context=(256, 4096), pooled=768,
        guidance=6.0, detectable=("tiny", "bench", "full"), vae="wan21",
        notes="VAE stand-in: a Wan 2.1 VAE (same 16-channel, 4x temporal / 8x spatial latent)"),
    Family("qwen_image", "QwenImage", {
        "tiny": _qwen_image(2, 2, context=256),
        "bench": _qwen_image(8, 8, context=1024),
        "full": _qwen_image(60, 24),
    }, latent_channels=16, context=(128, 3584), output_layer="proj_out", vae="wan21",
        notes="not detectable at small widths"),
    Family("ltxv", "LTXV", {
        "tiny": _ltxv(2, 8),
        "bench": _ltxv(8, 24),
        "full": _ltxv(28, 64),
    }, latent_channels=128, video=True, temporal_ratio=8, spatial_ratio=32, context=(128, 4096),
        cond_extras=("attention_mask",), detectable=("tiny", "bench", "full"), vae="ltxv",
        output_layer="proj_out",
        notes="full is LTX-Video 2B; 32 heads at every size, as ComfyUI's detection assumes"),
    Family("chroma", "Chroma", {
        "tiny": _chroma(256, 2, 2, 2, context=256, approx_hidden=512, approx_layers=2),
        "bench": _chroma(512, 4, 4, 8, approx_hidden=1024),
        "full": _chroma(3072, 24, 19, 38),
    }, latent_channels=16, context=(256, 4096), cond_extras=("no_pooled",), detectable=("full",),
        notes="Flux layout without the pooled vector and guidance: modulations come from an "
              "approximator MLP; real CFG"),
    Family("wan22_5b", "WAN22_T2V", {
        "tiny": _wan22(256, 512, 2),
        "bench": _wan22(768, 3072, 8),
        "full": _wan22(3072, 14336, 30),
    }, latent_channels=48, video=True, temporal_ratio=4, spatial_ratio=16, context=(512, 4096),
        detectable=("tiny", "bench", "full"), vae="wan22", output_layer="head.head",
        notes="full is Wan 2.2 TI2V 5B (Wan 2.2 14B is the wan21 architecture as two experts)"),
    Family("mochi", "GenmoMochi", {
        "tiny": _mochi(256, 128, 2, 2, t5=256),
        "bench": _mochi(512, 256, 4, 8, t5=1024),
        "full": _mochi(3072, 1536, 24, 48),
    }, latent_channels=12, video=True, temporal_ratio=6, context=(256, 4096),
        cond_extras=("attention_mask",), detectable=("full",), vae="mochi",
        notes="asymmetric joint DiT (text stream half the width); detection fixes the full widths"),
    Family("auraflow", "AuraFlow", {
        "tiny": _auraflow(256, 1, 1, 2, context=256, max_seq=256),
        "bench": _auraflow(512, 2, 2, 8, context=1024),
        "full": _auraflow(3072, 12, 4, 32),
    }, latent_channels=4, context=(256, 2048), detectable=("full",), output_layer="final_linear",
        notes="MMDiT blocks then DiT blocks on the joint sequence; detection fixes width 3072"),
    Family("hunyuan_dit", "HunyuanDiT", {
        "tiny": _hunyuan_dit(256, 2, heads=2, text=256, text_t5=256),
        "bench": _hunyuan_dit(768, 10, heads=12, text=1024, text_t5=512),
        "full": _hunyuan_dit(1408, 40, mlp_ratio=4.3637),
    }, latent_channels=4, context=(77, 1024), cond_extras=("attention_mask", "mt5"),
        detectable=("full",), notes="Hunyuan-DiT v1.2: long skip connections between the block "
                                    "halves; CLIP (BERT) and mT5 text streams"),
    Family("hidream", "HiDream", {
        "tiny": _hidream(2, 1, 2, caption=256, pooled=128),
        "bench": _hidream(3, 2, 8, caption=1024),
        "full": _hidream(20, 16, 32, llama_layers=list(range(32)) + [31] * 16),
    }, latent_channels=16, context=(128, 4096), pooled=2048, cond_extras=("llama3",),
        detectable=("full",), notes="HiDream-I1: MoE feed-forwards; each block also reads one "
                                    "Llama 3.1 hidden layer"),
    Family("lumina2", "Lumina2", {
        "tiny": _lumina2(192, 2, 1, 2, context=256),
        "bench": _lumina2(576, 6, 2, 10),
        "full": _lumina2(2304, 24, 8, 26),
    }, latent_channels=16, context=(128, 2304), cond_extras=("attention_mask",),
        detectable=("full",), notes="Lumina Image 2.0 NextDiT: context and noise refiners, "
                                    "then the joint layers"),
    Family("cosmos_predict2", "CosmosT2IPredict2", {
        "tiny": _cosmos_predict2(256, 2, 2, context=256),
        "bench": _cosmos_predict2(768, 10, 16),
        "full": _cosmos_predict2(2048, 28, 16),
    }, latent_channels=16, context=(512, 1024), detectable=("bench", "full"), vae="wan21",
        notes="Cosmos-Predict2 2B text-to-image; below 2048 channels ComfyUI's detection gives "
              "10 blocks of 16 heads and a 1024-wide T5 context, so tiny is in-process only"),
]}

SIZES = ("tiny", "bench", "full")


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise KeyError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def context_shape(fam: Family, size: str) -> tuple[int, int]:
    """(tokens, width) of the text conditioning the model of this size consumes."""
    cfg = fam.configs[size]
    tokens, width = fam.context
    if "context_in_dim" in cfg:
        width = cfg["context_in_dim"]
    elif "context_embedder_config" in cfg:
        width = cfg["context_embedder_config"]["params"]["in_features"]
    elif "caption_channels" in cfg:  # HiDream: [T5 width, Llama width]
        width = cfg["caption_channels"]
        width = width[0] if isinstance(width, (list, tuple)) else width
    else:
        for key in ("joint_attention_dim", "context_dim", "t5_feat_dim", "cond_seq_dim",
                    "text_states_dim", "cap_feat_dim", "crossattn_emb_channels"):
            if key in cfg:
                width = cfg[key]
                break
    return tokens, width


def pooled_width(fam: Family, size: str) -> int | None:
    cfg = fam.configs[size]
    if fam.pooled is None:
        return None
    if fam.name == "sd3":
        return cfg.get("adm_in_channels", fam.pooled)
    return cfg.get("text_emb_dim", fam.pooled)  # HiDream's pooled CLIP-L + CLIP-G width


# ---------------------------------------------------------------------------------------------
# Weights

def _name_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def generated_tensor(name: str, shape: torch.Size, seed: int, dtype=torch.float32) -> torch.Tensor:
    """A deterministic value for parameter `name`: fan-in scaled for matrices and kernels, ones for
    norm scales, small values for biases and embeddings."""
    gen = torch.Generator().manual_seed(_name_seed(seed, name))
    leaf = name.rsplit(".", 1)[-1]
    if len(shape) >= 2 and leaf in ("weight", "proj", "w"):
        fan_in = math.prod(shape[1:])
        t = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
    elif len(shape) == 1 and leaf in ("weight", "scale", "gamma"):
        t = torch.ones(shape)
    elif leaf == "bias" or leaf == "beta":
        t = torch.randn(shape, generator=gen) * 0.02
    else:  # positional embeddings, modulation tables, register tokens, ...
        t = torch.randn(shape, generator=gen) * 0.1
    return t.to(dtype)


def fill_module(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every parameter, and every floating buffer that ComfyUI leaves uninitialised, a
    generated value. ComfyUI's layers skip initialisation, so without this a model is NaN."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(generated_tensor(name, p.shape, seed, p.dtype))
            p.requires_grad_(False)  # inference only, as ComfyUI's loaders leave them
        for name, b in module.named_buffers():
            if b.is_floating_point() and (not torch.isfinite(b).all() or b.abs().max() > 1e4
                                          or name.endswith("pos_embed")):
                b.copy_(generated_tensor(name, b.shape, seed, b.dtype))
    return module


# ---------------------------------------------------------------------------------------------
# Models

def model_config(fam: Family, size: str, dtype=torch.float32, unet_config: dict | None = None):
    import comfy.supported_models
    cls = getattr(comfy.supported_models, fam.model_class)
    cfg = cls(dict(unet_config if unet_config is not None else fam.configs[size]))
    cfg.set_inference_dtype(dtype, None)
    return cfg


def build_model(name: str, size: str = "tiny", seed: int = 0, dtype=torch.float32,
                unet_config: dict | None = None, calibrate: bool = True):
    """A ComfyUI ModelPatcher around a freshly built model of `name` at `size` (or, for tests that
    need another layout of the family, at `unet_config`; pass calibrate=False when its text width
    differs from the family's, or when its weights are replaced anyway)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    fam = family(name)
    if size not in fam.configs:
        raise KeyError(f"unknown size {size!r}; known: {', '.join(fam.configs)}")
    cfg = model_config(fam, size, dtype, unet_config)
    model = cfg.get_model({})
    fill_module(model.diffusion_model, seed)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    if calibrate:
        _calibrate_output_scale(patcher, fam, size, seed)
    model.diffusion_model.to(dtype)
    return patcher


def _calibrate_output_scale(patcher, fam: Family, size: str, seed: int) -> None:
    """Scale the output layer so one denoising call returns unit-variance predictions, as a trained
    model does. Generated weights otherwise give predictions of std 10-100 on deep UNets, which
    makes every sampler step overshoot."""
    layer = patcher.model.diffusion_model.get_submodule(fam.output_layer)
    seen: list[float] = []
    hook = layer.register_forward_hook(lambda _m, _i, out: seen.append(float(out.float().std())))
    try:
        sample(patcher, fam.name, size, steps=1, cfg=1.0, seed=seed, width=64, height=64)
    finally:
        hook.remove()
    with torch.no_grad():
        layer.weight.mul_(1.0 / max(seen[0], 1e-6))
        if layer.bias is not None:
            layer.bias.zero_()


def sample(patcher, name: str, size: str = "tiny", steps: int = 20, cfg: float = 7.0,
           sampler: str = "euler", scheduler: str = "normal", seed: int = 0, width: int = 64,
           height: int = 64, frames: int = 5, batch: int = 1, prompt: str = "a photo",
           negative: str = "", denoise: float = 1.0, latent: dict | None = None) -> torch.Tensor:
    """Run ComfyUI's KSampler (`nodes.common_ksampler`) on generated conditioning; returns the
    final latent."""
    import nodes as comfy_nodes
    fam = family(name)
    if latent is None:
        latent = empty_latent(name, batch, width, height,
                              frames if fam.video or fam.frames_as_batch else 1)
    pos = conditioning(name, size, prompt, batch, seed)
    neg = conditioning(name, size, negative, batch, seed)
    out = comfy_nodes.common_ksampler(patcher, seed, steps, cfg, sampler, scheduler, pos, neg, latent,
                                      denoise=denoise)
    return out[0]["samples"]


def diffusion_state_dict(patcher) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in patcher.model.diffusion_model.state_dict().items()}


def save_diffusion_model(name: str, size: str, path: Path, seed: int = 0, dtype=torch.float16) -> Path:
    """Write the diffusion model as a .safetensors file the `UNETLoader` node loads (families and
    sizes listed in `Family.detectable`)."""
    import safetensors.torch
    fam = family(name)
    if size not in fam.detectable:
        raise ValueError(f"ComfyUI cannot detect {name} at size {size!r} from a file "
                         f"(detectable sizes: {fam.detectable or 'none'}): build it in-process instead")
    sd = {k: v.to(dtype) for k, v in diffusion_state_dict(build_model(name, size, seed)).items()}
    for k, v in sd.items():
        if not torch.isfinite(v).all():
            raise ValueError(f"generated weight {k} is not finite in {dtype}")
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(sd, str(path), metadata={"comfyui-optim": f"{name}/{size}/seed{seed}"})
    return path


# ---------------------------------------------------------------------------------------------
# VAE

def vae_state_dict(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A VAE state dict in a format ComfyUI's `VAE` class (and `VAELoader`) detects from its keys:
    TAESD for image families (4 or 16 latent channels), Wan 2.1's VAE for video families with a
    16-channel latent and for Qwen-Image and Cosmos-Predict2 (whose latents ComfyUI handles as
    one-frame videos), and the family's own VAE where its latent is unlike any other (Wan 2.2,
    LTX-Video, Mochi: ComfyUI detects these only at their published sizes, 420-700M parameters)."""
    fam = family(name)
    if fam.vae == "taesd":
        from comfy.taesd.taesd import TAESD
        vae = TAESD(latent_channels=fam.latent_channels)
        sd = fill_module(vae, seed).state_dict()
        return {k: v for k, v in sd.items() if k.startswith(("taesd_encoder.", "taesd_decoder."))}
    if fam.vae == "wan21":
        from comfy.ldm.wan.vae import WanVAE
        vae = WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                     temperal_downsample=[False, True, True], dropout=0.0)
    elif fam.vae == "wan22":
        from comfy.ldm.wan.vae2_2 import WanVAE
        vae = WanVAE(dim=160, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                     temperal_downsample=[False, True, True], dropout=0.0)
    elif fam.vae == "ltxv":
        from comfy.ldm.lightricks.vae.causal_video_autoencoder import VideoVAE
        vae = VideoVAE(version=0)
    elif fam.vae == "mochi":
        from comfy.ldm.genmo.vae.model import VideoVAE
        vae = VideoVAE()
    else:
        raise ValueError(f"unknown VAE kind {fam.vae!r} for {name}")
    return fill_module(vae, seed).state_dict()


def build_vae(name: str, seed: int = 0):
    import comfy.sd
    return comfy.sd.VAE(sd=vae_state_dict(name, seed))


def save_vae(name: str, path: Path, seed: int = 0, dtype=torch.float16) -> Path:
    import safetensors.torch
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in vae_state_dict(name, seed).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(sd, str(path))
    return path


# ---------------------------------------------------------------------------------------------
# Conditioning and latents

def _prompt_generator(prompt: str, seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(_name_seed(seed, "prompt:" + prompt))


def conditioning(name: str, size: str = "tiny", prompt: str = "", batch: int = 1, seed: int = 0) -> list:
    """A CONDITIONING value as CLIPTextEncode would give it, with generated embeddings: the same
    prompt and seed always give the same tensors, different prompts give different ones."""
    fam = family(name)
    tokens, width = context_shape(fam, size)
    gen = _prompt_generator(prompt, seed)
    cond = torch.randn((1, tokens, width), generator=gen).repeat(batch, 1, 1)
    extra: dict = {}
    pooled = pooled_width(fam, size)
    if pooled is not None:
        extra["pooled_output"] = torch.randn((1, pooled), generator=gen).repeat(batch, 1)
    if fam.guidance is not None:
        extra["guidance"] = fam.guidance
    cfg = fam.configs[size]
    for kind in fam.cond_extras:
        if kind == "attention_mask":  # every token is a prompt token: the mask masks nothing
            extra["attention_mask"] = torch.ones((batch, tokens), dtype=torch.long)
        elif kind == "no_pooled":  # what CLIPTextEncode gives for a T5-only text encoder
            extra["pooled_output"] = None
        elif kind == "mt5":
            t5_tokens, t5_width = cfg.get("text_len_t5", 256), cfg.get("text_states_dim_t5", 2048)
            extra["conditioning_mt5xl"] = torch.randn((1, t5_tokens, t5_width),
                                                      generator=gen).repeat(batch, 1, 1)
            extra["attention_mask_mt5xl"] = torch.ones((batch, t5_tokens), dtype=torch.long)
        elif kind == "llama3":  # [batch, Llama layers, tokens, width], the layers the blocks index
            layers = max(cfg["llama_layers"]) + 1
            width = cfg["caption_channels"][1]
            extra["conditioning_llama3"] = torch.randn((1, layers, tokens, width),
                                                       generator=gen).repeat(batch, 1, 1, 1)
        else:
            raise ValueError(f"unknown conditioning extra {kind!r} for {name}")
    return [[cond, extra]]


def latent_shape(name: str, batch: int, width: int, height: int, frames: int = 1) -> tuple[int, ...]:
    fam = family(name)
    # a family with a floor on the latent size (PixArt) gets at least that: callers ask for small
    # images to keep tests quick, the model could not run them
    h = max(height // fam.spatial_ratio, fam.min_latent)
    w = max(width // fam.spatial_ratio, fam.min_latent)
    if fam.frames_as_batch:
        return (batch * frames, fam.latent_channels, h, w)
    if fam.video:
        return (batch, fam.latent_channels, (frames - 1) // fam.temporal_ratio + 1, h, w)
    return (batch, fam.latent_channels, h, w)


def empty_latent(name: str, batch: int = 1, width: int = 64, height: int = 64, frames: int = 1) -> dict:
    """A LATENT value as the Empty*Latent nodes give it."""
    return {"samples": torch.zeros(latent_shape(name, batch, width, height, frames))}


