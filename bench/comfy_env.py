"""Where ComfyUI and the project's virtual environment live, and how to load ComfyUI in-process.

Nothing here imports torch or ComfyUI at module level: the setup script imports it with a bare
Python to learn the paths before any dependency exists.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PACK_NAME = "comfyui-optim"
DEFAULT_COMFYUI_REPO = "https://github.com/Comfy-Org/ComfyUI.git"
DEFAULT_COMFYUI_REF = "a125cd84"  # ComfyUI 0.3.64, Oct 2025: the commit the suite is tested against
MIN_COMFYUI_VERSION = "0.3.64"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / PACK_NAME


def comfyui_ref() -> str:
    return os.environ.get("COMFYUI_REF") or DEFAULT_COMFYUI_REF


def cached_checkout_dir() -> Path:
    return cache_dir() / f"ComfyUI-{comfyui_ref()[:12]}"


def venv_dir() -> Path:
    return Path(os.environ["OPTIM_VENV"]) if os.environ.get("OPTIM_VENV") else cache_dir() / "venv"


def is_comfyui_checkout(path: Path) -> bool:
    return (path / "main.py").is_file() and (path / "comfy" / "model_patcher.py").is_file()


def find_comfyui() -> tuple[Path | None, str]:
    """Return (checkout, "") or (None, why not), from COMFYUI_PATH or the setup's cache."""
    explicit = os.environ.get("COMFYUI_PATH")
    if explicit:
        path = Path(explicit).expanduser().resolve()
        if is_comfyui_checkout(path):
            return path, ""
        return None, f"COMFYUI_PATH={explicit} is not a ComfyUI checkout (no main.py / comfy/model_patcher.py)"
    path = cached_checkout_dir()
    if is_comfyui_checkout(path):
        return path, ""
    return None, (f"no ComfyUI checkout: set COMFYUI_PATH to one, or run `make setup` "
                  f"(clones COMFYUI_REPO at {comfyui_ref()} into {path})")


_loaded: dict = {}


def load_comfyui_in_process(base_directory: Path | None = None, device: str = "cpu"):
    """Import ComfyUI in this process (on the CPU as `main.py --cpu` would, unless `device` is
    "cuda") and load this pack.

    Returns ComfyUI's `nodes` module. Idempotent: later calls return the same module.
    """
    if "nodes" in _loaded:
        return _loaded["nodes"]
    root, why = find_comfyui()
    if root is None:
        raise RuntimeError(why)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import utils.install_util  # noqa: F401  as main.py does: binds `utils` to ComfyUI's package
    import comfy.options
    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args
    args.cpu = device == "cpu"
    args.use_pytorch_cross_attention = True
    args.disable_api_nodes = True
    if base_directory is not None:
        args.base_directory = str(base_directory)  # folder_paths reads it at import
    import asyncio
    import logging
    import nodes as comfy_nodes
    # Built-in nodes whose optional dependencies are absent (torchaudio) log long tracebacks here;
    # main.py summarises them, and so do we: keep only errors while they load.
    root_logger = logging.getLogger()
    level = root_logger.level
    root_logger.setLevel(logging.ERROR)
    try:
        asyncio.run(comfy_nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    finally:
        root_logger.setLevel(level)
    ok = asyncio.run(comfy_nodes.load_custom_node(str(REPO_ROOT), module_parent="custom_nodes"))
    if not ok:
        raise RuntimeError(f"ComfyUI at {root} could not load the pack from {REPO_ROOT}")
    _loaded["nodes"] = comfy_nodes
    return comfy_nodes
