"""OptimAttentionBackend and OptimChannelsLast in a real in-process ComfyUI, and every model node
of this issue composed with ComfyUI's TorchCompileModel and with each other."""
import logging

import pytest
import torch

from bench import factory

SD_LAYOUT = factory.sd_unet_config(32, [1, 2, 2, 2], 2, [1, 1, 1, 0], 1, 768, False, heads=8)


@pytest.fixture(scope="module")
def unet(comfy_nodes):
    return factory.build_model("sd15", unet_config=SD_LAYOUT)


def node(comfy_nodes, name):
    return comfy_nodes.NODE_CLASS_MAPPINGS[name]


def apply(cls, model, **kw):
    return cls.execute(model=model, **kw).result[0]


def sample(model, **kw):
    return factory.sample(model, "sd15", **{"steps": 4, "cfg": 5.0, "width": 64, "height": 64, **kw})


@pytest.mark.parametrize("backend", ["pytorch_sdpa", "sub_quadratic", "split"])
def test_attention_backend_routes_every_attention_call(comfy_nodes, unet, backend):
    patched = apply(node(comfy_nodes, "OptimAttentionBackend"), unet, backend=backend)
    override = patched.model_options["transformer_options"]["optimized_attention_override"]
    ref = sample(unet)
    out = sample(patched)
    assert override.calls > 0
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    assert "optimized_attention_override" not in unet.model_options["transformer_options"]


def test_attention_backend_not_installed_is_a_validation_error(comfy_nodes):
    cls = node(comfy_nodes, "OptimAttentionBackend")
    from optim import speed_knobs
    assert cls.validate_inputs(backend="pytorch_sdpa") is True
    for backend in ("xformers", "flash_attn", "sage_attention"):
        if not speed_knobs.available_backends()[backend]:
            msg = cls.validate_inputs(backend=backend)
            assert isinstance(msg, str) and "not installed" in msg
    assert "must be one of" in cls.validate_inputs(backend="magic")


def test_channels_last_on_the_clone_only(comfy_nodes, unet):
    patched = apply(node(comfy_nodes, "OptimChannelsLast"), unet)
    conv = unet.model.diffusion_model.input_blocks[1][0].in_layers[2]
    original = conv.weight
    seen = {}
    probe = patched.clone()

    def grab(executor, *args, **kwargs):
        w = probe.model.diffusion_model.input_blocks[1][0].in_layers[2].weight
        seen["cl"] = w.is_contiguous(memory_format=torch.channels_last) and w.stride() != original.stride()
        return executor(*args, **kwargs)
    probe.add_wrapper_with_key("apply_model", "test.grab", grab)
    ref = sample(unet)
    out = sample(probe)
    assert seen["cl"]
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=3e-3)   # NHWC kernels sum in another order
    assert torch.equal(sample(unet), ref)
    assert conv.weight is original and original.is_contiguous()


def test_channels_last_passes_non_unet_through(comfy_nodes, caplog):
    flux = factory.build_model("flux", "tiny")
    with caplog.at_level(logging.WARNING, logger="comfyui-optim"):
        assert apply(node(comfy_nodes, "OptimChannelsLast"), flux) is flux
    assert "not a UNet" in caplog.text


def test_layerwise_cast_and_channels_last_stack_in_either_order(comfy_nodes, unet):
    """Both swap weights in injections that ComfyUI ejects in insertion order: the shared
    registry must still restore the original weights."""
    cast, cl = node(comfy_nodes, "OptimLayerwiseCast"), node(comfy_nodes, "OptimChannelsLast")
    dm = unet.model.diffusion_model
    originals = {n: p for n, p in dm.named_parameters()}
    ref = sample(unet)
    only_cast = sample(apply(cast, unet))
    for model in (apply(cl, apply(cast, unet)), apply(cast, apply(cl, unet))):
        out = sample(model)
        torch.testing.assert_close(out, only_cast, rtol=1e-3, atol=1e-3)
        assert torch.equal(sample(unet), ref)
        assert all(p is originals[n] for n, p in dm.named_parameters())


def test_torch_compile_model_composes_before_or_after(comfy_nodes, unet):
    """ComfyUI's TorchCompileModel (inductor) composes with each node of this issue in either
    order: outputs match the eager node up to the compiler's float reordering."""
    compile_node = node(comfy_nodes, "TorchCompileModel")

    def compiled(model):
        out = compile_node.execute(model=model, backend="inductor")
        return out.result[0] if hasattr(out, "result") else out[0]

    for name, kw in (("OptimLayerwiseCast", {}), ("OptimAttentionBackend", {"backend": "pytorch_sdpa"}),
                     ("OptimChannelsLast", {})):
        cls = node(comfy_nodes, name)
        eager = sample(apply(cls, unet, **kw), steps=3)
        for model in (apply(cls, compiled(unet), **kw), compiled(apply(cls, unet, **kw))):
            torch.testing.assert_close(sample(model, steps=3), eager, rtol=1e-3, atol=2e-2)
