"""Every example workflow: its UI form matches its API source, and it runs headless on factory
models through the server, with each pack node's run log showing it took effect."""
import json
import re

import numpy as np
import pytest

from optim import metrics, sharded
from bench import graphs, workflow_format as wf
from bench.comfy_env import PACK_NAME
from bench.server import collect_events, execution_error, read_images

# what each pack node logs when it did its work in a run (searched in the log of that run only)
STATS_LINE = {"OptimDeepCache": r"DeepCache \(interval \d+, branch \d+, \S+\): \d+ full and [1-9]\d* shallow",
              "OptimTGate": r"T-GATE \(gate step \d+ of \d+\): cross-attention computed \d+, reused [1-9]",
              "OptimDiTCache": r"DiT cache \((fixed|adaptive), blocks \d+\.\.\d+ of \d+\): [1-9]\d* of \d+ calls reused",
              "OptimDiTCacheSearch": r"DiT cache \((fixed|adaptive), blocks \d+\.\.\d+ of \d+\): [1-9]\d* of \d+ calls reused",
              "OptimGroupOffload": r"Group offload \(block_level, \d+ per group, streams \w+\): [1-9]\d* groups streamed",
              "OptimLayerwiseCast": r"OptimLayerwiseCast on \w+ \(\w+\):.*\b(cast_layers|layers_cast)\W+[1-9]",
              "OptimDevicePlacement": r"Device placement: [1-9]\d* units hooked"}
# workflows whose branches must give identical images (the control of an A/B comparison)
IDENTICAL_OUTPUTS = {"noop-control-sd15": ("save", "save_plain")}
# where a node's line must come after: the search's own trial runs log cache lines too, the
# sampling with the configuration it found comes after its report
AFTER = {"OptimDiTCacheSearch": "configurations sampled"}
# the search workflow saves the configuration the load workflow reads: run it first
ORDER = {"ditcache-search-sd35": 0}
NAMES = sorted(wf.api_workflows(), key=lambda n: (ORDER.get(n, 1), n))
SIZE = 64      # px: the factory models are tiny; a workflow that upscales the latent ends larger
FRAMES = 5     # video workflows
SHARD_SIZE = "32MB"   # the factory's tiny SD1.5 UNet (88 MB) in three shards
# pack nodes allowed to send no run statistics (none: every node's badge has figures)
NO_STATS: set[str] = set()


def shorten(api: dict) -> dict:
    """Keep the run short on the tiny factory model (2 blocks for the DiTs): small image, few steps;
    and make each node do its work at that size (stream everything, tile the small decode)."""
    for node in api.values():
        inputs = node["inputs"]
        if node["class_type"] in ("EmptyLatentImage", "EmptySD3LatentImage", "EmptyHunyuanLatentVideo"):
            inputs.update(width=SIZE, height=SIZE)
        if node["class_type"] == "EmptyHunyuanLatentVideo":
            inputs["length"] = FRAMES
        if node["class_type"] in ("KSampler", "OptimDiTCacheSearch"):
            inputs["steps"] = 9
        if node["class_type"] == "OptimDiTCacheSearch":
            inputs.update(budget=1, calibration_seeds=1, target_speedup=1.2)
        if node["class_type"] == "OptimDiTCache":
            inputs.update(cache_block_start=0, cache_step_start=2)
            if inputs.get("mode") == "adaptive":   # generated weights change more per step than trained ones
                inputs["threshold"] = 1.0
        if node["class_type"] == "OptimDiTCacheConfig":   # the same configuration, for a 2-block model
            cfg = json.loads(inputs["config_json"])
            cfg.update(cache_block_start=0, cache_num_blocks=2, cache_step_start=2, num_blocks=2, steps=9)
            inputs["config_json"] = json.dumps(cfg)
        if node["class_type"] == "OptimGroupOffload":   # stream every block, each on its own
            inputs.update(vram_budget_gb=0.0, num_blocks_per_group=1)
        if node["class_type"] == "OptimSaveModelShards":
            inputs["max_shard_size"] = SHARD_SIZE
        if node["class_type"] == "OptimVAE" and inputs["tile_size"] > SIZE:   # tile the 128 px decode
            inputs.update(tiling="always", tile_size=SIZE, overlap=16, min_tile_size=SIZE)
    return api


def factory_prompt(name: str) -> dict:
    """The workflow on factory models, shortened; its samplers get seeds of their own, so that no
    workflow's sampling is answered from ComfyUI's cache of another's (same model, same graph)."""
    api = shorten(wf.swap_in_factory_models(wf.api_workflows()[name], wf.family_of(wf.api_workflows()[name])))
    for node in api.values():
        if node["class_type"] in ("KSampler", "OptimDiTCacheSearch"):
            node["inputs"]["seed"] += 1000 * (NAMES.index(name) + 1)
    return api


def saved_node(api: dict) -> str | None:
    return next((k for k, n in api.items() if n["class_type"].startswith("Save")), None)


