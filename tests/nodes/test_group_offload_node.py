"""OptimGroupOffload in a real in-process ComfyUI (CPU as load and offload device), through
KSampler: bit-identical to the resident model, ComfyUI's accounting, lifecycle, LoRA, caches."""
import pytest
import torch

from bench import factory
from optim import group_offload as go


@pytest.fixture(scope="module")
def node(comfy_nodes):
    return comfy_nodes.NODE_CLASS_MAPPINGS["OptimGroupOffload"]


SD_LAYOUT = factory.sd_unet_config(32, [1, 2, 2], 1, [1, 1, 0], 1, 768, False, heads=4)


@pytest.fixture(scope="module")
def unet(comfy_nodes):
    return factory.build_model("sd15", unet_config=SD_LAYOUT)


@pytest.fixture(scope="module")
def flux(comfy_nodes):
    return factory.build_model("flux")


def apply(node, model, **kw):
    return node.execute(model=model, **kw).result[0]


def sample(model, fam="sd15", **kw):
    args = dict(steps=2, cfg=5.0, width=64, height=64)
    args.update(kw)
    return factory.sample(model, fam, **args)


def hooks_on(model) -> int:
    return sum(len(m._forward_pre_hooks) for m in model.model.modules())


def resident_bytes(patcher) -> int:
    """What really sits on the load device as ComfyUI loaded it: layers it marked loaded."""
    return sum(go.Group("", [(n, m)]).nbytes for n, m in go.managed_leaves(patcher.model)
               if getattr(m, "comfy_patched_weights", False) is True)


@pytest.mark.parametrize("fam", ["sd15", "flux"])
@pytest.mark.parametrize("offload_type,use_stream", [("block_level", True), ("block_level", False),
                                                     ("leaf_level", True)])
def test_bit_identical_to_resident(node, unet, flux, fam, offload_type, use_stream):
    base = unet if fam == "sd15" else flux
    ref = sample(base, fam)
    patched = apply(node, base, offload_type=offload_type, use_stream=use_stream, num_blocks_per_group=2)
    out = sample(patched, fam)
    assert torch.equal(out, ref)
    stats = go.controller(patched).last_stats
    groups = go.plan_groups(base.model.diffusion_model, offload_type, 2)
    assert stats["groups_streamed"] == len(groups)       # budget 0: every group is streamed
    assert stats["calls"] >= 2 and stats["bytes_moved"] >= stats["calls"] * stats["streamed_bytes_per_pass"] > 0
    # every group moves once per call, plus the first call's guesses in registration order that
    # the model's real order proved wrong (leaf level: a UNet registers attn2 after ff)
    assert stats["transfers"] == stats["calls"] * len(groups) + stats["prefetch_wasted"]
    if offload_type == "block_level":
        assert stats["prefetch_wasted"] == 0
    assert torch.equal(sample(patched, fam), ref)        # the next prompt follows the learned order
    stats = go.controller(patched).last_stats
    assert stats["prefetch_wasted"] == 0 and stats["transfers"] == stats["calls"] * len(groups)
    if use_stream:
        assert stats["prefetch_hits"] == stats["transfers"] - stats["calls"]


def test_comfyui_accounting_stays_true_and_follows_the_budget(node, unet):
    size = unet.model_size()
    patched = apply(node, unet, vram_budget_gb=0.5 * size / go.GIB)
    out = sample(patched)
    ctl = go.controller(patched)
    groups = go.plan_groups(unet.model.diffusion_model, "block_level", 1)
    target = ctl.budget_bytes(groups)
    assert 0 < patched.loaded_size() <= target
    # ComfyUI's figure is the bytes of the layers it keeps loaded plus the ones it never streams
    never_streamed = size - sum(g.nbytes for g in groups)
    assert patched.loaded_size() == resident_bytes(patched) + never_streamed
    stats = ctl.last_stats
    assert stats["calls"] > 0 and stats["transfers"] > 0
    assert 0 < stats["groups_streamed"] and stats["streamed_bytes_per_pass"] + resident_bytes(patched) \
        == sum(g.nbytes for g in groups)
    assert torch.equal(out, sample(unet))
    # a budget above the model streams nothing and installs no hooks
    big = apply(node, unet, vram_budget_gb=2 * size / go.GIB)
    assert torch.equal(sample(big), out)
    assert go.controller(big).install is None and big.loaded_size() == size


