"""Small trained reference models of real ComfyUI architectures, their procedural dataset and a
prompt-adherence metric (see README, "Reference models")."""
from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def work_dir() -> Path:
    """Where training intermediates and the regenerated text encoder live (not shipped)."""
    from bench.comfy_env import cache_dir
    path = cache_dir() / "reference"
    path.mkdir(parents=True, exist_ok=True)
    return path
