"""Three layers: tests/unit (no ComfyUI), tests/nodes and tests/bench (ComfyUI in-process),
tests/e2e (a ComfyUI server). Without a ComfyUI checkout the last two layers skip with one reason."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from bench import comfy_env

TESTS = Path(__file__).resolve().parent
NEEDS_COMFYUI = ("nodes", "bench", "e2e")
COMFYUI_ROOT, WHY_NO_COMFYUI = comfy_env.find_comfyui()
SKIP_REASON = f"ComfyUI-dependent test skipped: {WHY_NO_COMFYUI}"


def pytest_report_header(config):
    if COMFYUI_ROOT is None:
        return [f"comfyui: none -- node and end-to-end tests skip ({WHY_NO_COMFYUI})"]
    return [f"comfyui: {COMFYUI_ROOT}"]


def pytest_collection_modifyitems(config, items):
    for item in items:
        layer = Path(str(item.fspath)).relative_to(TESTS).parts[0]
        if layer in NEEDS_COMFYUI:
            item.add_marker(pytest.mark.comfyui)
            if layer == "e2e":
                item.add_marker(pytest.mark.e2e)
            if COMFYUI_ROOT is None:
                item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


@pytest.fixture(scope="session")
def comfy_nodes():
    """ComfyUI's `nodes` module, loaded in-process on the CPU with this pack registered."""
    base = Path(tempfile.mkdtemp(prefix="optim-tests-"))
    return comfy_env.load_comfyui_in_process(base)


def pytest_terminal_summary(terminalreporter):
    if COMFYUI_ROOT is None:
        n = len(terminalreporter.stats.get("skipped", []))
        terminalreporter.write_line(f"{n} ComfyUI-dependent tests skipped: {WHY_NO_COMFYUI}")
