"""End to end: a real `main.py --cpu` server with the pack in custom_nodes/, driven over HTTP."""
import re

import numpy as np
import pytest

from bench import graphs
from bench.comfy_env import REPO_ROOT
from bench.server import execution_error
from bench.server import read_images as pixels

FAMILIES = ("sd15", "sd3", "wan21")  # the e2e conftest writes their model files


def pack_node_ids() -> set[str]:
    """Every node id the pack's node modules declare (read from source, not from ComfyUI)."""
    ids = set()
    for path in (REPO_ROOT / "nodes").glob("*.py"):
        ids |= set(re.findall(r'node_id="([^"]+)"', path.read_text()))
    return ids


def test_pack_imports_cleanly_and_lists_every_node(server):
    log = server.log()
    assert not [l for l in log.splitlines() if "IMPORT FAILED" in l and "comfyui-optim" in l], log[-3000:]
    info = server.get("/object_info")
    expected = pack_node_ids()
    assert expected, "no node ids found in nodes/"
    missing = expected - set(info)
    assert not missing, f"/object_info lacks {missing}"
    for node_id in expected:
        assert info[node_id]["python_module"] == "custom_nodes.comfyui-optim"


@pytest.mark.parametrize("family", FAMILIES)
def test_noop_graph_is_bit_identical_to_plain_graph(server, family):
    plain = server.run(graphs.txt2img(family, filename_prefix=f"plain-{family}"))
    noop = server.run(graphs.txt2img(family, optim=[("OptimNoop", {})], filename_prefix=f"noop-{family}"))
    assert execution_error(plain) is None and execution_error(noop) is None
    a, b = pixels(server.output_images(plain, "save")), pixels(server.output_images(noop, "save"))
    assert a.shape[1:] == (64, 64, 3)
    assert np.array_equal(a, b)


def test_invalid_input_gives_400_with_node_errors(server):
    prompt = graphs.txt2img("sd15", optim=[("OptimNoop", {})])
    del prompt["optim0"]["inputs"]["model"]
    status, body = server.queue(prompt)
    assert status == 400
    assert "optim0" in body["node_errors"]
    assert body["node_errors"]["optim0"]["class_type"] == "OptimNoop"
    assert any(e["type"] == "required_input_missing" for e in body["node_errors"]["optim0"]["errors"])


def test_runtime_failure_reaches_history_as_execution_error(server):
    prompt = graphs.txt2img("sd15")
    prompt["pos"]["inputs"]["family"] = "flux"   # 4096-wide text into a 768-wide UNet
    entry = server.run(prompt)
    err = execution_error(entry)
    assert err is not None and err["node_type"] == "KSampler"
    assert err["exception_message"]


def test_deepcache_graph_runs_and_changes_only_what_it_caches(server):
    plain = server.run(graphs.txt2img("sd15", steps=9, filename_prefix="dc-plain"))
    cached = server.run(graphs.txt2img("sd15", steps=9, filename_prefix="dc-cached", optim=[
        ("OptimDeepCache", {"cache_interval": 3, "cache_branch_id": 0, "skip_mode": "uniform",
                            "start_percent": 0.0, "end_percent": 1.0, "center": 15, "power": 1.4})]))
    off = server.run(graphs.txt2img("sd15", steps=9, filename_prefix="dc-off", optim=[
        ("OptimDeepCache", {"cache_interval": 1, "cache_branch_id": 0, "skip_mode": "uniform",
                            "start_percent": 0.0, "end_percent": 1.0, "center": 15, "power": 1.4})]))
    assert execution_error(cached) is None
    a, b, c = (pixels(server.output_images(e, "save")) for e in (plain, cached, off))
    assert not np.array_equal(a, b)
    assert np.array_equal(a, c)
    assert "DeepCache (interval 3, branch 0, uniform): 3 full and 6 shallow UNet calls" in server.log()


