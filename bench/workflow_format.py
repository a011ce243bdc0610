"""The pack's example workflows: API-format sources in workflows/api/, UI-format files (what the
template browser opens) in workflows/, generated from them with a server's /object_info, and the
swap that lets tests and the demo run them on factory models instead of real checkpoints."""
from __future__ import annotations

import json
from pathlib import Path

from bench import factory, graphs
from bench.comfy_env import REPO_ROOT

WORKFLOWS = REPO_ROOT / "workflows"
API_DIR = WORKFLOWS / "api"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


NOTES = API_DIR / "notes.json"   # workflow name -> the text of its Note node


def api_workflows() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(API_DIR.glob("*.json")) if p != NOTES}


def notes() -> dict[str, str]:
    return json.loads(NOTES.read_text())


def write_ui_workflows(object_info: dict) -> list[Path]:
    """(Re)generate workflows/<name>.json from workflows/api/<name>.json."""
    written = []
    for name, api in api_workflows().items():
        path = WORKFLOWS / f"{name}.json"
        path.write_text(json.dumps(api_to_ui(api, object_info, notes().get(name, "")), indent=1) + "\n")
        written.append(path)
    return written


def _inputs_in_order(info: dict) -> list[tuple[str, object, dict]]:
    out = []
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            kind = spec[0]
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            out.append((name, kind, options))
    return out


def _is_widget(kind) -> bool:
    return isinstance(kind, list) or kind in WIDGET_TYPES


def api_to_ui(api: dict, object_info: dict, note: str = "") -> dict:
    """A UI-format (LiteGraph) workflow equivalent to the API prompt `api`, laid out left to right
    in execution order, with `note` in a Note node."""
    ids = {key: i + 1 for i, key in enumerate(api)}
    depth: dict[str, int] = {}

    def level(key):
        if key not in depth:
            parents = [v[0] for v in api[key]["inputs"].values() if isinstance(v, list)]
            depth[key] = 1 + max((level(p) for p in parents), default=-1)
        return depth[key]

    links, nodes, per_column = [], [], {}
    outputs_links: dict[tuple[str, int], list[int]] = {}
    for key, node in api.items():
        info = object_info[node["class_type"]]
        inputs, widgets = [], []
        for name, kind, options in _inputs_in_order(info):
            value = node["inputs"].get(name)
            if isinstance(value, list):  # a link
                link_id = len(links) + 1
                origin = value[0]
                out_type = object_info[api[origin]["class_type"]]["output"][value[1]]
                links.append([link_id, ids[origin], value[1], ids[key], len(inputs), out_type])
                outputs_links.setdefault((origin, value[1]), []).append(link_id)
                inputs.append({"name": name, "type": kind if isinstance(kind, str) else "COMBO",
                               "link": link_id})
            elif _is_widget(kind) and name in node["inputs"]:
                widgets.append(value)
                if options.get("control_after_generate"):
                    widgets.append("fixed")
            elif not _is_widget(kind):
                inputs.append({"name": name, "type": kind, "link": None})
        column = level(key)
        row = per_column.get(column, 0)
        per_column[column] = row + 1
        nodes.append({"id": ids[key], "type": node["class_type"], "pos": [40 + 340 * column, 40 + 260 * row],
                      "size": [300, 200], "flags": {}, "order": 0, "mode": 0, "inputs": inputs,
                      "outputs": [], "properties": {"Node name for S&R": node["class_type"]},
                      "widgets_values": widgets})
    for n, key in zip(nodes, api):
        info = object_info[api[key]["class_type"]]
        n["outputs"] = [{"name": name, "type": kind, "links": outputs_links.get((key, slot), []),
                         "slot_index": slot}
                        for slot, (name, kind) in enumerate(zip(info["output_name"], info["output"]))]
    for order, n in enumerate(sorted(nodes, key=lambda n: depth[list(api)[n["id"] - 1]])):
        n["order"] = order
    if note:
        nodes.append({"id": len(nodes) + 1, "type": "Note", "pos": [40, 40 + 260 * max(per_column.values())],
                      "size": [420, 200], "flags": {}, "order": len(nodes), "mode": 0, "inputs": [],
                      "outputs": [], "properties": {}, "widgets_values": [note]})
    return {"last_node_id": len(nodes), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


# what a checkpoint or diffusion model file name says about its family (first match wins)
FAMILY_HINTS = (("sd3", "sd3"), ("xl", "sdxl"), ("flux", "flux"), ("wan", "wan21"))


def family_of(api: dict) -> str:
    """The factory family standing in for the model files a workflow loads (SD1.5 by default)."""
    names = " ".join(str(n["inputs"].get(k, "")) for n in api.values()
                     if n["class_type"] in ("CheckpointLoaderSimple", "UNETLoader")
                     for k in ("ckpt_name", "unet_name")).lower()
    return next((family for hint, family in FAMILY_HINTS if hint in names), "sd15")


def _factory_model(family: str, size: str) -> dict:
    """A loader of the factory's `family` model: its file through UNETLoader where ComfyUI detects
    that size from the weights, else the test helper node that builds it in the server."""
    if size in factory.family(family).detectable:
        unet, _ = graphs.model_files(family, size)
        return {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}}
    return {"class_type": "OptimTestModel", "inputs": {"family": family, "size": size, "seed": 0}}


def swap_in_factory_models(api: dict, family: str, size: str = "tiny") -> dict:
    """The same graph on factory models: CheckpointLoaderSimple becomes a loader of the factory's
    model plus VAELoader on the factory's VAE, UNETLoader and VAELoader load the factory's files,
    CLIPTextEncode becomes the test helper OptimTestConditioning (text encoder loaders are left
    unconnected, so ComfyUI never runs them)."""
    _, vae = graphs.model_files(family, size)
    out = json.loads(json.dumps(api))
    for key, node in api.items():
        if node["class_type"] == "CheckpointLoaderSimple":
            out[key] = _factory_model(family, size)
            out[f"{key}_vae"] = {"class_type": "VAELoader", "inputs": {"vae_name": vae}}
            for other in out.values():
                for name, value in other["inputs"].items():
                    if isinstance(value, list) and value[0] == key and value[1] == 2:
                        other["inputs"][name] = [f"{key}_vae", 0]
        elif node["class_type"] == "UNETLoader":
            out[key] = _factory_model(family, size)
        elif node["class_type"] == "VAELoader":
            out[key] = {"class_type": "VAELoader", "inputs": {"vae_name": vae}}
        elif node["class_type"] == "CLIPTextEncode":
            out[key] = {"class_type": "OptimTestConditioning",
                        "inputs": {"family": family, "size": size, "text": node["inputs"]["text"],
                                   "seed": 0, "batch": 1}}
    return out
