"""The reference models' text encoder: a CLIP-L (ComfyUI's SD1 text model, 123M parameters) with
generated, frozen weights, regenerated deterministically from a seed and never shipped.

It is loaded like any CLIP-L: `CLIPLoader(type="stable_diffusion")` detects it from its keys, and
`CLIPTextEncode` gives the 77x768 token states and the 768-wide pooled vector the reference
denoisers were trained on. The weights are drawn so that the residual stream keeps each token's
identity (unit-scale token and position embeddings, residual branches scaled by 0.5), and only
the first `ACTIVE_LAYERS` layers do anything: the later layers have zero output projections, so
they are exact identities. The token states of a caption then carry its words (and, through the
causal attention, the padding positions and the pooled vector carry the whole caption), which is
all a denoiser needs to follow it; and training can compute CLIPTextEncode's output for the 1081
captions of the grammar through the active layers alone (`encode_fast`, checked against
`encode`), 12x cheaper than through all twelve.

Requires ComfyUI importable (see `bench.comfy_env.load_comfyui_in_process`).
"""
from __future__ import annotations

from pathlib import Path

import torch

TEXT_ENCODER_SEED = 20261127
FILE_NAME = "optim-reference-clip-l.safetensors"
RESIDUAL_SCALE = 0.5
ACTIVE_LAYERS = 1


def clip_l_state_dict(seed: int = TEXT_ENCODER_SEED) -> dict[str, torch.Tensor]:
    """The generated CLIP-L in the Hugging Face key layout (text_model.*, text_projection.weight)."""
    import comfy.ops
    import comfy.sd1_clip
    from bench.factory import fill_module
    # a text model on the meta device would skip the RAM; it is small enough to build for real
    model = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32).transformer
    fill_module(model, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("token_embedding.weight", "position_embedding.weight")):
                p.mul_(p.shape[-1] ** 0.5)  # unit scale: fill_module scales matrices by fan-in
            if name.endswith(("self_attn.out_proj.weight", "mlp.fc2.weight")):
                p.mul_(RESIDUAL_SCALE)
            if name.startswith("text_model.encoder.layers.") and \
                    int(name.split(".")[3]) >= ACTIVE_LAYERS and \
                    name.endswith(("self_attn.out_proj.weight", "self_attn.out_proj.bias",
                                   "mlp.fc2.weight", "mlp.fc2.bias")):
                p.zero_()  # an identity layer: x + 0 + 0
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def write_clip_l(path: Path, seed: int = TEXT_ENCODER_SEED) -> Path:
    """Write the generated CLIP-L (fp16) to `path` unless it is already there."""
    import safetensors.torch
    path = Path(path)
    if path.exists():
        return path
    sd = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in clip_l_state_dict(seed).items()}
    for k, v in sd.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ValueError(f"generated CLIP-L weight {k} is not finite in fp16")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    safetensors.torch.save_file(sd, str(tmp), metadata={"comfyui-optim": f"reference clip-l seed {seed}"})
    tmp.replace(path)
    return path


def load_clip(path: Path):
    """The CLIP object `CLIPLoader(type="stable_diffusion")` returns for the file at `path`."""
    import comfy.sd
    return comfy.sd.load_clip(ckpt_paths=[str(path)], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)


def encode(clip, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(token states [n, 77, 768], pooled [n, 768]) for each prompt, exactly as CLIPTextEncode
    computes them."""
    conds, pooleds = [], []
    for text in prompts:
        out = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True, return_dict=True)
        conds.append(out["cond"])
        pooleds.append(out["pooled_output"])
    return torch.cat(conds).float(), torch.cat(pooleds).float()


def encode_fast(clip, prompts: list[str], batch: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """What `encode` returns, batched and through the active layers only (the others are
    identities). Only for the generated CLIP-L of this module."""
    inner = clip.cond_stage_model.clip_l
    layers = inner.transformer.text_model.encoder.layers
    clip.load_model()
    conds, pooleds = [], []
    inner.transformer.text_model.encoder.layers = layers[:ACTIVE_LAYERS]
    try:
        with torch.no_grad():
            for i in range(0, len(prompts), batch):
                tokens = [[t[0] for t in clip.tokenize(p)["l"][0]] for p in prompts[i:i + batch]]
                z, pooled = inner.encode(tokens)[:2]
                conds.append(z.float())
                pooleds.append(pooled.float())
    finally:
        inner.transformer.text_model.encoder.layers = layers
    return torch.cat(conds), torch.cat(pooleds)
