"""Run statistics of the nodes that had no badge: OptimNoop (calls routed), OptimAttentionBackend
(backend, attention calls), OptimChannelsLast (convs in NHWC, calls), OptimLoadShardedModel and
OptimSaveModelShards (sent once when the node runs), OptimDiTCacheSearch (what it tried and chose).
Each node is run as ComfyUI runs it (its hidden node id set) with a fake server that records the
`comfyui-optim.stats` messages."""
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from bench import factory


def as_run_by_comfyui(monkeypatch, cls, node_id):
    """ComfyUI runs a V3 node on a clone of its class carrying the hidden inputs (its id)."""
    monkeypatch.setattr(cls, "hidden", types.SimpleNamespace(unique_id=node_id), raising=False)
    return cls


def stats_of(server, node_id, technique):
    got = [d["stats"] for e, d, _ in server.sent
           if e == "comfyui-optim.stats" and d["node"] == node_id and d["technique"] == technique]
    return got


@pytest.fixture(scope="module")
def unet(comfy_nodes):
    return factory.build_model("sd15")


def node(comfy_nodes, name):
    return comfy_nodes.NODE_CLASS_MAPPINGS[name]


def sample(model, steps=3):
    return factory.sample(model, "sd15", steps=steps, cfg=5.0, width=64, height=64)


def test_noop_sends_the_calls_it_routed_per_run(comfy_nodes, unet, server, monkeypatch):
    cls = as_run_by_comfyui(monkeypatch, node(comfy_nodes, "OptimNoop"), "4")
    patched = cls.execute(model=unet).result[0]
    out = sample(patched)
    assert torch.equal(out, sample(unet))                          # still a no-op
    sample(patched.clone(), steps=2)                               # a later run (and a clone) counts anew
    # cfg 5: one batched call per step (cond and uncond together)
    assert stats_of(server, "4", "noop") == [{"calls_routed": 3, "output_changed": False},
                                             {"calls_routed": 2, "output_changed": False}]


def test_attention_backend_sends_its_backend_and_attention_calls(comfy_nodes, unet, server, monkeypatch):
    cls = as_run_by_comfyui(monkeypatch, node(comfy_nodes, "OptimAttentionBackend"), "7")
    patched = cls.execute(model=unet, backend="sub_quadratic").result[0]
    sample(patched)
    sample(patched, steps=2)
    a, b = stats_of(server, "7", "attention_backend")
    assert a["backend"] == b["backend"] == "sub_quadratic"
    # the same attention layers each step: the count is per run
    assert a["attention_calls"] > 0 and a["attention_calls"] * 2 == b["attention_calls"] * 3


def test_channels_last_sends_the_convs_converted_and_calls(comfy_nodes, unet, server, monkeypatch):
    cls = as_run_by_comfyui(monkeypatch, node(comfy_nodes, "OptimChannelsLast"), "9")
    patched = cls.execute(model=unet).result[0]
    torch.testing.assert_close(sample(patched), sample(unet), rtol=1e-3, atol=5e-3)   # NHWC sums differ in order
    (s,) = stats_of(server, "9", "channels_last")
    convs = sum(1 for m in unet.model.diffusion_model.modules() if isinstance(m, torch.nn.Conv2d))
    assert s == {"conv_layers": convs, "convs_channels_last": convs, "calls": 3}


def test_sharded_save_and_load_send_once_when_they_run(comfy_nodes, server, monkeypatch):
    import folder_paths
    save = as_run_by_comfyui(monkeypatch, node(comfy_nodes, "OptimSaveModelShards"), "s")
    load = as_run_by_comfyui(monkeypatch, node(comfy_nodes, "OptimLoadShardedModel"), "l")
    model = factory.build_model("sd15")
    rel = save.execute(model=model, filename_prefix="optim_test/stats", max_shard_size="1MiB",
                       layout="comfyui").result[0]
    (saved,) = stats_of(server, "s", "sharded_save")
    folder = Path(folder_paths.get_output_directory()) / rel
    shards = sorted(folder.glob("*.safetensors"))
    assert saved == {"shards_written": len(shards), "bytes_written": sum(p.stat().st_size for p in shards),
                     "folder": rel, "layout": "comfyui"}
    assert saved["shards_written"] >= 2
    dest = Path(folder_paths.get_folder_paths("diffusers")[0]) / "stats-sharded"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(folder, dest)
    try:
        load.execute(folder="stats-sharded", weight_dtype="default")
    finally:
        shutil.rmtree(dest, ignore_errors=True)
    (loaded,) = stats_of(server, "l", "sharded_load")
    assert loaded["shards_read"] == saved["shards_written"] and loaded["bytes_read"] == saved["bytes_written"]
    assert loaded["layout"] == "comfyui" and loaded["weights_missing"] == 0
    # RSS sampled after each shard, above its level before the load (None only without psutil)
    assert loaded["peak_ram_above_start_bytes"] is None or loaded["peak_ram_above_start_bytes"] >= 0
    assert loaded["load_seconds"] >= 0


