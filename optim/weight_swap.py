"""Scoped replacement of layer weights for injections (layerwise casting, channels_last).

ComfyUI ejects a patcher's injections in insertion order, not in reverse, so two injections
that each kept "the weight before me" would restore each other's stale copies. Instead, every
swap of a layer is recorded once, in one registry on the model, with the layer's state from
before any of them; the first eject restores every recorded layer, later ejects find nothing
left to do. Only one clone of a model is loaded (injected) at a time, so one registry per model
is enough."""
from __future__ import annotations

import torch

REGISTRY = "_comfyui_optim_swapped"
ATTRS = ("weight_function", "comfy_cast_weights")
_MISSING = object()


def swap(owner, module: torch.nn.Module, weight: torch.nn.Parameter | None = None,
         offload_device=None, **attrs) -> torch.nn.Parameter:
    """Give `module` a new weight and/or attributes; the state from before the first swap is kept
    in `owner`'s registry. With `offload_device`, the original weight moves there while swapped
    (the memory saving on an accelerator). Returns the weight the module held before this call."""
    registry = owner.__dict__.setdefault(REGISTRY, {})
    previous = module._parameters.get("weight")
    entry = registry.get(id(module))
    if entry is None:
        entry = registry[id(module)] = {
            "module": module, "weight": previous, "device": previous.device if previous is not None else None,
            "attrs": {a: module.__dict__.get(a, _MISSING) for a in ATTRS}}
    if weight is not None:
        module._parameters["weight"] = weight
        original = entry["weight"]
        if offload_device is not None and original is not None and original.device != torch.device(offload_device):
            original.data = original.data.to(offload_device)
    for k, v in attrs.items():
        setattr(module, k, v)
    return previous


def original_weight(owner, module: torch.nn.Module):
    """The weight `module` holds when nothing is swapped: another clone's injection may be
    applied to the shared model right now (ComfyUI ejects it only at the next load)."""
    entry = owner.__dict__.get(REGISTRY, {}).get(id(module))
    return entry["weight"] if entry is not None else module._parameters.get("weight")


def restore_all(owner) -> int:
    """Put every swapped layer back as it was; returns how many."""
    registry = owner.__dict__.pop(REGISTRY, {})
    with torch.no_grad():
        for entry in registry.values():
            m, w = entry["module"], entry["weight"]
            if w is not None:
                if w.device != entry["device"]:
                    w.data = w.data.to(entry["device"])
                m._parameters["weight"] = w
            for a, v in entry["attrs"].items():
                if v is _MISSING:
                    m.__dict__.pop(a, None)
                else:
                    setattr(m, a, v)
    return len(registry)
