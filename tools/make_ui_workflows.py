"""Regenerate the UI-format workflows (workflows/*.json, what ComfyUI's template browser opens)
from their API-format sources (workflows/api/*.json), using a real ComfyUI's /object_info.

Usage: python tools/make_ui_workflows.py   (run with the project's virtual environment)"""
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.server import ComfyServer  # noqa: E402
from bench.workflow_format import write_ui_workflows  # noqa: E402

with ComfyServer(Path(tempfile.mkdtemp(prefix="optim-workflows-"))) as server:
    for path in write_ui_workflows(server.get("/object_info")):
        print(f"wrote {path}")
