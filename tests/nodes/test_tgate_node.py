"""OptimTGate in a real in-process ComfyUI, alone and stacked with OptimDeepCache."""
import logging

import pytest
import torch

from bench import factory

SD_LAYOUT = factory.sd_unet_config(32, [1, 2, 2, 2], 2, [1, 1, 1, 0], 1, 768, False, heads=8)


@pytest.fixture(scope="module")
def nodes_(comfy_nodes):
    m = comfy_nodes.NODE_CLASS_MAPPINGS
    return m["OptimTGate"], m["OptimDeepCache"]


@pytest.fixture(scope="module")
def unet(comfy_nodes):
    return factory.build_model("sd15", unet_config=SD_LAYOUT)


def sample(model, **kw):
    args = dict(steps=10, cfg=5.0)
    args.update(kw)
    return factory.sample(model, "sd15", **args)


def tg_of(patched):
    for view in patched.object_patches.values():
        if "_tgate" in view.__dict__:
            return view.__dict__["_tgate"]
    raise AssertionError("no T-GATE view installed")


def test_gate_at_one_is_bit_identical(nodes_, unet):
    tg, _ = nodes_
    patched = tg.execute(model=unet, gate_percent=1.0).result[0]
    assert not patched.object_patches
    assert torch.equal(sample(patched), sample(unet))


def test_gate_skips_cross_attention_and_uncond_after_the_gate(nodes_, unet):
    tg, _ = nodes_
    patched = tg.execute(model=unet, gate_percent=0.4).result[0]
    out = sample(patched)
    stats = tg_of(patched).last_stats
    layers = len(patched.object_patches)
    assert stats["gate_step"] == 4 and stats["steps"] == 10
    assert stats["uncond_passes_dropped"] == 6
    assert stats["cross_attn_computed"] == 4 * layers and stats["cross_attn_reused"] == 6 * layers
    assert stats["hits"] == "0000111111" and stats["timed_speedup"] > 0
    assert torch.isfinite(out).all() and not torch.equal(out, sample(unet))
    assert torch.equal(out, sample(patched))     # per-run state: a second run is identical


def test_keeping_uncond_changes_nothing_when_text_enters_only_through_cross_attention(nodes_, unet):
    tg, _ = nodes_
    dropped = sample(tg.execute(model=unet, gate_percent=0.4).result[0])
    kept = sample(tg.execute(model=unet, gate_percent=0.4, drop_uncond=False).result[0])
    torch.testing.assert_close(dropped, kept, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("sampler,cfg,batch", [("heun", 5.0, 1), ("euler", 1.0, 2), ("dpmpp_2m_sde", 5.0, 2)])
def test_samplers_cfg_and_batches(nodes_, unet, sampler, cfg, batch):
    tg, _ = nodes_
    patched = tg.execute(model=unet, gate_percent=0.5, self_attn_interval=2).result[0]
    out = sample(patched, sampler=sampler, cfg=cfg, batch=batch, steps=6)
    assert out.shape[0] == batch and torch.isfinite(out).all()
    stats = tg_of(patched).last_stats
    assert stats["cross_attn_reused"] > 0 and stats["self_attn_reused"] > 0


def test_stacks_with_deepcache_in_either_order(nodes_, unet):
    tg, dc = nodes_
    a = tg.execute(model=dc.execute(model=unet, cache_interval=3).result[0], gate_percent=0.4).result[0]
    b = dc.execute(model=tg.execute(model=unet, gate_percent=0.4).result[0], cache_interval=3).result[0]
    out_a, out_b = sample(a), sample(b)
    assert torch.equal(out_a, out_b)
    deepcache_only = sample(dc.execute(model=unet, cache_interval=3).result[0])
    assert not torch.equal(out_a, deepcache_only)
    assert tg_of(a).last_stats["cross_attn_reused"] > 0
    # after the gate DeepCache serves the cond-only batch from the [cond, uncond] cache
    deepcache_ctl = a.object_patches["diffusion_model.input_blocks"].__dict__["_deepcache"]
    assert deepcache_ctl.last_stats["fallback_calls"] == 0


def test_unsupported_model_passes_through_with_a_warning(nodes_, comfy_nodes, caplog):
    tg, _ = nodes_
    wan = factory.build_model("wan21", "tiny")
    with caplog.at_level(logging.WARNING, logger="comfyui-optim"):
        assert tg.execute(model=wan).result[0] is wan
    assert "WAN21" in caplog.text and "T-GATE does not apply" in caplog.text


def test_pixart_gates_its_cross_attention(nodes_, comfy_nodes):
    tg, _ = nodes_
    pixart = factory.build_model("pixart", "tiny")
    args = dict(steps=8, cfg=4.0)
    ref = factory.sample(pixart, "pixart", **args)
    assert torch.equal(factory.sample(tg.execute(model=pixart, gate_percent=1.0).result[0], "pixart", **args), ref)
    patched = tg.execute(model=pixart, gate_percent=0.5, self_attn_interval=2).result[0]
    out = factory.sample(patched, "pixart", **args)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    stats = tg_of(patched).last_stats
    assert stats["gate_step"] == 4 and stats["uncond_passes_dropped"] == 4
    assert stats["cross_attn_reused"] == 4 * 2 and stats["self_attn_reused"] > 0   # 2 blocks


def test_torch_compile_model_before_or_after_the_stack(nodes_, unet, comfy_nodes):
    """ComfyUI's TorchCompileModel (inductor) composes with both nodes in either order: the output
    matches the eager stack up to the compiler's float reordering."""
    tg, dc = nodes_
    compile_node = comfy_nodes.NODE_CLASS_MAPPINGS["TorchCompileModel"]

    def compiled(model):
        out = compile_node.execute(model=model, backend="inductor")
        return out.result[0] if hasattr(out, "result") else out[0]

    def stack(model):
        return tg.execute(model=dc.execute(model=model, cache_interval=3).result[0], gate_percent=0.5).result[0]

    eager = sample(stack(unet), steps=6)
    for model in (stack(compiled(unet)), compiled(stack(unet))):
        torch.testing.assert_close(sample(model, steps=6), eager, rtol=1e-3, atol=2e-2)


def test_img2img_and_lora_before_or_after(nodes_, unet, with_lora):
    tg, _ = nodes_
    start = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))}
    patched = tg.execute(model=unet, gate_percent=0.4).result[0]
    out = sample(patched, denoise=0.6, latent=start)
    assert torch.isfinite(out).all() and tg_of(patched).last_stats["cross_attn_reused"] > 0

    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    before = sample(tg.execute(model=with_lora(unet, key), gate_percent=0.4).result[0])
    after = sample(with_lora(tg.execute(model=unet, gate_percent=0.4).result[0], key))
    assert torch.equal(before, after)
    assert not torch.equal(before, sample(patched))
