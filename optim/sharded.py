"""Sharded checkpoints: load a diffusers-format (or ComfyUI-format) sharded diffusion model folder
into a ComfyUI model one shard at a time, and save a model as shards.

Loading follows `comfy.sd.load_diffusion_model_state_dict` step by step, except that the weights
never exist twice in full: the model is built empty from the layout read from the shards' headers
(shapes and dtypes only), then each shard is opened, its tensors converted with ComfyUI's own key
maps (`comfy.utils.unet_to_diffusers`, `flux_to_diffusers`, `mmdit_to_diffusers`,
`auraflow_to_diffusers`, `pixart_to_diffusers`, fused q/k/v written into their slice of the fused
weight) and copied into the model's parameters, and the shard closed before the next one opens.
Peak RAM is the model plus one shard (a whole-file load holds the model and the whole file).

Families: those whose diffusers layout this ComfyUI converts (UNet models in its list of known
diffusers configs: SD1.x/2.x/XL...; Flux, SD3, AuraFlow, PixArt), and any family in ComfyUI's own
key layout.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("comfyui-optim")

INDEX_SUFFIX = ".safetensors.index.json"
SINGLE_FILE = "diffusion_pytorch_model.safetensors"
SHARD_NAME = "diffusion_pytorch_model-{:05d}-of-{:05d}.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


class ShardError(ValueError):
    """A folder, index or size that cannot be used."""


# ---------------------------------------------------------------------------------------------
# Folders and indexes

@dataclass
class ShardedFolder:
    path: Path
    shards: list[tuple[Path, list[str]]]     # shard file, its tensor names (index order)

    @property
    def nbytes(self) -> int:
        return sum(p.stat().st_size for p, _ in self.shards)


def index_file(folder: Path) -> Path | None:
    """The folder's index: diffusers' name first, else the only `*.safetensors.index.json`."""
    if (folder / INDEX_NAME).is_file():
        return folder / INDEX_NAME
    found = sorted(p for p in folder.iterdir() if p.name.endswith(INDEX_SUFFIX) and p.is_file())
    if len(found) > 1:
        raise ShardError(f"{folder.name}: several index files ({', '.join(p.name for p in found)}); "
                         f"keep one, or name it {INDEX_NAME}")
    return found[0] if found else None


def is_model_folder(folder: Path) -> bool:
    try:
        return folder.is_dir() and (index_file(folder) is not None or (folder / SINGLE_FILE).is_file())
    except (ShardError, OSError):
        return True          # listed, so that choosing it explains what is wrong


def open_folder(folder: Path) -> ShardedFolder:
    """Read and check the index: every shard a plain file name inside the folder (an index must not
    point anywhere else), every shard present, every tensor in one shard. A folder with a single
    `diffusion_pytorch_model.safetensors` is one shard."""
    folder = Path(folder)
    idx = index_file(folder)
    if idx is None:
        single = folder / SINGLE_FILE
        if not single.is_file():
            raise ShardError(f"{folder.name}: no {INDEX_NAME} and no {SINGLE_FILE}")
        return ShardedFolder(folder, [(single, _keys_of(single))])
    try:
        index = json.loads(idx.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{idx.name}: not valid JSON ({e})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ShardError(f"{idx.name}: no \"weight_map\" object")
    by_shard: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or not isinstance(key, str):
            raise ShardError(f"{idx.name}: weight_map entries must be strings, got {key!r}: {shard!r}")
        if shard != os.path.basename(shard) or shard in (".", "..") or not shard.endswith(".safetensors") \
                or "\\" in shard:
            raise ShardError(f"{idx.name}: shard {shard!r} is not a .safetensors file name in the folder")
        by_shard.setdefault(shard, []).append(key)
    shards = []
    for name, keys in by_shard.items():
        p = folder / name
        if not p.is_file():
            raise ShardError(f"{idx.name}: shard {name} is missing")
        present = set(_keys_of(p))
        lost = [k for k in keys if k not in present]
        if lost:
            raise ShardError(f"{name} lacks {len(lost)} tensor(s) its index lists, e.g. {lost[0]}")
        shards.append((p, keys))
    return ShardedFolder(folder, shards)


def _keys_of(path: Path) -> list[str]:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return list(f.keys())
    except Exception as e:   # a truncated or foreign file
        raise ShardError(f"{path.name}: not a readable safetensors file ({e})") from None


def meta_state_dict(folder: ShardedFolder) -> dict[str, torch.Tensor]:
    """Every tensor as an empty `meta` tensor of its shape and dtype: enough for ComfyUI's model
    detection, read from the shards' headers without loading a weight."""
    from safetensors import safe_open
    out = {}
    for path, keys in folder.shards:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for k in keys:
                s = f.get_slice(k)
                out[k] = torch.empty(s.get_shape(), dtype=_DTYPES[s.get_dtype()], device="meta")
    return out


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


