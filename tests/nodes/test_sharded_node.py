"""Sharded checkpoints in a real in-process ComfyUI: a factory SD3 written as diffusers-format
shards (fused q/k/v split, the scale/shift swap) loads shard by shard into the same weights as
ComfyUI's own whole-file load and samples bit-identically; save -> load round trip in ComfyUI's
layout through both nodes; folder choice and input validation."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from bench import factory
from optim import sharded


@pytest.fixture(scope="module")
def nodes_(comfy_nodes):
    m = comfy_nodes.NODE_CLASS_MAPPINGS
    return m["OptimLoadShardedModel"], m["OptimSaveModelShards"]


@pytest.fixture(scope="module")
def sd3(comfy_nodes):
    return factory.build_model("sd3")


@pytest.fixture(scope="module")
def diffusers_dir(comfy_nodes):
    import folder_paths
    return folder_paths.get_folder_paths("diffusers")[0]


def sample(model, fam="sd3"):
    return factory.sample(model, fam, steps=2, cfg=5.0, width=64, height=64)


def test_diffusers_shards_load_like_comfyui_whole_file(sd3, tmp_path):
    import comfy.sd
    import safetensors.torch
    dm = sd3.model.diffusion_model
    key_map = sharded.diffusers_key_map(sd3.model)
    files = sharded.save_sharded(dm.state_dict(), tmp_path / "sd3", 1 << 20, key_map)
    assert len(files) - 1 >= 4                                 # several shards
    keys = [k for f in files[:-1] for k in safetensors.torch.load_file(str(f))]
    assert "transformer_blocks.0.attn.to_q.weight" in keys and "joint_blocks.0.x_block.attn.qkv.weight" not in keys
    loaded = sharded.load_sharded(tmp_path / "sd3")
    assert loaded.sharded_info == {"layout": "diffusers-sd3", "shards": len(files) - 1, "missing": 0, "unexpected": 0}
    # ComfyUI's own path on the same weights as one file
    whole = tmp_path / "whole.safetensors"
    safetensors.torch.save_file({k: v for f in files[:-1] for k, v in safetensors.torch.load_file(str(f)).items()},
                                str(whole))
    reference = comfy.sd.load_diffusion_model(str(whole))
    a, b = loaded.model.diffusion_model.state_dict(), reference.model.diffusion_model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(v, dm.state_dict()[k]) for k, v in a.items())
    out = sample(loaded)
    assert torch.equal(out, sample(reference)) and torch.equal(out, sample(sd3))


def test_save_node_then_load_node_round_trip(nodes_, comfy_nodes, diffusers_dir, with_lora):
    import folder_paths
    load, save = nodes_
    unet = factory.build_model("sd15")
    key = "diffusion_model.input_blocks.1.0.in_layers.2.weight"
    patched = with_lora(unet, key, 0.02)                       # saved with the patch applied
    rel = save.execute(model=patched, filename_prefix="optim_test/sd15", max_shard_size="20MB",
                       layout="comfyui").result[0]
    out_dir = folder_paths.get_output_directory()
    saved = Path(out_dir) / rel
    shards = sorted(saved.glob("*.safetensors"))
    assert len(shards) >= 3 and all(p.stat().st_size <= 20 * 10 ** 6 + 10 ** 6 for p in shards)
    dest = Path(diffusers_dir) / "sd15-sharded"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(saved, dest)
    assert "sd15-sharded" in load.define_schema().inputs[0].options
    assert load.validate_inputs(folder="sd15-sharded") is True
    model = load.execute(folder="sd15-sharded", weight_dtype="default").result[0]
    assert model.sharded_info["layout"] == "comfyui" and model.sharded_info["missing"] == 0
    assert torch.equal(factory.sample(model, "sd15", steps=2, width=64, height=64),
                       factory.sample(patched, "sd15", steps=2, width=64, height=64))
    # a second save goes to a new folder
    rel2 = save.execute(model=unet, filename_prefix="optim_test/sd15", max_shard_size="1GB",
                        layout="comfyui").result[0]
    assert rel2 != rel


def test_validation(nodes_, diffusers_dir):
    load, save = nodes_
    assert "unknown model folder" in load.validate_inputs(folder="../../etc")
    assert "unknown model folder" in load.validate_inputs(folder="/tmp")
    with pytest.raises(ValueError, match="unknown model folder"):
        load.execute(folder="nowhere")
    assert "weight_dtype" in load.validate_inputs(folder="x", weight_dtype="fp4")
    assert "expected a size" in save.validate_inputs(max_shard_size="lots")
    assert "at least 1MiB" in save.validate_inputs(max_shard_size="10KB")
    assert "layout" in save.validate_inputs(layout="onnx")
    assert save.validate_inputs(max_shard_size="2GB", layout="diffusers") is True


def test_save_refuses_paths_outside_output_and_unsupported_layouts(nodes_, sd3):
    _load, save = nodes_
    with pytest.raises(Exception, match="outside the output folder"):
        save.execute(model=sd3, filename_prefix="../../escape", max_shard_size="1GB", layout="comfyui")
    wan = factory.build_model("wan21", calibrate=False)
    with pytest.raises(ValueError, match="diffusers layout is not supported"):
        save.execute(model=wan, filename_prefix="x", max_shard_size="1GB", layout="diffusers")


def test_bad_folder_contents_are_clear_errors(nodes_, diffusers_dir):
    load, _save = nodes_
    bad = Path(diffusers_dir) / "broken"
    shutil.rmtree(bad, ignore_errors=True)
    bad.mkdir()
    (bad / sharded.INDEX_NAME).write_text(json.dumps({"weight_map": {"a": "../../x.safetensors"}}))
    assert load.validate_inputs(folder="broken") is True       # listed, so its problem can be told
    with pytest.raises(ValueError, match="OptimLoadShardedModel: broken: .*not a .safetensors file name"):
        load.execute(folder="broken")
    shutil.rmtree(bad)


def test_group_offload_to_disk_reads_back_from_the_shards(comfy_nodes, tmp_path, with_lora):
    """A model loaded from shards and unchanged from them: disk offload maps the shards themselves
    (no copy written under the temp directory), output identical, shards untouched; with a LoRA
    (applied on the fly to the streamed layers) too."""
    import comfy.model_management as mm
    from optim import disk_offload
    from optim import group_offload as go
    offload = comfy_nodes.NODE_CLASS_MAPPINGS["OptimGroupOffload"]
    unet = factory.build_model("sd15")
    sharded.save_sharded(unet.model.diffusion_model.state_dict(), tmp_path / "sd15", 20 * 10 ** 6)
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "sd15").iterdir()}
    loaded = sharded.load_sharded(tmp_path / "sd15")
    key = "diffusion_model.input_blocks.1.0.in_layers.2.weight"
    for model in (loaded, with_lora(loaded, key, 0.02)):
        ref = factory.sample(model, "sd15", steps=2, width=64, height=64)
        patched = offload.execute(model=model, offload_to_disk=True).result[0]
        assert torch.equal(factory.sample(patched, "sd15", steps=2, width=64, height=64), ref)
        ctl = go.controller(patched)
        stats = ctl.last_stats
        assert stats["transfers"] > 0 and stats["disk_bytes"] == stats["disk_file_backed_bytes"] > 0
        # (the pack as ComfyUI loaded it is another module object than `optim` here: compare names)
        assert [type(s).__name__ for s in ctl.stores] == ["FileBackedStore"]
        leaf = patched.model.diffusion_model.input_blocks[1][0].in_layers[2]
        assert leaf.weight.data_ptr() in disk_offload.pointers(ctl.stores)
        mm.unload_all_models()
        assert leaf.weight.data_ptr() not in disk_offload.pointers(ctl.stores)     # back in RAM
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "sd15").iterdir()} == stamp
    assert torch.equal(factory.sample(loaded, "sd15", steps=2, width=64, height=64),
                       factory.sample(unet, "sd15", steps=2, width=64, height=64))


def test_save_node_in_diffusers_layout_loads_back(nodes_, sd3):
    import folder_paths
    _load, save = nodes_
    rel = save.execute(model=sd3, filename_prefix="optim_test/sd3", max_shard_size="2MB", layout="diffusers").result[0]
    folder = Path(folder_paths.get_output_directory()) / rel
    index = json.loads((folder / sharded.INDEX_NAME).read_text())
    assert "transformer_blocks.0.attn.to_q.weight" in index["weight_map"]
    loaded = sharded.load_sharded(folder)
    assert loaded.sharded_info["layout"] == "diffusers-sd3" and loaded.sharded_info["missing"] == 0
    a, b = loaded.model.diffusion_model.state_dict(), sd3.model.diffusion_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)
    shutil.rmtree(folder)
