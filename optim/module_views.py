"""Views of ComfyUI modules for object patches: same children, parameters and buffers (so the
state-dict keys, LoRA patching and device moves are unchanged), one behaviour overridden.

A view is an instance of a subclass of the original's class, so `isinstance` checks in the
model's own code still hold. It is installed with `ModelPatcher.add_object_patch`, which scopes
it to one clone and restores the original on unpatch."""
from __future__ import annotations

import torch

_view_classes: dict[tuple, type] = {}


def make_view(original: torch.nn.Module, tag: str, overrides: dict, **state) -> torch.nn.Module:
    """A view of `original` whose class overrides the methods in `overrides` (name -> function);
    `state` entries are set as plain attributes (not submodules)."""
    cls = type(original)
    key = (cls, tag)
    if key not in _view_classes:
        _view_classes[key] = type(f"{tag}{cls.__name__}", (cls,), dict(overrides))
    view = cls.__new__(_view_classes[key])
    torch.nn.Module.__init__(view)
    view._modules = original._modules
    view._parameters = original._parameters
    view._buffers = original._buffers
    for k, v in original.__dict__.items():  # plain attributes (heads, dim_head, ...) of the original
        if not k.startswith("_") and k != "training":
            view.__dict__[k] = v
    view.training = original.training
    view.__dict__["_view_of"] = original
    view.__dict__.update(state)
    return view
