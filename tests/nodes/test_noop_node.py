"""OptimNoop inside a real in-process ComfyUI: registered, clones, changes nothing."""
import pytest
import torch

from bench import factory


@pytest.fixture(scope="module")
def noop_cls(comfy_nodes):
    return comfy_nodes.NODE_CLASS_MAPPINGS["OptimNoop"]


def test_pack_registers_through_v3_entry_point(comfy_nodes, noop_cls):
    schema = noop_cls.GET_SCHEMA()
    assert schema.node_id == "OptimNoop"
    assert noop_cls.RELATIVE_PYTHON_MODULE.startswith("custom_nodes.")
    assert comfy_nodes.LOADED_MODULE_DIRS  # the pack was loaded as a custom node module


def test_node_returns_a_clone_and_leaves_the_input_untouched(noop_cls, comfy_nodes):
    base = factory.build_model("sd3", "tiny")
    before = {k: dict(v) for k, v in base.wrappers.items()}
    patched = noop_cls.execute(model=base).result[0]
    assert patched is not base
    assert patched.model is base.model           # weights shared, not copied
    assert {k: dict(v) for k, v in base.wrappers.items()} == before
    assert "comfyui-optim.noop" in patched.wrappers["apply_model"]


@pytest.mark.parametrize("family", ["sd15", "flux", "wan21"])
def test_output_is_bit_identical(noop_cls, comfy_nodes, family):
    base = factory.build_model(family, "tiny")
    cfg = 1.0 if factory.family(family).guidance else 5.0
    ref = factory.sample(base, family, "tiny", steps=4, cfg=cfg)
    out = factory.sample(noop_cls.execute(model=base).result[0], family, "tiny", steps=4, cfg=cfg)
    again = factory.sample(base, family, "tiny", steps=4, cfg=cfg)
    assert torch.equal(ref, out)
    assert torch.equal(ref, again)   # nothing leaked into the base model
