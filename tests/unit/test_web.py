"""The frontend extension parses (node --check) when Node.js is installed."""
import shutil
import subprocess

import pytest

from bench.comfy_env import REPO_ROOT


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "web").glob("*.js")), ids=lambda p: p.name)
def test_javascript_parses(path):
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed: the frontend's JavaScript is not checked")
    result = subprocess.run([node, "--check", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