def test_lifecycle_unload_free_next_prompt_and_removal(node, unet, flux):
    ref_u, ref_f = sample(unet), sample(flux, "flux")
    pu, pf = apply(node, unet), apply(node, flux, offload_type="leaf_level")
    # two offloaded models in one prompt, then the next prompt
    for _ in range(2):
        assert torch.equal(sample(pu), ref_u)
        assert torch.equal(sample(pf, "flux"), ref_f)
    assert hooks_on(pu) > 0 and hooks_on(pf) > 0       # both loaded (the CPU holds both)
    assert go.controller(pu).last_stats["transfers"] > 0 and go.controller(pf).last_stats["transfers"] > 0
    # /free: ComfyUI unloads everything; our hooks go with the injection, nothing stays swapped
    import comfy.model_management as mm
    mm.unload_all_models()
    assert hooks_on(pu) == 0 and hooks_on(pf) == 0
    assert pu.loaded_size() == 0 and not pu.model.model_lowvram
    assert all(not getattr(m, "weight_function", []) for m in pu.model.modules())
    assert torch.equal(sample(pu), ref_u)              # reloads and streams again
    # removing the node: the plain model (another clone of the same weights) runs as ComfyUI alone
    assert torch.equal(sample(unet), ref_u)
    assert hooks_on(unet) == 0
    assert unet.loaded_size() == unet.model_size() and not unet.model.model_lowvram
    assert all(not getattr(m, "comfy_cast_weights", False) for m in unet.model.modules())


@pytest.mark.parametrize("fam,key", [("sd15", "diffusion_model.input_blocks.1.0.in_layers.2.weight"),
                                     ("flux", "diffusion_model.double_blocks.0.img_attn.qkv.weight")])
def test_lora_before_after_and_strength_change(node, unet, flux, with_lora, fam, key):
    base = unet if fam == "sd15" else flux
    lora_a = with_lora(base, key, 0.01)
    lora_b = with_lora(base, key, 0.03)              # the same LoRA at another strength
    ref_a, ref_b = sample(lora_a, fam), sample(lora_b, fam)
    assert not torch.equal(ref_a, ref_b)
    before_a = apply(node, lora_a)                   # LoRA, then offload
    before_b = apply(node, lora_b)
    offloaded = apply(node, base)
    after_a = with_lora(offloaded, key, 0.01)        # offload, then LoRA
    after_b = with_lora(offloaded, key, 0.03)
    for model, ref in ((before_a, ref_a), (after_a, ref_a), (before_b, ref_b), (after_b, ref_b),
                       (after_a, ref_a), (before_a, ref_a)):
        assert torch.equal(sample(model, fam), ref)
        assert go.controller(model).last_stats["transfers"] > 0     # really streamed
    assert torch.equal(sample(base, fam), sample(offloaded, fam))   # no LoRA left behind


def test_composes_with_deepcache_without_fetching_skipped_blocks(node, unet, comfy_nodes):
    dc = comfy_nodes.NODE_CLASS_MAPPINGS["OptimDeepCache"]
    cached = dc.execute(model=unet, cache_interval=3, cache_branch_id=0).result[0]
    ref = sample(cached, steps=9)
    both_orders = (apply(node, cached),
                   dc.execute(model=apply(node, unet), cache_interval=3, cache_branch_id=0).result[0])
    for model in both_orders:
        assert torch.equal(sample(model, steps=9), ref)
        ctl = go.controller(model)
        stats, per = ctl.last_stats, ctl.last_per_group
        assert stats["calls"] == 9
        # output block 0 is deep: it runs on the 3 full calls only; one wrong guess at most
        assert 3 <= per["output_blocks.0"] <= 4
        assert per["input_blocks.0"] == 9
        assert stats["prefetch_wasted"] <= 1


def test_composes_with_dit_cache(node, flux, comfy_nodes):
    dit = comfy_nodes.NODE_CLASS_MAPPINGS["OptimDiTCache"]
    kw = dict(mode="fixed", cache_block_start=0, cache_num_blocks=-1, cache_step_start=1,
              cache_step_interval=2, threshold=0.15, max_consecutive=3, force=False)
    cached = dit.execute(model=flux, **kw).result[0]
    ref = sample(cached, "flux", steps=6)
    model = apply(node, cached, use_stream=False)
    assert torch.equal(sample(model, "flux", steps=6), ref)
    ctl = go.controller(model)
    per = ctl.last_per_group
    assert ctl.last_stats["calls"] == 6 and ctl.last_stats["transfers"] > 0
    # without prefetch every transfer is a group that ran: cached blocks move on refresh steps only
    assert per["double_blocks.0"] < ctl.last_stats["calls"]
    assert per["final_layer.linear..final_layer.adaLN_modulation.1"] == ctl.last_stats["calls"]
    streamed = apply(node, cached, use_stream=True)
    assert torch.equal(sample(streamed, "flux", steps=6), ref)
    assert go.controller(streamed).last_stats["prefetch_wasted"] <= 2


