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


def test_badge_formatter_passes_its_node_tests():
    """tests/web/*.test.mjs: the badge formatter (web/optim_stats_format.js) under `node --test`."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed: the badge formatter's tests run in the browser test only")
    tests = sorted(str(p) for p in (REPO_ROOT / "tests" / "web").glob("*.test.mjs"))
    assert tests
    result = subprocess.run([node, "--test", *tests], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
