import sys
import types

import pytest
import torch


class FakeServer:
    """Stands in for ComfyUI's PromptServer: records what the nodes send (event, data, sid)."""
    client_id, last_prompt_id = "tab-1", "p1"

    def __init__(self):
        self.sent = []

    def send_sync(self, event, data, sid=None):
        self.sent.append((event, data, sid))


@pytest.fixture
def server(monkeypatch):
    """A FakeServer installed as `server.PromptServer.instance` for the test."""
    srv = FakeServer()
    fake = types.ModuleType("server")
    fake.PromptServer = type("PromptServer", (), {"instance": srv})
    monkeypatch.setitem(sys.modules, "server", fake)
    return srv


@pytest.fixture
def with_lora():
    """`with_lora(model, key)`: a clone of `model` with a LoRA-style weight patch (+0.01) on `key`,
    applied by ComfyUI's own patching as a LoRA loader does."""
    def patch(model, key, value=0.01):
        patched = model.clone()
        patched.add_patches({key: (torch.full_like(model.model.state_dict()[key], value),)}, strength_patch=1.0)
        return patched
    return patch