def executed(server, api: dict) -> set[str]:
    """The nodes ComfyUI runs for `api`: the output nodes and what they depend on (the factory swap
    leaves the text encoder loaders, and what uses their output, unconnected)."""
    info = server.get("/object_info")
    todo = [k for k, n in api.items() if info[n["class_type"]].get("output_node")]
    seen: set[str] = set()
    while todo:
        k = todo.pop()
        if k not in seen:
            seen.add(k)
            todo += [v[0] for v in api[k]["inputs"].values() if isinstance(v, list)]
    return seen


def run_logged(server, prompt: dict) -> tuple[dict, str, list]:
    """Run `prompt`; its history entry, what the server logged while it ran and the run statistics
    the pack's nodes sent (as the frontend receives them)."""
    start = len(server.log())
    entry, stats = collect_events(server, prompt, "comfyui-optim.stats")
    return entry, server.log()[start:], stats


@pytest.fixture(scope="session")
def sharded_folder(server):
    """What the sharded-load workflow loads: the factory's SD1.5 UNet file written as shards in
    ComfyUI's layout, in the server's models/diffusers under the name the workflow picks."""
    import safetensors.torch
    from bench import graphs
    from optim import sharded
    api = wf.api_workflows()["sharded-load-sd15"]
    name = next(n["inputs"]["folder"] for n in api.values() if n["class_type"] == "OptimLoadShardedModel")
    target = server.base_dir / "models" / "diffusers" / name
    if not target.exists():
        unet, _ = graphs.model_files("sd15")
        state = safetensors.torch.load_file(str(server.base_dir / "models" / "diffusion_models" / unet))
        sharded.save_sharded(state, target, sharded.parse_shard_size(SHARD_SIZE),
                             metadata={"comfyui-optim.layout": "comfyui"})
    return target


def test_there_is_a_workflow_for_each_technique_node():
    used = {n["class_type"] for api in wf.api_workflows().values() for n in api.values()}
    assert {"OptimDeepCache", "OptimTGate", "OptimDiTCache", "OptimDiTCacheSearch", "OptimDiTCacheLoad",
            "OptimDiTCacheConfig"} <= used
    assert {"OptimLayerwiseCast", "OptimLayerwiseCastCLIP", "OptimVAE", "OptimAttentionBackend",
            "OptimChannelsLast"} <= used
    assert set(NAMES) <= set(wf.notes())
    assert {"OptimGroupOffload", "OptimGroupOffloadVAE", "OptimGroupOffloadCLIP", "OptimNoop", "OptimDevicePlacement",
            "OptimLoadShardedModel", "OptimSaveModelShards"} <= used


def test_the_stacks_people_want_are_there():
    """The stacks issue 8 names, each on the model family it is meant for."""
    stacks = {"deepcache-tgate-sdxl": ("sdxl", {"OptimDeepCache", "OptimTGate"}),
              "ditcache-search-flux": ("flux", {"OptimDiTCacheSearch"}),
              "video-fp8-offload-ditcache-wan21": ("wan21", {"OptimLayerwiseCast", "OptimGroupOffload",
                                                             "OptimDiTCache"}),
              "vae-tiling-hires-sdxl": ("sdxl", {"OptimVAE", "LatentUpscaleBy"})}
    for name, (family, nodes) in stacks.items():
        api = wf.api_workflows()[name]
        assert wf.family_of(api) == family, name
        assert nodes <= {n["class_type"] for n in api.values()}, name


def test_the_template_browser_serves_every_workflow(server):
    """ComfyUI lists the pack's workflows/*.json as templates (the API forms in workflows/api/ are
    not listed) and serves each file as it is in the repository."""
    listed = server.get("/workflow_templates")[PACK_NAME]
    assert sorted(listed) == sorted(NAMES)
    for name in NAMES:
        served = server.get(f"/api/workflow_templates/{PACK_NAME}/{name}.json")
        assert served == json.loads((wf.WORKFLOWS / f"{name}.json").read_text()), name


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_is_generated_from_its_api_source(server, name):
    ui_path = wf.WORKFLOWS / f"{name}.json"
    assert ui_path.exists(), f"run tools/make_ui_workflows.py to create {ui_path.name}"
    expected = wf.api_to_ui(wf.api_workflows()[name], server.get("/object_info"), wf.notes()[name])
    assert json.loads(ui_path.read_text()) == json.loads(json.dumps(expected)), \
        f"{ui_path.name} is stale: run tools/make_ui_workflows.py"


