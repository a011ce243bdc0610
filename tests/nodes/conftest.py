import pytest
import torch


@pytest.fixture
def with_lora():
    """`with_lora(model, key)`: a clone of `model` with a LoRA-style weight patch (+0.01) on `key`,
    applied by ComfyUI's own patching as a LoRA loader does."""
    def patch(model, key, value=0.01):
        patched = model.clone()
        patched.add_patches({key: (torch.full_like(model.model.state_dict()[key], value),)}, strength_patch=1.0)
        return patched
    return patch