# ---------------------------------------------------------------------------------------------
# Conversion plan: source key -> (ComfyUI key, slice of a fused weight or None, function or None)

@dataclass
class Conversion:
    model_config: object
    layout: str                                   # "comfyui", "diffusers-unet", "diffusers-<family>"
    targets: dict[str, tuple[str, tuple | None, object]]
    converted_meta: dict[str, torch.Tensor]       # ComfyUI keys -> meta tensors (for get_model)


def diffusers_family_map(sd) -> tuple[str, dict] | None:
    """ComfyUI's key map for a diffusers DiT state dict: the same tests, in the same order, as
    `comfy.model_detection.convert_diffusers_mmdit`."""
    import comfy.utils
    from comfy.model_detection import count_blocks
    if 'joint_transformer_blocks.0.attn.add_k_proj.weight' in sd:
        joint = count_blocks(sd, 'joint_transformer_blocks.{}.')
        single = count_blocks(sd, 'single_transformer_blocks.{}.')
        return "auraflow", comfy.utils.auraflow_to_diffusers({"n_double_layers": joint, "n_layers": joint + single})
    if 'adaln_single.emb.timestep_embedder.linear_1.bias' in sd and 'pos_embed.proj.bias' in sd:
        return "pixart", comfy.utils.pixart_to_diffusers({"depth": count_blocks(sd, 'transformer_blocks.{}.')})
    if 'x_embedder.weight' in sd:
        return "flux", comfy.utils.flux_to_diffusers({
            "depth": count_blocks(sd, 'transformer_blocks.{}.'),
            "depth_single_blocks": count_blocks(sd, 'single_transformer_blocks.{}.'),
            "hidden_size": sd["x_embedder.bias"].shape[0]})
    if 'transformer_blocks.0.attn.add_q_proj.weight' in sd and 'pos_embed.proj.weight' in sd:
        return "sd3", comfy.utils.mmdit_to_diffusers({"depth": sd["pos_embed.proj.weight"].shape[0] // 64,
                                                       "num_blocks": count_blocks(sd, 'transformer_blocks.{}.')})
    return None


def _apply_meta(sd_map: dict, sd: dict) -> dict:
    """The converted state dict's shapes (meta), as convert_diffusers_mmdit would build it."""
    out: dict[str, torch.Tensor] = {}
    for k, t in sd_map.items():
        w = sd.get(k)
        if w is None:
            continue
        if isinstance(t, str):
            out[t] = w
            continue
        offset = t[1]
        if offset is None:
            out[t[0]] = w
            continue
        old = out.get(t[0])
        need = offset[1] + offset[2]
        if old is None or old.shape[offset[0]] < need:
            shape = list(w.shape if old is None else old.shape)
            shape[offset[0]] = need
            out[t[0]] = torch.empty(shape, dtype=w.dtype, device="meta")
    return out


