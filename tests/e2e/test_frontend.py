"""The frontend in a real browser: ComfyUI with the pack serves its page, headless Chromium (Debian's
`chromium` package, driven by Playwright for Python) loads the DeepCache + T-GATE example workflow on
factory models, with T-GATE moved into a subgraph and a second sampler sharing the patched model,
queues it from the page, and the pack nodes show their run-stats badges. Saves a screenshot; with
OPTIM_BADGES_SCREENSHOT=docs/frontend-badges.png it refreshes the README's picture (21:9, the
Registry's banner shape)."""
import os
import shutil
from pathlib import Path

import pytest

from bench import workflow_format as wf
from bench.comfy_env import PACK_NAME, REPO_ROOT

WORKFLOW = "deepcache-tgate-sd15"


def chromium_path() -> str | None:
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright is not installed (pip install playwright): the frontend is not tested in a browser")
    exe = chromium_path()
    if exe is None:
        pytest.skip("Chromium is not installed (apt-get install chromium): the frontend is not tested in a browser")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True, args=["--disable-gpu"])
        yield b
        b.close()


def example_graph(server) -> dict:
    """The example workflow on factory models, short, plus a second sampler on the same patched
    model; in UI format, as the template browser would open it."""
    api = wf.swap_in_factory_models(wf.api_workflows()[WORKFLOW], "sd15")
    for node in api.values():
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=64, height=64)
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 9
    sampler = next(k for k, n in api.items() if n["class_type"] == "KSampler")
    decode = next(k for k, n in api.items() if n["class_type"] == "VAEDecode")
    api["sampler_b"] = {"class_type": "KSampler", "inputs": {**api[sampler]["inputs"], "seed": 7}}
    api["decode_b"] = {"class_type": "VAEDecode",
                       "inputs": {**api[decode]["inputs"], "samples": ["sampler_b", 0]}}
    api["preview_b"] = {"class_type": "PreviewImage", "inputs": {"images": ["decode_b", 0]}}
    return wf.api_to_ui(api, server.get("/object_info"), wf.notes()[WORKFLOW])


OPEN_AND_QUEUE = """async (graph) => {
  const app = window.comfyAPI.app.app, api = window.comfyAPI.api.api;
  await app.loadGraphData(graph, true, true, "optim-badges-test");
  const byType = (t) => app.graph.nodes.find((n) => n.type === t);
  // T-GATE into a subgraph: its stats then arrive as "<subgraph node>:<inner node>"
  const tgate = byType("OptimTGate");
  const where = [...tgate.pos];
  const { node: container } = app.graph.convertToSubgraph(new Set([tgate]));
  container.pos = where;
  container.title = "T-GATE subgraph";
  container.size[0] = Math.max(container.size[0], 200);
  window.__optim = { done: [], errors: [] };
  api.addEventListener("execution_success", (e) => window.__optim.done.push(e.detail.prompt_id));
  api.addEventListener("execution_error", (e) => window.__optim.errors.push(e.detail.exception_message));
  await app.queuePrompt(0, 1);
  return { container: String(container.id), deepcache: String(byType("OptimDeepCache").id) };
}"""

READ_BADGES = """async ({ container, deepcache }) => {
  const app = window.comfyAPI.app.app;
  const fmt = await import("/extensions/%s/optim_stats_format.js");
  const outer = app.graph.getNodeById(container);
  const inner = outer.subgraph.nodes.find((n) => n.type === "OptimTGate");
  const dc = app.graph.getNodeById(deepcache);
  // what the badge draws: every fillText of the node's foreground pass, on a scratch canvas
  const drawn = (node) => {
    const ctx = document.createElement("canvas").getContext("2d");
    const texts = [];
    const fillText = ctx.fillText.bind(ctx);
    ctx.fillText = (t, ...rest) => { texts.push(t); fillText(t, ...rest); };
    node.onDrawForeground?.(ctx, app.canvas, app.canvas.canvas);
    return texts;
  };
  const runs = (n) => (n.optimRuns || []).map((r) => ({ technique: r.technique, stats: r.stats, inner: r.inner || null }));
  return {
    deepcache: { runs: runs(dc), lines: fmt.badgeLines(dc.optimRuns || []), drawn: drawn(dc) },
    tgate: { id: inner.id, runs: runs(inner), drawn: drawn(inner) },
    container: { runs: runs(outer), drawn: drawn(outer) },
  };
}""" % PACK_NAME