@pytest.mark.parametrize("name", NAMES)
def test_workflow_runs_headless_on_factory_models(server, sharded_folder, name):
    from PIL import Image
    api = factory_prompt(name)
    entry, log, stats = run_logged(server, api)
    assert execution_error(entry) is None, execution_error(entry)
    # every pack node that ran sent its badge's statistics in this run
    sent = {e["node"] for e in stats}
    silent = [f"{k} ({api[k]['class_type']})" for k in executed(server, api)
              if api[k]["class_type"].startswith("Optim") and not api[k]["class_type"].startswith("OptimTest")
              and api[k]["class_type"] not in NO_STATS and k not in sent]
    assert not silent, f"no run statistics from {silent}"
    for e in stats:
        assert e["prompt_id"] == entry["prompt"][1], e
        if e["technique"] == "sharded_load":
            assert e["stats"]["shards_read"] == 3 and e["stats"]["weights_missing"] == 0, e
    if saved_node(api) is None:   # saves no image: the sharded save writes a folder of shards
        (saved,) = [e["stats"] for e in stats if e["technique"] == "sharded_save"]
        folder = server.base_dir / "output" / saved["folder"]
        # the UNet as ComfyUI runs it (fp32 on a CPU: twice the file's fp16), in 32 MB shards
        assert saved["shards_written"] == len(list(folder.glob("*.safetensors"))) >= 3
        assert sharded.is_model_folder(folder)
        return
    paths = server.output_images(entry, saved_node(api))
    side = SIZE * 2 if any(n["class_type"] == "LatentUpscaleBy" for n in api.values()) else SIZE
    assert read_images(paths).shape == (1, side, side, 3)
    if name in IDENTICAL_OUTPUTS:
        a, b = (read_images(server.output_images(entry, key)) for key in IDENTICAL_OUTPUTS[name])
        assert np.array_equal(a, b)
    if any(n["class_type"] == "EmptyHunyuanLatentVideo" for n in api.values()):
        assert Image.open(paths[0]).n_frames == FRAMES
    # one line per node at least (nodes that log alike, as the offload of a UNet and of a VAE, count
    # together)
    wanted: dict[tuple[str, str | None], list[str]] = {}
    for node in api.values():
        if node["class_type"] in STATS_LINE:
            wanted.setdefault((STATS_LINE[node["class_type"]], AFTER.get(node["class_type"])), []).append(node["class_type"])
    for (pattern, after), classes in wanted.items():
        assert after is None or after in log, f"{classes}: no '{after}' in this run's log"
        tail = log.rsplit(after, 1)[-1] if after else log
        assert len(re.findall(pattern, tail)) >= len(classes), f"{classes} left no sign of their work in this run's log"


def test_large_image_workflow_tiles_its_decode(server):
    """The VAE tiling stack really tiles: the same graph with tiling off decodes the same latent
    (the samplers' outputs come from ComfyUI's cache) to a close but different image."""
    api = factory_prompt("vae-tiling-hires-sdxl")
    images = {}
    for tiling in ("always", "off"):
        for node in api.values():
            if node["class_type"] == "OptimVAE":
                node["inputs"]["tiling"] = tiling
        entry = server.run(api)
        assert execution_error(entry) is None, execution_error(entry)
        images[tiling] = read_images(server.output_images(entry, saved_node(api))).astype(np.float32) / 255
    assert not np.array_equal(images["always"], images["off"])
    import torch
    assert metrics.psnr(torch.from_numpy(images["off"]), torch.from_numpy(images["always"]), 1.0) > 20


def test_video_stack_composes(server):
    """fp8 + group offload + DiT cache on Wan: the offload streams the fp8 weights (fewer bytes
    than without the cast node) and skips the transfers of the block the cache skips."""
    moved = {}
    for cast in (True, False):
        api = factory_prompt("video-fp8-offload-ditcache-wan21")
        api["sampler"]["inputs"]["seed"] += 1            # not the cached outputs of the run above
        if not cast:
            api["offload"]["inputs"]["model"] = api["cast"]["inputs"]["model"]
            del api["cast"]
        entry, events = collect_events(server, api, "comfyui-optim.stats")
        assert execution_error(entry) is None, execution_error(entry)
        stats = {e["technique"]: e["stats"] for e in events}
        offload, cache = stats["group_offload"], stats["ditcache"]
        assert cache["calls_cached"] > 0
        # every group is streamed on every call, except the cached block's on the calls that reuse
        # it; a prefetch made before the cache decided to reuse is counted as wasted
        assert offload["transfers"] == (offload["groups_streamed"] * offload["calls"] - cache["calls_cached"]
                                        + offload["prefetch_wasted"])
        moved[cast] = offload["bytes_moved"]
    assert moved[True] < 0.75 * moved[False], moved


def test_sharded_load_workflow_samples_like_the_whole_file(server, sharded_folder):
    """The UNet loaded shard by shard gives the image the same UNet's single file gives."""
    api = factory_prompt("sharded-load-sd15")
    api["sampler"]["inputs"]["seed"] += 1                   # not the cached output of the run above
    images = []
    for loader in ("sharded", "file"):
        if loader == "file":
            unet, _ = graphs.model_files("sd15")
            api["load"] = {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}}
        entry = server.run(api)
        assert execution_error(entry) is None, execution_error(entry)
        images.append(read_images(server.output_images(entry, saved_node(api))))
    assert np.array_equal(*images)