def plan_conversion(meta: dict[str, torch.Tensor]) -> Conversion:
    import comfy.utils
    from comfy import model_detection
    prefix = model_detection.unet_prefix_from_state_dict(meta)
    stripped = {k[len(prefix):]: (k, v) for k, v in meta.items() if k.startswith(prefix)}
    if not stripped:
        stripped = {k: (k, v) for k, v in meta.items()}
    sd = {k: v for k, (_src, v) in stripped.items()}
    src_of = {k: src for k, (src, _v) in stripped.items()}

    config = model_detection.model_config_from_unet(sd, "")
    if config is not None:
        return Conversion(config, "comfyui", {src_of[k]: (k, None, None) for k in sd}, sd)
    fam = diffusers_family_map(sd)
    if fam is not None:
        name, sd_map = fam
        converted = _apply_meta(sd_map, sd)
        config = model_detection.model_config_from_unet(converted, "")
        if config is None:
            raise ShardError(f"diffusers {name} layout recognised, but ComfyUI cannot detect the model from it")
        targets = {}
        for k, t in sd_map.items():
            if k not in sd:
                continue
            if isinstance(t, str):
                targets[src_of[k]] = (t, None, None)
            else:
                targets[src_of[k]] = (t[0], t[1], t[2] if len(t) > 2 else None)
        return Conversion(config, f"diffusers-{name}", targets, converted)
    config = model_detection.model_config_from_diffusers_unet(sd)
    if config is None:
        raise ShardError("not a model layout this ComfyUI can load: neither its own keys, nor a diffusers "
                         "UNet of a known configuration, nor a diffusers Flux/SD3/AuraFlow/PixArt transformer")
    keys = comfy.utils.unet_to_diffusers(config.unet_config)
    targets = {src_of[k]: (v, None, None) for k, v in keys.items() if k in sd}
    return Conversion(config, "diffusers-unet", targets, {v: sd[k] for k, v in keys.items() if k in sd})


# ---------------------------------------------------------------------------------------------
# Loading

class _LazyWeights(dict):
    """The converted state dict as `get_model` sees it: keys and shapes of every weight (meta), and
    the real values of plainly renamed weights read on demand (some families look at a weight to
    tell variants apart, e.g. SD2's v-prediction test)."""

    def __init__(self, meta: dict, reader):
        super().__init__(meta)
        self._reader = reader

    def __getitem__(self, key):
        value = self._reader(key)
        return value if value is not None else super().__getitem__(key)

    def get(self, key, default=None):
        return self[key] if key in self else default


