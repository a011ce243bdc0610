"""The registry of benchmarkable techniques.

A technique is applied exactly as a user's graph applies it: through the pack's node class as
ComfyUI registered it, on the model the baseline uses. Later issues add their techniques here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Technique:
    name: str
    node_id: str                          # the pack node that applies it (MODEL -> MODEL)
    description: str
    params: dict[str, Any] = field(default_factory=dict)  # node inputs besides the model
    families: tuple[str, ...] | None = None               # None: every family

    def apply(self, model, overrides: dict[str, Any] | None = None):
        """Run the node on `model` and return the patched MODEL it outputs."""
        import nodes as comfy_nodes
        node_cls = comfy_nodes.NODE_CLASS_MAPPINGS[self.node_id]
        out = node_cls.execute(model=model, **{**self.params, **(overrides or {})})
        return out.result[0]


UNET_FAMILIES = ("sd15", "sdxl")

TECHNIQUES: dict[str, Technique] = {t.name: t for t in [
    Technique("noop", "OptimNoop", "pass-through hook on every model call (control: expect 1.0x, inf dB)"),
    *[Technique(f"deepcache{n}", "OptimDeepCache",
                f"DeepCache, full UNet every {n} steps, shallowest branch (reference: 2.33x / 3.24x at 3 / 5)",
                {"cache_interval": n, "cache_branch_id": 0, "skip_mode": "uniform", "start_percent": 0.0,
                 "end_percent": 1.0, "center": 15, "power": 1.4}, families=UNET_FAMILIES)
      for n in (3, 5)],
]}


def technique(name: str) -> Technique:
    if name not in TECHNIQUES:
        raise KeyError(f"unknown technique {name!r}; known: {', '.join(TECHNIQUES)}")
    return TECHNIQUES[name]