def test_unsupported_model_passes_through(node, caplog):
    class Empty(torch.nn.Module):
        pass

    class FakePatcher:
        model = type("M", (), {})()

        def get_model_object(self, name):
            return Empty()
    fp = FakePatcher()
    assert apply(node, fp) is fp
    assert "passes through" in caplog.text


def test_validation_messages(node):
    assert node.validate_inputs(offload_type="block_level") is True
    assert "offload_type" in node.validate_inputs(offload_type="blocks")
    assert "record_stream" in node.validate_inputs(offload_type="leaf_level", use_stream=False, record_stream=True)


def test_disk_offload_isolation_and_cleanup(node, flux, comfy_nodes):
    """Two models of the same architecture with different weights, both offloaded to disk at
    once: each reads only its own file (bit-identical outputs), the files sit in content-keyed
    folders under ComfyUI's temp directory and go when ComfyUI unloads the models."""
    import comfy.model_management as mm
    import folder_paths
    from optim import disk_offload
    other = factory.build_model("flux", seed=1)
    ref_a, ref_b = sample(flux, "flux"), sample(other, "flux")
    assert not torch.equal(ref_a, ref_b)
    pa, pb = apply(node, flux, offload_to_disk=True), apply(node, other, offload_to_disk=True)
    for _ in range(2):
        assert torch.equal(sample(pa, "flux"), ref_a)
        assert torch.equal(sample(pb, "flux"), ref_b)
    ca, cb = go.controller(pa), go.controller(pb)
    assert ca.last_stats["transfers"] > 0 and cb.last_stats["transfers"] > 0
    fa, fb = [s.folder for s in ca.stores], [s.folder for s in cb.stores]
    assert len(fa) == 1 and len(fb) == 1 and fa != fb
    base = (disk_offload.Path(folder_paths.get_temp_directory()) / disk_offload.FOLDER).resolve()
    assert all(f.resolve().parent == base and (f / "weights.bin").exists() for f in fa + fb)
    assert ca.last_stats["disk_bytes"] >= ca.last_stats["streamed_bytes_per_pass"] > 0
    # the streamed weights really rest on the mapped file between calls
    leaf = pa.model.diffusion_model.double_blocks[0].img_attn.qkv
    assert leaf.weight.data_ptr() in disk_offload.pointers(ca.stores)
    mm.unload_all_models()
    assert not any(f.exists() for f in fa + fb)
    assert leaf.weight.data_ptr() not in disk_offload.pointers(ca.stores)   # back in RAM
    assert torch.equal(sample(flux, "flux"), ref_a) and torch.equal(sample(other, "flux"), ref_b)


@pytest.fixture(scope="module")
def vae_node(comfy_nodes):
    return comfy_nodes.NODE_CLASS_MAPPINGS["OptimGroupOffloadVAE"]


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_vae_decode_and_encode_bit_identical_and_removed(vae_node, comfy_nodes, offload_type):
    import comfy.model_management as mm
    vae = factory.build_vae("sd15")
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = vae.decode(latent)
        ref_enc = vae.encode(ref)
    patched = vae_node.execute(vae=vae, offload_type=offload_type).result[0]
    with torch.inference_mode():
        out, enc = patched.decode(latent), patched.encode(ref)
        again = patched.decode(latent)
    assert torch.equal(out, ref) and torch.equal(again, ref) and torch.equal(enc, ref_enc)
    ctl = go.controller(patched.patcher)
    stats = ctl.last_stats
    groups = go.plan_groups(vae.first_stage_model, offload_type, 1)
    assert stats["groups_streamed"] == len(groups) and stats["bytes_moved"] > 0
    if offload_type == "block_level":   # the decoder's layers are groups of their own
        assert sum(g.name.startswith("taesd_decoder.") for g in groups) > 5
    assert hooks_on(patched.patcher) > 0
    mm.unload_all_models()
    assert hooks_on(patched.patcher) == 0
    with torch.inference_mode():
        assert torch.equal(vae.decode(latent), ref)     # the plain VAE, as ComfyUI alone runs it
    assert hooks_on(vae.patcher) == 0