def load_sharded(folder: Path, dtype: torch.dtype | None = None, on_shard=None):
    """A ComfyUI ModelPatcher of the model in `folder`, filled shard by shard. `on_shard(i, path)`
    is called after each shard is copied in and closed (benchmarks read memory there)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.utils
    from safetensors import safe_open

    sharded = open_folder(folder)
    meta = meta_state_dict(sharded)
    conv = plan_conversion(meta)
    config = conv.model_config

    # as comfy.sd.load_diffusion_model_state_dict chooses them
    parameters = sum(t.nelement() for t in conv.converted_meta.values())
    weight_dtype = comfy.utils.weight_dtype(conv.converted_meta)
    load_device = mm.get_torch_device()
    offload_device = mm.unet_offload_device()
    if config.scaled_fp8 is not None:
        weight_dtype = None
    unet_dtype = dtype if dtype is not None else mm.unet_dtype(
        model_params=parameters, supported_dtypes=list(config.supported_inference_dtypes), weight_dtype=weight_dtype)
    manual_cast = mm.unet_manual_cast(unet_dtype, load_device, config.supported_inference_dtypes)
    config.set_inference_dtype(unet_dtype, manual_cast)

    plain = {dst: src for src, (dst, off, fun) in conv.targets.items() if off is None and fun is None}
    shard_of = {k: p for p, keys in sharded.shards for k in keys}

    def read(key):
        src = plain.get(key)
        if src is None:
            return None
        with safe_open(str(shard_of[src]), framework="pt", device="cpu") as f:
            return f.get_tensor(src)

    model = config.get_model(_LazyWeights(conv.converted_meta, read), "")
    model = model.to(offload_device)
    dm = model.diffusion_model
    destinations = dict(dm.named_parameters())
    destinations.update(dict(dm.named_buffers()))
    written: set[str] = set()
    unexpected: list[str] = []
    sources: dict[str, tuple[str, str]] = {}

    with torch.no_grad():
        for i, (path, keys) in enumerate(sharded.shards):
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for src in keys:
                    target = conv.targets.get(src)
                    if target is None:
                        unexpected.append(src)
                        continue
                    dst, offset, fun = target
                    tensor = f.get_tensor(src)
                    if offset is not None or fun is not None:
                        part = fun(tensor) if fun is not None else tensor
                        dest = destinations.get(dst)
                        if dest is None:
                            unexpected.append(src)
                            continue
                        view = dest if offset is None else dest.narrow(offset[0], offset[1], offset[2])
                        _check_shape(src, part, view)
                        view.copy_(part)
                        written.add(dst)
                        continue
                    # the family's own per-key processing (renames, splits), as load_model_weights does
                    processed = config.process_unet_state_dict({dst: tensor})
                    for key, value in processed.items():
                        dest = destinations.get(key)
                        if dest is None:
                            unexpected.append(src)
                            continue
                        _check_shape(src, value, dest)
                        dest.copy_(value)
                        written.add(key)
                        if value is tensor and dest.dtype == tensor.dtype:
                            sources[key] = (str(path), src)      # the file holds this weight as is
                    del tensor, processed
            if on_shard is not None:
                on_shard(i, path)
    param_names = {k for k, _ in dm.named_parameters()}
    missing = [k for k in destinations if k not in written and k in param_names]
    if missing:
        log.warning("sharded load of %s: %d weights not in the shards (left uninitialised): %s",
                    sharded.path.name, len(missing), ", ".join(missing[:8]))
    if unexpected:
        log.info("sharded load of %s: %d tensors not used: %s", sharded.path.name, len(unexpected),
                 ", ".join(unexpected[:8]))
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)
    # where each weight can be read back from unchanged (group offload's disk mode maps it instead
    # of writing a copy; it checks the bytes again before relying on it)
    from .disk_offload import SOURCES_KEY
    patcher.set_attachments(SOURCES_KEY, sources)
    patcher.sharded_info = {"layout": conv.layout, "shards": len(sharded.shards), "missing": len(missing),
                            "unexpected": len(unexpected)}
    return patcher


def _check_shape(src: str, value: torch.Tensor, dest: torch.Tensor) -> None:
    if value.shape != dest.shape:
        raise ShardError(f"{src} has shape {tuple(value.shape)} where the model ComfyUI detected from the shards "
                         f"expects {tuple(dest.shape)}: ComfyUI's detection does not cover this variant (some "
                         f"families are only detected at their published widths)")


# ---------------------------------------------------------------------------------------------
# Saving

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?I?B)\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
          "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}
MIN_SHARD = 1 << 20


def parse_shard_size(text: str) -> int:
    """"2GB", "500MB", "1.5GiB" -> bytes (as diffusers' and transformers' max_shard_size; at least 1 MiB)."""
    m = _SIZE.match(str(text))
    if not m:
        raise ShardError(f"max_shard_size: expected a size such as \"2GB\" or \"500MB\", got {text!r}")
    size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if size < MIN_SHARD:
        raise ShardError(f"max_shard_size must be at least 1MiB, got {text!r}")
    return size


def split_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Keys in order, cut into shards of at most max_bytes (a tensor larger than that alone)."""
    shards: list[list[str]] = []
    current: list[str] = []
    used = 0
    for k, n in sizes.items():
        if current and used + n > max_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(k)
        used += n
    if current:
        shards.append(current)
    return shards


