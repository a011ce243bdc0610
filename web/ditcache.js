// After an Optim DiT Cache Search runs, put the configuration it found into every empty
// Optim DiT Cache Config node of the graph, so the workflow file itself carries the configuration
// (shared or run headless, it reproduces the caching without anyone's saved files).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

export function fillEmptyConfigNodes(graphNodes, configJson) {
  let filled = 0;
  for (const node of graphNodes) {
    if (node.type !== "OptimDiTCacheConfig") continue;
    const widget = (node.widgets || []).find((w) => w.name === "config_json");
    if (widget && !String(widget.value ?? "").trim()) {
      widget.value = configJson;
      filled += 1;
    }
  }
  return filled;
}

if (app?.registerExtension) {
  app.registerExtension({
    name: "comfyui-optim.ditcache",
    setup() {
      api.addEventListener("executed", ({ detail }) => {
        const configJson = detail?.output?.config_json?.[0];
        if (!configJson || !app.graph) return;
        if (fillEmptyConfigNodes(app.graph._nodes || [], configJson) > 0) {
          app.graph.setDirtyCanvas(true, true);
        }
      });
    },
  });
}