@pytest.mark.parametrize("inputs,error_type", [
    ({"cache_interval": 0}, "value_smaller_than_min"),
    ({"start_percent": 0.7, "end_percent": 0.2}, "custom_validation_failed"),
    ({"skip_mode": "sometimes"}, "custom_validation_failed"),  # ComfyUI 0.3.64 skips V3 combo checks
])
def test_deepcache_bad_inputs_are_rejected_at_validation(server, inputs, error_type):
    params = {"cache_interval": 3, "cache_branch_id": 0, "skip_mode": "uniform", "start_percent": 0.0,
              "end_percent": 1.0, "center": 15, "power": 1.4, **inputs}
    status, body = server.queue(graphs.txt2img("sd15", optim=[("OptimDeepCache", params)]))
    assert status == 400
    errors = body["node_errors"]["optim0"]["errors"]
    assert any(e["type"] == error_type for e in errors), errors


def test_deepcache_on_a_dit_passes_through_with_a_warning(server):
    plain = server.run(graphs.txt2img("sd3", filename_prefix="sd3-plain"))
    dc = server.run(graphs.txt2img("sd3", filename_prefix="sd3-dc", optim=[
        ("OptimDeepCache", {"cache_interval": 3, "cache_branch_id": 0, "skip_mode": "uniform",
                            "start_percent": 0.0, "end_percent": 1.0, "center": 15, "power": 1.4})]))
    assert np.array_equal(pixels(server.output_images(plain, "save")), pixels(server.output_images(dc, "save")))
    assert re.search(r"OptimDeepCache: SD3 \(\w+\) is not a UNet model", server.log())


def test_nodes_send_their_run_stats_to_the_frontend(server):
    from bench.server import collect_events
    prompt = graphs.txt2img("sd15", steps=9, seed=5, optim=[
        ("OptimDeepCache", {"cache_interval": 3, "cache_branch_id": 0, "skip_mode": "uniform",
                            "start_percent": 0.0, "end_percent": 1.0, "center": 15, "power": 1.4}),
        ("OptimTGate", {"gate_percent": 0.5, "gate_step": -1, "self_attn_interval": 0, "drop_uncond": True})])
    entry, events = collect_events(server, prompt, "comfyui-optim.stats")
    assert execution_error(entry) is None
    by_technique = {e["technique"]: e for e in events}
    assert by_technique["deepcache"]["node"] == "optim0"
    assert by_technique["deepcache"]["stats"]["shallow_calls"] == 6
    assert by_technique["tgate"]["node"] == "optim1"
    assert by_technique["tgate"]["stats"]["uncond_passes_dropped"] > 0


def test_two_samplers_share_one_patched_model_in_one_prompt(server):
    dc = ("OptimDeepCache", {"cache_interval": 3, "cache_branch_id": 0, "skip_mode": "uniform",
                             "start_percent": 0.0, "end_percent": 1.0, "center": 15, "power": 1.4})
    tg = ("OptimTGate", {"gate_percent": 0.5, "gate_step": -1, "self_attn_interval": 2, "drop_uncond": True})
    both = graphs.txt2img("sd15", steps=9, seed=11, optim=[dc, tg], filename_prefix="two-a")
    # a second sampler on the same patched model, another seed, its own decode and save
    both["sampler2"] = {"class_type": "KSampler", "inputs": {**both["sampler"]["inputs"], "seed": 12}}
    both["decode2"] = {"class_type": "VAEDecode", "inputs": {"samples": ["sampler2", 0], "vae": ["vae", 0]}}
    both["save2"] = {"class_type": "SaveImage", "inputs": {"images": ["decode2", 0], "filename_prefix": "two-b"}}
    entry = server.run(both)
    assert execution_error(entry) is None
    alone_prompt = graphs.txt2img("sd15", steps=9, seed=12, optim=[dc, tg], filename_prefix="two-c")
    # ComfyUI would answer an identical sampler from its cache; denoise above 0.9999 gives the very
    # same schedule (KSampler.set_steps) but a new cache key, so this sampler really runs alone.
    alone_prompt["sampler"]["inputs"]["denoise"] = 0.99995
    for key in ("pos", "neg"):  # the same conditioning as in the two-sampler prompt
        alone_prompt[key]["inputs"]["seed"] = 11
    runs_before = server.log().count("DeepCache (interval 3")
    alone = server.run(alone_prompt)
    assert server.log().count("DeepCache (interval 3") == runs_before + 1   # it did sample
    assert np.array_equal(pixels(server.output_images(entry, "save2")), pixels(server.output_images(alone, "save")))
