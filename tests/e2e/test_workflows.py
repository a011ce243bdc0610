"""Every example workflow: its UI form matches its API source, and it runs headless on factory
models through the server."""
import json
import re

import pytest

from bench import workflow_format as wf
from bench.server import execution_error, read_images

NAMES = sorted(wf.api_workflows())
STATS_LINE = {"OptimDeepCache": r"DeepCache \(interval \d+, branch \d+, \S+\): \d+ full and \d+ shallow",
              "OptimTGate": r"T-GATE \(gate step \d+ of \d+\): cross-attention computed \d+, reused [1-9]"}


def test_there_is_a_workflow_for_each_technique_node():
    used = {n["class_type"] for api in wf.api_workflows().values() for n in api.values()}
    assert {"OptimDeepCache", "OptimTGate"} <= used
    assert set(NAMES) <= set(wf.notes())


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_is_generated_from_its_api_source(server, name):
    ui_path = wf.WORKFLOWS / f"{name}.json"
    assert ui_path.exists(), f"run tools/make_ui_workflows.py to create {ui_path.name}"
    expected = wf.api_to_ui(wf.api_workflows()[name], server.get("/object_info"), wf.notes()[name])
    assert json.loads(ui_path.read_text()) == json.loads(json.dumps(expected)), \
        f"{ui_path.name} is stale: run tools/make_ui_workflows.py"


@pytest.mark.parametrize("name", NAMES)
def test_workflow_runs_headless_on_factory_models(server, name):
    api = wf.swap_in_factory_models(wf.api_workflows()[name], "sd15")
    for node in api.values():  # keep the run short: small image, few steps
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=64, height=64)
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 9
    entry = server.run(api)
    assert execution_error(entry) is None, execution_error(entry)
    assert read_images(server.output_images(entry, "save")).shape == (1, 64, 64, 3)
    for node in wf.api_workflows()[name].values():
        if node["class_type"] in STATS_LINE:
            assert re.search(STATS_LINE[node["class_type"]], server.log())
