"""Every example workflow: its UI form matches its API source, and it runs headless on factory
models through the server."""
import json
import re

import pytest

from bench import workflow_format as wf
from bench.server import execution_error, read_images

STATS_LINE = {"OptimDeepCache": r"DeepCache \(interval \d+, branch \d+, \S+\): \d+ full and \d+ shallow",
              "OptimTGate": r"T-GATE \(gate step \d+ of \d+\): cross-attention computed \d+, reused [1-9]",
              "OptimDiTCache": r"DiT cache \(fixed, blocks \d+\.\.\d+ of \d+\): [1-9]\d* of \d+ calls reused",
              "OptimGroupOffload": r"Group offload \(block_level, \d+ per group, streams \w+\): [1-9]\d* groups streamed",
              "OptimDevicePlacement": r"Device placement: [1-9]\d* units hooked"}
# the search workflow saves the configuration the load workflow reads: run it first
ORDER = {"ditcache-search-sd35": 0}
NAMES = sorted(wf.api_workflows(), key=lambda n: (ORDER.get(n, 1), n))


def family_of(api: dict) -> str:
    names = [n["inputs"].get("ckpt_name", "") for n in api.values() if n["class_type"] == "CheckpointLoaderSimple"]
    return "sd3" if any("sd3" in n for n in names) else "sd15"


def shorten(api: dict) -> dict:
    """Keep the run short on the tiny factory model (2 blocks for the DiTs): small image, few steps."""
    for node in api.values():
        inputs = node["inputs"]
        if node["class_type"] in ("EmptyLatentImage", "EmptySD3LatentImage"):
            inputs.update(width=64, height=64)
        if node["class_type"] in ("KSampler", "OptimDiTCacheSearch"):
            inputs["steps"] = 9
        if node["class_type"] == "OptimDiTCacheSearch":
            inputs.update(budget=1, calibration_seeds=1, target_speedup=1.2)
        if node["class_type"] == "OptimDiTCache":
            inputs.update(cache_block_start=0, cache_step_start=2)
        if node["class_type"] == "OptimDiTCacheConfig":   # the same configuration, for a 2-block model
            cfg = json.loads(inputs["config_json"])
            cfg.update(cache_block_start=0, cache_num_blocks=2, cache_step_start=2, num_blocks=2, steps=9)
            inputs["config_json"] = json.dumps(cfg)
    return api


def test_there_is_a_workflow_for_each_technique_node():
    used = {n["class_type"] for api in wf.api_workflows().values() for n in api.values()}
    assert {"OptimDeepCache", "OptimTGate", "OptimDiTCache", "OptimDiTCacheSearch", "OptimDiTCacheLoad",
            "OptimDiTCacheConfig"} <= used
    assert {"OptimLayerwiseCast", "OptimLayerwiseCastCLIP", "OptimVAE", "OptimAttentionBackend",
            "OptimChannelsLast"} <= used
    assert set(NAMES) <= set(wf.notes())
    assert "OptimGroupOffload" in used
    assert "OptimDevicePlacement" in used


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_is_generated_from_its_api_source(server, name):
    ui_path = wf.WORKFLOWS / f"{name}.json"
    assert ui_path.exists(), f"run tools/make_ui_workflows.py to create {ui_path.name}"
    expected = wf.api_to_ui(wf.api_workflows()[name], server.get("/object_info"), wf.notes()[name])
    assert json.loads(ui_path.read_text()) == json.loads(json.dumps(expected)), \
        f"{ui_path.name} is stale: run tools/make_ui_workflows.py"


@pytest.mark.parametrize("name", NAMES)
def test_workflow_runs_headless_on_factory_models(server, name):
    api = shorten(wf.swap_in_factory_models(wf.api_workflows()[name], family_of(wf.api_workflows()[name])))
    entry = server.run(api)
    assert execution_error(entry) is None, execution_error(entry)
    assert read_images(server.output_images(entry, "save")).shape == (1, 64, 64, 3)
    for node in wf.api_workflows()[name].values():
        if node["class_type"] in STATS_LINE:
            assert re.search(STATS_LINE[node["class_type"]], server.log())
