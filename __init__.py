"""comfyui-optim: ComfyUI nodes that make diffusion inference faster and lighter.

ComfyUI imports this file from custom_nodes/. Nodes are registered through the V3 API
(`comfy_entrypoint` returning a ComfyExtension); an older ComfyUI without that API gets one clear
log line and no nodes instead of a traceback.
"""
import importlib.util
import logging

WEB_DIRECTORY = "./web"
MIN_COMFYUI_VERSION = "0.3.64"  # keep in step with bench/comfy_env.py and the README


def _has_v3_api() -> bool:
    try:
        return importlib.util.find_spec("comfy_api.latest") is not None
    except ImportError:  # no comfy_api package at all
        return False


if _has_v3_api():
    from .nodes import comfy_entrypoint  # noqa: F401  (other import errors surface as ComfyUI's IMPORT FAILED)
else:
    logging.error("[comfyui-optim] needs ComfyUI >= %s (the comfy_api.latest V3 node API); "
                  "this ComfyUI lacks it, so no comfyui-optim nodes are loaded. Update ComfyUI.",
                  MIN_COMFYUI_VERSION)
    NODE_CLASS_MAPPINGS = {}  # tells ComfyUI the import succeeded with nothing to register

__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
