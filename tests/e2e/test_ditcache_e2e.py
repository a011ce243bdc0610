"""DiT block caching through the HTTP API: validation errors, two samplers on one cached model,
the cache's stats event, and a bypassed cache node leaving the output bit-identical."""
import json

import numpy as np
import pytest

from bench import graphs
from bench.server import collect_events, execution_error
from bench.server import read_images as pixels

FIXED = {"mode": "fixed", "cache_block_start": 0, "cache_num_blocks": -1, "cache_step_start": 2,
         "cache_step_interval": 2, "threshold": 0.15, "max_consecutive": 3, "force": False}


def node_errors(server, prompt, node_id):
    status, body = server.queue(prompt)
    assert status == 400, body
    return " ".join(e.get("details", "") + " " + e.get("message", "")
                    for e in body["node_errors"][node_id]["errors"])


@pytest.mark.parametrize("change,expected", [
    ({"mode": "turbo"}, "mode must be one of fixed, adaptive"),
    ({"cache_num_blocks": 0}, "cached range is empty"),
    ({"cache_step_interval": 0}, "Value 0 smaller than min of 1"),
])
def test_invalid_widgets_are_validation_errors(server, change, expected):
    prompt = graphs.txt2img("wan21", optim=[("OptimDiTCache", {**FIXED, **change})])
    assert expected in node_errors(server, prompt, "optim0")


def test_invalid_inline_config_and_names_are_validation_errors(server):
    prompt = graphs.txt2img("wan21", optim=[("OptimDiTCache", FIXED)])
    prompt["cfg"] = {"class_type": "OptimDiTCacheConfig", "inputs": {"config_json": '{"cache_step_interval": 0}'}}
    prompt["optim0"]["inputs"]["config"] = ["cfg", 0]
    assert "cache_step_interval must be >= 1" in node_errors(server, prompt, "cfg")
    prompt["cfg"]["inputs"]["config_json"] = "{not json"
    assert "not valid JSON" in node_errors(server, prompt, "cfg")
    del prompt["cfg"], prompt["optim0"]["inputs"]["config"]
    prompt["load"] = {"class_type": "OptimDiTCacheLoad", "inputs": {"name": "../../etc/passwd"}}
    prompt["optim0"]["inputs"]["config"] = ["load", 0]
    assert "path separators" in node_errors(server, prompt, "load")


def test_a_config_for_another_family_stops_the_run_with_its_reason(server):
    prompt = graphs.txt2img("wan21", optim=[("OptimDiTCache", FIXED)])
    prompt["cfg"] = {"class_type": "OptimDiTCacheConfig",
                     "inputs": {"config_json": json.dumps({"family": "flux", "cache_block_start": 0})}}
    prompt["optim0"]["inputs"]["config"] = ["cfg", 0]
    err = execution_error(server.run(prompt))
    assert err is not None and "made for a flux model, not wan" in err["exception_message"]


def test_two_samplers_share_one_cached_model_and_report_stats(server):
    prompt = graphs.txt2img("wan21", steps=8, optim=[("OptimDiTCache", FIXED)], filename_prefix="dit-a")
    prompt["sampler2"] = json.loads(json.dumps(prompt["sampler"]))
    prompt["sampler2"]["inputs"]["denoise"] = 0.99995   # same schedule; not deduplicated by ComfyUI
    prompt["decode2"] = {"class_type": "VAEDecode", "inputs": {"samples": ["sampler2", 0], "vae": ["vae", 0]}}
    prompt["save2"] = {"class_type": "SaveImage", "inputs": {"images": ["decode2", 0], "filename_prefix": "dit-b"}}
    entry, events = collect_events(server, prompt, "comfyui-optim.stats")
    assert execution_error(entry) is None, execution_error(entry)
    a, b = pixels(server.output_images(entry, "save")), pixels(server.output_images(entry, "save2"))
    assert np.array_equal(a, b)   # per-run state: the second run starts from nothing, like the first
    mine = [e for e in events if e["technique"] == "ditcache" and e["node"] == "optim0"]
    assert len(mine) == 2 and all(e["stats"]["calls_cached"] > 0 for e in mine)


def test_cached_run_leaves_nothing_behind_for_plain_runs(server):
    """A bypassed cache node sends the plain graph; it must give the plain output even after a
    cached run of the same loaded model (nothing leaks through the shared model object)."""
    plain = server.run(graphs.txt2img("sd3", filename_prefix="dit-plain"))
    on = server.run(graphs.txt2img("sd3", optim=[("OptimDiTCache", FIXED)], filename_prefix="dit-on"))
    assert execution_error(on) is None
    assert not np.array_equal(pixels(server.output_images(plain, "save")), pixels(server.output_images(on, "save")))
    again = graphs.txt2img("sd3", filename_prefix="dit-plain-after")
    again["sampler"]["inputs"]["denoise"] = 0.99995   # same schedule, but not answered from ComfyUI's cache
    after = server.run(again)
    assert np.array_equal(pixels(server.output_images(plain, "save")), pixels(server.output_images(after, "save")))
