"""Test-only ComfyUI nodes (never shipped with the pack): supply what no standard loader can build
without downloads — generated text conditioning, and models of families ComfyUI cannot detect at
small widths. Linked into custom_nodes/ by the end-to-end tests and the demo."""
import sys
from pathlib import Path

_REPO = str(Path(__file__).resolve().parents[3])
if _REPO not in sys.path:
    sys.path.append(_REPO)  # appended: the repo's nodes/ package must not shadow ComfyUI's nodes.py

from bench import factory  # noqa: E402

FAMILIES = list(factory.FAMILIES)


class OptimTestConditioning:
    """CONDITIONING with generated embeddings for `family`, deterministic for (text, seed)."""
    CATEGORY = "optim/testing"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "family": (FAMILIES,), "size": (list(factory.SIZES), {"default": "tiny"}),
            "text": ("STRING", {"default": "", "multiline": True}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
            "batch": ("INT", {"default": 1, "min": 1, "max": 64})}}

    def encode(self, family, size, text, seed, batch):
        return (factory.conditioning(family, size, text, batch, seed),)


class OptimTestModel:
    """A factory model of `family` at `size` (for families ComfyUI cannot detect from a file)."""
    CATEGORY = "optim/testing"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "family": (FAMILIES,), "size": (list(factory.SIZES), {"default": "tiny"}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1})}}

    def build(self, family, size, seed):
        return (factory.build_model(family, size, seed),)


NODE_CLASS_MAPPINGS = {"OptimTestConditioning": OptimTestConditioning, "OptimTestModel": OptimTestModel}