def open_page(server, browser):
    """The ComfyUI page, ready, and the list its errors go to from then on."""
    page = browser.new_page(viewport={"width": 1500, "height": 760})
    page_errors = []
    page.on("pageerror", lambda e: page_errors.append(f"{e}\n{e.stack}"))
    # a returning user's page: no template browser over the graph, no minimap or render info
    status, _ = server.post("/settings", {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False,
                                          "Comfy.Graph.CanvasInfo": False})
    assert status == 200
    page.goto(server.url)
    # ready: our extension registered, and the app's start-up workflow opened (loading ours before
    # that would see it replaced)
    page.wait_for_function("() => { const app = window.comfyAPI?.app?.app;"
                           " return app?.extensions?.some((e) => e.name === 'comfyui-optim.stats')"
                           " && app.extensionManager?.workflow?.activeWorkflow; }", timeout=30_000)
    # frontend 1.27.10 itself throws once while registering its core settings (also without the
    # pack: "reading 'id'" in settingStore.addSetting); what counts is every error from here on
    page_errors.clear()
    return page, page_errors


def test_pack_nodes_show_their_run_stats_after_a_run(server, browser, tmp_path):
    page, page_errors = open_page(server, browser)
    ids = page.evaluate(OPEN_AND_QUEUE, example_graph(server))
    page.wait_for_function("() => window.__optim.done.length || window.__optim.errors.length", timeout=120_000)
    assert page.evaluate("window.__optim.errors") == []
    got = page.evaluate(READ_BADGES, ids)

    # DeepCache: one run per sampler sharing its model, 6 of 9 steps shallow at interval 3
    dc = got["deepcache"]
    assert [r["technique"] for r in dc["runs"]] == ["deepcache", "deepcache"]
    for run in dc["runs"]:
        assert run["stats"]["shallow_calls"] == 6 and run["stats"]["hits"] == "011011011"
        assert run["stats"]["timed_speedup"] > 0   # measured on a busy CPU: its value is not checked
    assert dc["lines"][0].startswith("DeepCache (run 1): 6/9 steps reused · ") and "× measured" in dc["lines"][0]
    assert dc["lines"][:2] == [t for t in dc["drawn"] if t.startswith("DeepCache")]

    # T-GATE inside the subgraph: its own badge, and a line on the subgraph node naming it
    tg = got["tgate"]
    assert len(tg["runs"]) == 2 and all(r["stats"]["uncond_passes_dropped"] > 0 for r in tg["runs"])
    assert any(t.startswith("T-GATE (run 1): ") and "steps reused" in t for t in tg["drawn"])
    assert [r["inner"] for r in got["container"]["runs"]] == ["Optim T-GATE"] * 2
    assert any(t.startswith("Optim T-GATE (run 1): ") and "steps reused" in t for t in got["container"]["drawn"])
    assert not page_errors, page_errors

    # the README's picture: the pack nodes and the samplers, DeepCache selected (its details open)
    clip = page.evaluate("""(ids) => {
      const app = window.comfyAPI.app.app, c = app.canvas;
      const dc = app.graph.getNodeById(ids.deepcache);
      const sampler = app.graph.nodes.find((n) => n.type === "KSampler");
      c.selectNode(dc);
      c.ds.scale = 1;
      c.ds.offset = [30 - dc.pos[0], 130 - dc.pos[1]];
      c.setDirty(true, true);
      c.draw(true, true);
      const box = c.canvas.getBoundingClientRect();
      const screen = (x, y) => [box.left + (x + c.ds.offset[0]) * c.ds.scale, box.top + (y + c.ds.offset[1]) * c.ds.scale];
      const [x0, y0] = screen(dc.pos[0] - 20, dc.pos[1] - 45);
      const [x1] = screen(sampler.pos[0] + sampler.size[0] + 20, 0);
      const width = Math.min(x1 - x0, 1400);
      return { x: Math.max(0, x0), y: Math.max(0, y0), width, height: Math.round(width * 9 / 21) };
    }""", ids)
    shot = Path(os.environ.get("OPTIM_BADGES_SCREENSHOT") or tmp_path / "frontend-badges.png")
    if not shot.is_absolute():
        shot = REPO_ROOT / shot
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot), type="png", clip=clip)
    assert shot.stat().st_size > 10_000

    # the next run clears the badges first: queued again, every output is cached, nothing samples
    page.evaluate("async () => { window.__optim.done = []; await window.comfyAPI.app.app.queuePrompt(0, 1); }")
    page.wait_for_function("() => window.__optim.done.length || window.__optim.errors.length", timeout=60_000)
    assert page.evaluate("(id) => window.comfyAPI.app.app.graph.getNodeById(id).optimRuns", ids["deepcache"]) is None
    page.close()


