import tempfile
from pathlib import Path

import pytest

from bench import graphs
from bench.comfy_env import REPO_ROOT
from bench.server import ComfyServer

HELPERS = REPO_ROOT / "tests" / "helper_nodes" / "optim_test_nodes"


@pytest.fixture(scope="session")
def server(comfy_nodes):
    """One real ComfyUI server for the end-to-end layer, with the pack and the test helper nodes
    in custom_nodes/ and factory model files in models/."""
    base = Path(tempfile.mkdtemp(prefix="optim-e2e-"))
    for family in ("sd15", "sd3", "wan21"):
        graphs.write_model_files(base / "models", family)
    with ComfyServer(base, extra_custom_nodes=(HELPERS,)) as srv:
        yield srv