def test_search_stats_name_what_was_tried_and_chosen(comfy_nodes):
    from optim import ditcache
    from optim.ditcache_search import Evaluation, SearchResult
    ditcache_nodes = sys.modules[node(comfy_nodes, "OptimDiTCacheSearch").__module__]
    fixed = ditcache.DiTCacheConfig(cache_block_start=2, cache_num_blocks=2, cache_step_start=2,
                                    cache_step_interval=3, num_blocks=4)
    best = Evaluation(fixed, 1.3, 1.2041, 32.8412, 0.98123)
    result = SearchResult(best, [best, Evaluation(fixed, 1.5, 1.4, 20.0, 0.9)], 120, 1.5)
    s = ditcache_nodes.search_stats(result, fixed)
    assert s == {"configs_tried": 2, "candidates_scored": 120, "blocks": "2..3 of 4", "mode": "fixed",
                 "cache_step_start": 2, "cache_step_interval": 3, "measured_speedup": 1.204,
                 "predicted_speedup": 1.3, "psnr_db": 32.84, "ssim": 0.9812, "reference_seconds": 1.5}
    adaptive = ditcache.DiTCacheConfig(mode="adaptive", threshold=0.2, cache_block_start=1, num_blocks=4)
    identical = Evaluation(adaptive, 1.1, 1.05, float("inf"), 1.0)
    s = ditcache_nodes.search_stats(SearchResult(identical, [identical], 0, 1.0), adaptive)
    assert s["threshold"] == 0.2 and "cache_step_interval" not in s and s["blocks"] == "1..2 of 4"
    assert s["psnr_db"] is None                                   # JSON has no infinity


def test_search_node_sends_its_stats(comfy_nodes, server, monkeypatch):
    cls = as_run_by_comfyui(monkeypatch, node(comfy_nodes, "OptimDiTCacheSearch"), "12")
    flux = factory.build_model("flux")
    pos, neg = factory.conditioning("flux", "tiny", "a cat"), factory.conditioning("flux", "tiny", "")
    model = cls.execute(model=flux, positive=pos, negative=neg, latent_image=factory.empty_latent("flux", 1, 64, 64),
                        seed=0, steps=8, cfg=1.0, sampler_name="euler", scheduler="simple", target_speedup=1.2,
                        budget=1, calibration_seeds=1).result[0]
    (s,) = stats_of(server, "12", "ditcache_search")
    assert s["configs_tried"] == 1 and s["measured_speedup"] > 0 and "blocks" in s
    # the sampling with the configuration found reports as the DiT cache, from the same node
    factory.sample(model, "flux", steps=8, cfg=1.0, width=64, height=64)
    assert len(stats_of(server, "12", "ditcache")) == 1


def test_config_and_load_nodes_send_the_configuration_they_give(comfy_nodes, server, monkeypatch, tmp_path):
    import folder_paths
    from optim import ditcache
    monkeypatch.setattr(folder_paths, "get_user_directory", lambda: str(tmp_path))
    inline = as_run_by_comfyui(monkeypatch, node(comfy_nodes, "OptimDiTCacheConfig"), "c")
    load = as_run_by_comfyui(monkeypatch, node(comfy_nodes, "OptimDiTCacheLoad"), "l")
    config = ditcache.DiTCacheConfig(cache_block_start=1, cache_num_blocks=2, cache_step_start=2, cache_step_interval=2,
                                     family="flux", num_blocks=4, steps=20, sampler="euler")
    inline.execute(config_json=config.to_json())
    ditcache_nodes = sys.modules[inline.__module__]
    ditcache_nodes.config_store().save("flux tiny", config)
    assert load.execute(name="flux tiny").result[0].to_json() == config.to_json()
    expected = {"note": "blocks 1..2 of 4, cached from step 2, refresh every 2 steps", "made_for": "flux 20 steps euler"}
    assert stats_of(server, "c", "ditcache_config") == [expected]
    assert stats_of(server, "l", "ditcache_config") == [{**expected, "name": "flux tiny"}]