def diffusers_key_map(model) -> dict[str, tuple[str, tuple | None, object]]:
    """ComfyUI key -> [(diffusers key, slice, function)] inverted from ComfyUI's own maps, for the
    UNet models, Flux and SD3 (the layouts whose inverse is exact: renames, slices of fused weights and
    the self-inverse scale/shift swap)."""
    import comfy.utils
    cfg = model.model_config.unet_config
    dm = model.diffusion_model
    name = type(dm).__name__
    classes = {f"{c.__module__}.{c.__name__}" for c in type(dm).__mro__}
    if "comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel" in classes:
        return {comfy_key: [(diff_key, None, None)] for diff_key, comfy_key in comfy.utils.unet_to_diffusers(cfg).items()}
    if "comfy.ldm.flux.model.Flux" in classes and name == "Flux":     # not Chroma and other subclasses
        sd_map = comfy.utils.flux_to_diffusers({"depth": cfg["depth"], "depth_single_blocks": cfg["depth_single_blocks"],
                                                "hidden_size": cfg["hidden_size"]})
    elif "comfy.ldm.modules.diffusionmodules.mmdit.MMDiT" in classes:
        sd_map = comfy.utils.mmdit_to_diffusers({"depth": cfg["depth"], "num_blocks": len(dm.joint_blocks)})
    else:
        raise ShardError(f"saving {name} in diffusers layout is not supported (UNet models, Flux and SD3 are); "
                         "use layout 'comfyui'")
    out: dict = {}
    for diff_key, t in sd_map.items():
        if isinstance(t, str):
            out.setdefault(t, []).append((diff_key, None, None))
            continue
        fun = t[2] if len(t) > 2 else None
        if fun is not None and fun is not comfy.utils.swap_scale_shift:
            raise ShardError(f"no inverse known for the conversion of {diff_key}")
        out.setdefault(t[0], []).append((diff_key, t[1], fun))
    return out


def save_sharded(state_dict_source, folder: Path, max_bytes: int, key_map: dict | None = None,
                 metadata: dict | None = None) -> list[Path]:
    """Write `state_dict_source` ({key: tensor}, tensors may live on a GPU) as shards of at most
    `max_bytes` plus diffusers' index file. `key_map` (ComfyUI key -> [(key, slice, function)])
    writes another layout. One shard's CPU copies exist at a time."""
    import safetensors.torch
    entries: dict[str, tuple[str, tuple | None, object]] = {}
    for k, t in state_dict_source.items():
        for out_key, offset, fun in (key_map.get(k, []) if key_map is not None else [(k, None, None)]):
            entries[out_key] = (k, offset, fun)
    if key_map is not None:
        lost = [k for k in state_dict_source if k not in key_map]
        if lost:
            raise ShardError(f"{len(lost)} weights have no diffusers name, e.g. {lost[0]}; use layout 'comfyui'")

    def tensor_of(out_key):
        k, offset, fun = entries[out_key]
        t = state_dict_source[k]
        if offset is not None:
            t = t.narrow(offset[0], offset[1], offset[2])
        if fun is not None:
            t = fun(t)
        return t.detach().to("cpu").contiguous()

    def size_of(out_key):
        k, offset, _fun = entries[out_key]
        t = state_dict_source[k]
        n = t.nelement() if offset is None else t.nelement() // t.shape[offset[0]] * offset[2]
        return n * t.element_size()

    sizes = {k: size_of(k) for k in entries}
    groups = split_shards(sizes, max_bytes)
    folder.mkdir(parents=True, exist_ok=False)
    written = []
    weight_map = {}
    for i, keys in enumerate(groups, 1):
        name = SHARD_NAME.format(i, len(groups))
        shard = {k: tensor_of(k) for k in keys}
        safetensors.torch.save_file(shard, str(folder / name), metadata={"format": "pt", **(metadata or {})})
        del shard
        weight_map.update({k: name for k in keys})
        written.append(folder / name)
    index = {"metadata": {"total_size": sum(sizes.values()), **(metadata or {})}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2))
    return written + [folder / INDEX_NAME]