VIDEO_STACK = "video-fp8-offload-ditcache-wan21"

QUEUE_AND_READ = """async (graph) => {
  const app = window.comfyAPI.app.app, api = window.comfyAPI.api.api;
  await app.loadGraphData(graph, true, true, "optim-memory-badges-test");
  const done = new Promise((resolve) => {
    api.addEventListener("execution_success", () => resolve(null));
    api.addEventListener("execution_error", (e) => resolve(e.detail.exception_message));
  });
  await app.queuePrompt(0, 1);
  const error = await done;
  const fmt = await import("/extensions/%s/optim_stats_format.js");
  const badge = (type) => {
    const node = app.graph.nodes.find((n) => n.type === type);
    return { techniques: (node.optimRuns || []).map((r) => r.technique), lines: fmt.badgeLines(node.optimRuns || []) };
  };
  return { error, offload: badge("OptimGroupOffload"), cache: badge("OptimDiTCache") };
}""" % PACK_NAME


def test_memory_node_badges_in_the_video_stack(server, browser, tmp_path):
    """The fp8 + group offload + DiT cache example on the factory's Wan model: the offload node's
    badge says what it streamed, the cache's what it reused."""
    api = wf.swap_in_factory_models(wf.api_workflows()[VIDEO_STACK], "wan21")
    for node in api.values():
        if node["class_type"] == "EmptyHunyuanLatentVideo":
            node["inputs"].update(width=64, height=64, length=5)
        if node["class_type"] == "KSampler":
            node["inputs"].update(steps=9, seed=1234)     # a prompt no other test ran (no cached outputs)
        if node["class_type"] == "OptimGroupOffload":
            node["inputs"]["vram_budget_gb"] = 0.0        # the tiny model would fit: stream it all
        if node["class_type"] == "OptimDiTCache":
            node["inputs"].update(cache_block_start=0, threshold=1.0)
    page, page_errors = open_page(server, browser)
    got = page.evaluate(QUEUE_AND_READ, wf.api_to_ui(api, server.get("/object_info"), wf.notes()[VIDEO_STACK]))
    assert got["error"] is None, got["error"]
    assert got["offload"]["techniques"] == ["group_offload"]
    line = got["offload"]["lines"][0]
    assert line.startswith("Group offload: moved ") and " groups, " in line and "transfers" in line, line
    assert got["cache"]["techniques"] == ["ditcache"] and "steps reused" in got["cache"]["lines"][0]
    assert "stepped aside" not in got["cache"]["lines"][0], got["cache"]["lines"]
    assert not page_errors, page_errors

    # the README's second picture: the memory nodes and the cache before the sampler, with their
    # badges; OPTIM_MEMORY_BADGES_SCREENSHOT=docs/frontend-memory-badges.png refreshes it
    clip = page.evaluate("""() => {
      const app = window.comfyAPI.app.app, c = app.canvas;
      const first = app.graph.nodes.find((n) => n.type === "OptimLayerwiseCast");
      const offload = app.graph.nodes.find((n) => n.type === "OptimGroupOffload");
      const last = app.graph.nodes.find((n) => n.type === "OptimDiTCache");
      c.deselectAll?.();
      c.ds.scale = 1;
      c.ds.offset = [30 - first.pos[0], 60 - first.pos[1]];
      c.setDirty(true, true);
      c.draw(true, true);
      const box = c.canvas.getBoundingClientRect();
      const screen = (x, y) => [box.left + (x + c.ds.offset[0]) * c.ds.scale, box.top + (y + c.ds.offset[1]) * c.ds.scale];
      const [x0, y0] = screen(first.pos[0] - 20, first.pos[1] - 45);
      const [x1, y1] = screen(last.pos[0] + last.size[0] + 60, Math.max(offload.pos[1] + offload.size[1], last.pos[1] + last.size[1]) + 50);
      const width = Math.min(x1 - x0, 1480);
      return { x: Math.max(0, x0), y: Math.max(0, y0), width, height: Math.min(Math.round(y1 - y0), 740) };
    }""")
    shot = Path(os.environ.get("OPTIM_MEMORY_BADGES_SCREENSHOT") or tmp_path / "frontend-memory-badges.png")
    if not shot.is_absolute():
        shot = REPO_ROOT / shot
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot), type="png", clip=clip)
    assert shot.stat().st_size > 10_000
    page.close()