def test_clip_encode_bit_identical_and_removed(comfy_nodes):
    """A full-width SD1 CLIP-L text encoder with generated weights."""
    import comfy.model_management as mm
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base as smb
    clip_node = comfy_nodes.NODE_CLASS_MAPPINGS["OptimGroupOffloadCLIP"]
    clip = comfy.sd.CLIP(smb.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel))
    factory.fill_module(clip.cond_stage_model, 0)
    tokens = clip.tokenize("a lighthouse on a cliff")
    with torch.inference_mode():
        ref, ref_pooled = clip.encode_from_tokens(tokens, return_pooled=True)
        patched = clip_node.execute(clip=clip, num_blocks_per_group=3).result[0]
        out, pooled = patched.encode_from_tokens(tokens, return_pooled=True)
    assert torch.equal(out, ref) and torch.equal(pooled, ref_pooled)
    stats = go.controller(patched.patcher).last_stats
    layers = len(clip.cond_stage_model.clip_l.transformer.text_model.encoder.layers)
    assert stats["groups_streamed"] >= layers // 3 and stats["bytes_moved"] > 0
    mm.unload_all_models()
    assert hooks_on(patched.patcher) == 0
    with torch.inference_mode():
        assert torch.equal(clip.encode_from_tokens(tokens), ref)


def test_vae_statistics_are_per_run_and_sent_after_each_call(comfy_nodes):
    """A VAE has no sampling run to wrap: its figures go out after each decode, and the calls of
    one run (one prompt id) add up while a new run starts from zero."""
    import copy
    vae = factory.build_vae("sd15")
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sent, run = [], ["p1"]
    patched = copy.copy(vae)
    patched.patcher = vae.patcher.clone()
    go.attach_module(patched.patcher, go.GroupOffloadParams(), on_run_end=sent.append, run_id=lambda: run[0])
    with torch.inference_mode():
        patched.decode(latent)
        patched.decode(latent)
        run[0] = "p2"
        patched.decode(latent)
    assert [s["calls"] for s in sent] == [1, 2, 1]
    assert sent[1]["transfers"] == 2 * sent[0]["transfers"] > 0
    assert sent[2]["bytes_moved"] == sent[0]["bytes_moved"] > 0
    assert all(s["groups"] == s["groups_streamed"] > 0 and s["peak_vram_bytes"] is None for s in sent)


def loaded_weights(patcher) -> int:
    """What ComfyUI's count should say: the current weights of the layers it has loaded."""
    import comfy.model_management as mm
    return sum(mm.module_size(m) for m in patcher.model.modules()
               if getattr(m, "comfy_patched_weights", False) is True)


@pytest.mark.parametrize("budget", [0.0, 6.0])
def test_accounting_stays_true_under_the_fp8_cast_across_runs(node, comfy_nodes, budget):
    """fp8 cast then group offload on Wan, prompt after prompt: ComfyUI's count of loaded weights
    matches the layers it has loaded (it went negative on the second run once: its reload counts
    the cast layers at fp8 size, its partial unload at full size)."""
    wan = factory.build_model("wan21")
    plain = apply(node, wan, num_blocks_per_group=2, vram_budget_gb=budget)
    sample(plain, "wan21")
    # ComfyUI's own count differs from the loaded layers by what it counts its own way (parameters
    # outside leaf layers): the cast must not change that difference
    residual = plain.loaded_size() - loaded_weights(plain)
    cast = comfy_nodes.NODE_CLASS_MAPPINGS["OptimLayerwiseCast"].execute(model=wan).result[0]
    off = apply(node, cast, num_blocks_per_group=2, vram_budget_gb=budget)
    for _ in range(3):
        sample(off, "wan21")
        assert off.loaded_size() - loaded_weights(off) == residual
        assert 0 < off.loaded_size() <= plain.loaded_size()


def test_int8_cast_streams_through_the_offload_unchanged(node, comfy_nodes):
    """int8 storage (with its block scales in the layers' weight functions) under group offload:
    the same output as the cast alone, prompt after prompt."""
    wan = factory.build_model("wan21")
    cast = comfy_nodes.NODE_CLASS_MAPPINGS["OptimLayerwiseCast"].execute(model=wan, storage_dtype="int8").result[0]
    ref = sample(cast, "wan21")
    off = apply(node, cast, num_blocks_per_group=2, vram_budget_gb=0.0)
    for _ in range(2):
        assert torch.equal(sample(off, "wan21"), ref)
        assert off.loaded_size() > 0
    assert not torch.equal(ref, sample(wan, "wan21"))
