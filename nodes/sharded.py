"""Sharded checkpoints: OptimLoadShardedModel (a sharded diffusers or ComfyUI model folder under
ComfyUI's models directory -> MODEL, one shard at a time) and OptimSaveModelShards (MODEL -> shards
in ComfyUI's output directory)."""
import logging
import os
import time
from pathlib import Path

from comfy_api.latest import io

from ..optim import sharded
from .messages import node_id_of, stats_sender

log = logging.getLogger("comfyui-optim")

# folders searched, as ComfyUI names them: models/diffusers, then models/diffusion_models (and unet)
FOLDER_KINDS = ("diffusers", "diffusion_models")
MAX_DEPTH = 3
DTYPES = {"default": None, "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
LAYOUTS = ("comfyui", "diffusers")


def _bases() -> list[Path]:
    import folder_paths
    out = []
    for kind in FOLDER_KINDS:
        try:
            out += [Path(p) for p in folder_paths.get_folder_paths(kind)]
        except KeyError:
            pass
    return out


def model_folders() -> dict[str, Path]:
    """Name (path relative to its models folder, '/'-separated) -> folder, for every folder holding a
    sharded index or a single diffusers weight file, at most MAX_DEPTH levels down. Only these names
    are accepted: a prompt cannot point the loader anywhere else."""
    found: dict[str, Path] = {}
    for base in _bases():
        if not base.is_dir():
            continue
        for root, dirs, _files in os.walk(base, followlinks=True):
            rel = Path(root).relative_to(base)
            if len(rel.parts) >= MAX_DEPTH:
                dirs[:] = []
            dirs.sort()
            if rel.parts and sharded.is_model_folder(Path(root)):
                found.setdefault("/".join(rel.parts), Path(root))
    return found


def resolve_folder(name: str) -> Path:
    folders = model_folders()
    if name not in folders:
        listed = ", ".join(sorted(folders)[:10]) or "none: put a sharded model folder under models/diffusers"
        raise ValueError(f"unknown model folder {name!r}; available: {listed}")
    return folders[name]


class RamPeak:
    """The process's resident memory above its level at creation, sampled when called (after each
    shard: the loader's peak is the model plus one shard, reached as a shard is closed). None where
    psutil is missing."""

    def __init__(self):
        try:
            import psutil
            self._proc = psutil.Process()
            self.start = self._proc.memory_info().rss
        except Exception:
            self._proc, self.start = None, None
        self.peak = self.start

    def sample(self) -> None:
        if self._proc is not None:
            self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def above_start(self):
        return None if self._proc is None else self.peak - self.start


def load_stats(path: Path, info: dict, ram: RamPeak, seconds: float) -> dict:
    """What the loader's badge shows: shards and bytes read, RAM peak above the start, the layout."""
    folder = sharded.open_folder(path)
    return {"shards_read": info["shards"], "bytes_read": folder.nbytes, "layout": info["layout"],
            "weights_missing": info["missing"], "peak_ram_above_start_bytes": ram.above_start,
            "load_seconds": round(seconds, 3)}


def save_stats(files: list[Path], folder: str, layout: str) -> dict:
    """What the saver's badge shows: shards and bytes written and where (relative to output/)."""
    shards = [f for f in files if f.suffix == ".safetensors"]
    return {"shards_written": len(shards), "bytes_written": sum(f.stat().st_size for f in shards),
            "folder": folder, "layout": layout}


class OptimLoadShardedModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OptimLoadShardedModel",
            display_name="Optim Load Sharded Model",
            category="optim/loaders",
            description="Loads a sharded diffusion model folder (diffusion_pytorch_model.safetensors.index.json "
                        "and its shards, in diffusers' layout or ComfyUI's) from models/diffusers or "
                        "models/diffusion_models, one shard at a time: peak RAM is the model plus one shard. "
                        "Families: UNet models ComfyUI knows in diffusers form (SD1.x/2.x/XL), Flux, SD3, "
                        "AuraFlow, PixArt; any family in ComfyUI's own layout.",
            inputs=[
                io.Combo.Input("folder", options=sorted(model_folders()),
                               tooltip="A folder under models/diffusers or models/diffusion_models with an "
                                       "index file and its shards."),
                io.Combo.Input("weight_dtype", options=list(DTYPES), default="default",
                               tooltip="default: as ComfyUI chooses for the device and the file's dtype."),
            ],
            outputs=[io.Model.Output(display_name="model")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, folder, weight_dtype="default"):
        # this ComfyUI does not check V3 combos itself
        if weight_dtype not in DTYPES:
            return f"weight_dtype must be one of {list(DTYPES)}, got {weight_dtype!r}"
        if folder not in model_folders():
            return f"unknown model folder {folder!r} (choose one listed under models/diffusers or models/diffusion_models)"
        return True

    @classmethod
    def execute(cls, folder, weight_dtype="default") -> io.NodeOutput:
        import torch
        path = resolve_folder(folder)
        dtype = getattr(torch, DTYPES[weight_dtype]) if DTYPES.get(weight_dtype) else None
        ram = RamPeak()
        start = time.perf_counter()
        try:
            model = sharded.load_sharded(path, dtype=dtype, on_shard=lambda _i, _p: ram.sample())
        except sharded.ShardError as e:
            raise ValueError(f"OptimLoadShardedModel: {folder}: {e}") from None
        info = model.sharded_info
        log.info("Sharded load of %s: %s layout, %d shards, %d weights missing", folder, info["layout"],
                 info["shards"], info["missing"])
        # no sampling run to wait for: the badge gets the load's figures now
        stats_sender(node_id_of(cls), "sharded_load")(load_stats(path, info, ram, time.perf_counter() - start))
        return io.NodeOutput(model)


class OptimSaveModelShards(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OptimSaveModelShards",
            display_name="Optim Save Model Shards",
            category="optim/loaders",
            description="Saves the diffusion model (with its LoRA and other weight patches applied) as "
                        "safetensors shards of at most max_shard_size plus an index, in a new folder under "
                        "ComfyUI's output directory. Move the folder to models/diffusers to load it with "
                        "Optim Load Sharded Model.",
            inputs=[
                io.Model.Input("model"),
                io.String.Input("filename_prefix", default="optim_shards/model"),
                io.String.Input("max_shard_size", default="2GB",
                                tooltip="Largest shard, e.g. 2GB, 500MB, 1.5GiB (a single larger tensor gets a "
                                        "shard of its own)."),
                io.Combo.Input("layout", options=list(LAYOUTS), default="comfyui",
                               tooltip="comfyui: ComfyUI's own key names (any model). diffusers: diffusers' names "
                                       "(UNet models, Flux and SD3)."),
            ],
            outputs=[io.String.Output(display_name="folder")],
            is_output_node=True,
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, max_shard_size="2GB", layout="comfyui", filename_prefix="optim_shards/model"):
        if layout not in LAYOUTS:
            return f"layout must be one of {list(LAYOUTS)}, got {layout!r}"
        try:
            sharded.parse_shard_size(max_shard_size)
        except sharded.ShardError as e:
            return str(e)
        if not str(filename_prefix).strip():
            return "filename_prefix must not be empty"
        return True

    @classmethod
    def execute(cls, model, filename_prefix="optim_shards/model", max_shard_size="2GB",
                layout="comfyui") -> io.NodeOutput:
        import comfy.model_management as mm
        import folder_paths
        try:
            max_bytes = sharded.parse_shard_size(max_shard_size)
            key_map = sharded.diffusers_key_map(model.model) if layout == "diffusers" else None
        except sharded.ShardError as e:
            raise ValueError(f"OptimSaveModelShards: {e}") from None
        output_dir = folder_paths.get_output_directory()
        # ComfyUI's own rule for output names: refuses anything outside the output directory
        full_folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, output_dir)
        target = Path(full_folder) / f"{filename}_{counter:05}"
        while target.exists():
            counter += 1
            target = Path(full_folder) / f"{filename}_{counter:05}"
        # weights as ComfyUI would run them: patches (LoRA, ...) applied, as its ModelSave does
        mm.load_models_gpu([model], force_patch_weights=True)
        state = model.model.diffusion_model.state_dict()
        try:
            files = sharded.save_sharded(state, target, max_bytes, key_map,
                                         metadata={"comfyui-optim.layout": layout})
        except sharded.ShardError as e:
            raise ValueError(f"OptimSaveModelShards: {e}") from None
        rel = os.path.relpath(target, output_dir)
        stats_sender(node_id_of(cls), "sharded_save")(save_stats(files, rel, layout))
        log.info("Saved %s as %d shards in %s", type(model.model.diffusion_model).__name__, len(files) - 1, rel)
        return io.NodeOutput(rel)