QUEUE_AND_READ_NODES = """async ({graph, types}) => {
  const app = window.comfyAPI.app.app, api = window.comfyAPI.api.api;
  await app.loadGraphData(graph, true, true, "optim-speed-badges-test");
  const done = new Promise((resolve) => {
    api.addEventListener("execution_success", () => resolve(null));
    api.addEventListener("execution_error", (e) => resolve(e.detail.exception_message));
  });
  await app.queuePrompt(0, 1);
  const error = await done;
  const fmt = await import("/extensions/%s/optim_stats_format.js");
  const out = { error };
  for (const type of types) {
    const node = app.graph.nodes.find((n) => n.type === type);
    out[type] = fmt.badgeLines(node.optimRuns || []);
  }
  return out;
}""" % PACK_NAME


def test_speed_and_control_node_badges(server, browser):
    """The speed-knobs example with a no-op control added before the sampler: the attention
    backend's badge names the backend and the attention calls, channels_last the convolutions in
    NHWC and the calls, the no-op the calls it routed."""
    name = "speed-knobs-sd15"
    api = wf.swap_in_factory_models(wf.api_workflows()[name], "sd15")
    api["noop"] = {"class_type": "OptimNoop", "inputs": {"model": ["channels_last", 0]}}
    api["sampler"]["inputs"].update(model=["noop", 0], steps=4, seed=4321)   # no cached outputs
    api["latent"]["inputs"].update(width=64, height=64)
    page, page_errors = open_page(server, browser)
    types = ["OptimAttentionBackend", "OptimChannelsLast", "OptimNoop"]
    got = page.evaluate(QUEUE_AND_READ_NODES, {"graph": wf.api_to_ui(api, server.get("/object_info")), "types": types})
    assert got["error"] is None, got["error"]
    (attention,), (channels,), (noop,) = (got[t] for t in types)
    assert attention.startswith("Attention: pytorch_sdpa · ") and attention.endswith(" attention calls"), attention
    assert channels.startswith("channels_last: ") and "convs NHWC · 4 calls" in channels, channels
    assert noop == "No-op: 4 calls routed · output unchanged", noop
    assert not page_errors, page_errors
    page.close()


OPEN_TEMPLATES = """async (names) => {
  const app = window.comfyAPI.app.app;
  const out = {};
  for (const name of names) {
    // what the template browser does: fetch the pack's file, open it, then queueing converts it
    const graph = await (await fetch(`/api/workflow_templates/%s/${name}.json`)).json();
    await app.loadGraphData(graph, true, true, name);
    const { output } = await app.graphToPrompt();
    out[name] = { prompt: output, notes: app.graph.nodes.filter((n) => n.type === "Note").map((n) => n.widgets[0].value) };
  }
  return out;
}""" % PACK_NAME


def test_every_template_opens_in_the_frontend_as_its_api_form(server, browser):
    """Each workflow the template browser offers, opened by the real frontend and converted to a
    prompt as Queue does, is its API form (the same nodes, links and widget values), and shows its
    note. Inputs the API form leaves out may come back with their defaults."""
    names = sorted(wf.api_workflows())
    page, page_errors = open_page(server, browser)
    got = page.evaluate(OPEN_TEMPLATES, names)
    for name in names:
        api = wf.api_workflows()[name]
        ui_id = {key: str(i + 1) for i, key in enumerate(api)}
        prompt = got[name]["prompt"]
        assert sorted(prompt, key=int) == sorted(ui_id.values(), key=int), name
        for key, node in api.items():
            converted = prompt[ui_id[key]]
            assert converted["class_type"] == node["class_type"], (name, key)
            for input_name, value in node["inputs"].items():
                expected = [ui_id[value[0]], value[1]] if isinstance(value, list) else value
                assert converted["inputs"].get(input_name) == expected, (name, key, input_name)
        assert got[name]["notes"] == [wf.notes()[name]], name
    assert not page_errors, page_errors
    page.close()
