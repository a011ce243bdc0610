"""End to end: a real `main.py --cpu` server with the pack in custom_nodes/, driven over HTTP."""
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench import graphs
from bench.comfy_env import REPO_ROOT
from bench.server import ComfyServer, execution_error

HELPERS = REPO_ROOT / "tests" / "helper_nodes" / "optim_test_nodes"
FAMILIES = ("sd15", "sd3", "wan21")


def pack_node_ids() -> set[str]:
    """Every node id the pack's node modules declare (read from source, not from ComfyUI)."""
    ids = set()
    for path in (REPO_ROOT / "nodes").glob("*.py"):
        ids |= set(re.findall(r'node_id="([^"]+)"', path.read_text()))
    return ids


@pytest.fixture(scope="module")
def server(comfy_nodes):
    base = Path(tempfile.mkdtemp(prefix="optim-e2e-"))
    for family in FAMILIES:
        graphs.write_model_files(base / "models", family)
    with ComfyServer(base, extra_custom_nodes=(HELPERS,)) as srv:
        yield srv


def pixels(paths):
    return np.stack([np.asarray(Image.open(p)) for p in paths])


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
