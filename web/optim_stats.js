// Run-stats badges: after each run, every pack node shows what it did in that run (steps reused and
// measured speedup, peak memory and bytes moved, tiles...), from the `comfyui-optim.stats` messages
// the nodes send, keyed by node id. Hover or select the node for every field and the per-step strip.
//
// Frontend extension API only: app.registerExtension, api.addEventListener and the node's own
// onDrawForeground / getExtraMenuOptions hooks (chained, never replaced). Nodes inside subgraphs
// arrive as "parent:child" ids: the inner node gets the badge, and each enclosing subgraph node a
// line naming it, so the run is visible from the root graph too.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import {
  STATS_EVENT, badgeLines, detailRows, kindOf, resolveExecutionId, stepHits, techniqueLabel,
} from "./optim_stats_format.js";

const ACCENT = { cache: "#4caf50", memory: "#42a5f5", vae: "#ab47bc", other: "#9e9e9e" };
const HIT_COLOURS = { 1: "#66bb6a", p: "#d4c04a", 0: "#5c5c5c", "-": "#2a2a2a" };
const FONT = "11px sans-serif";
const LINE = 14;
const PAD = 5;

const badged = new Set(); // nodes carrying runs of the current prompt, to clear them on the next

function clearAll() {
  for (const node of badged) delete node.optimRuns;
  badged.clear();
}

function addRun(node, run) {
  (node.optimRuns ||= []).push(run);
  badged.add(node);
  hookNode(node);
}

// Chain our drawing and menu entries onto this node (once): the node's class may have its own.
function hookNode(node) {
  if (node.__optimHooked) return;
  node.__optimHooked = true;
  const draw = node.onDrawForeground;
  node.onDrawForeground = function (ctx, ...rest) {
    const r = draw?.apply(this, [ctx, ...rest]);
    if (this.optimRuns?.length) drawBadge(this, ctx);
    return r;
  };
  const menu = node.getExtraMenuOptions;
  node.getExtraMenuOptions = function (canvas, options) {
    const r = menu?.apply(this, [canvas, options]);
    if (this.optimRuns?.length && Array.isArray(options)) {
      const pinned = !!this.properties?.optim_pin_details;
      options.push({
        content: pinned ? "Optim: hide run details" : "Optim: pin run details",
        callback: () => {
          this.properties = this.properties || {};
          this.properties.optim_pin_details = !pinned;
          this.setDirtyCanvas?.(true, true);
        },
      });
    }
    return r;
  };
}

function roundRect(ctx, x, y, w, h, r) {
  ctx.beginPath();
  if (ctx.roundRect) ctx.roundRect(x, y, w, h, r);
  else ctx.rect(x, y, w, h);
}

function drawStrip(ctx, hits, x, y, width) {
  const cell = Math.max(2, Math.min(8, Math.floor(width / hits.length)));
  hits.forEach((c, i) => {
    ctx.fillStyle = HIT_COLOURS[c] || HIT_COLOURS["-"];
    ctx.fillRect(x + i * cell, y, cell - (cell > 3 ? 1 : 0), 6);
  });
  return cell * hits.length;
}

function showDetails(node) {
  return !!(node.selected || node.mouseOver || node.properties?.optim_pin_details);
}

// Below the node (below its title when collapsed): the compact lines, then the per-step strip of the
// first run that has one; hovered, selected or pinned, every field of every run.
function drawBadge(node, ctx) {
  const runs = node.optimRuns;
  const lines = badgeLines(runs);
  const strip = runs.map((r) => (r.inner ? null : stepHits(r.stats))).find((h) => h);
  const details = [];
  if (showDetails(node)) {
    runs.forEach((run, i) => {
      const head = `${run.inner ? `${run.inner} · ` : ""}${techniqueLabel(run.technique)}`;
      details.push([`${head}${runs.length > 1 ? ` (run ${i + 1})` : ""}`, ""]);
      for (const row of detailRows(run.stats)) details.push(row);
      if (run.stats?.hits && typeof run.stats.hits === "string") details.push(["hits", run.stats.hits]);
    });
  }
  ctx.save();
  ctx.font = FONT;
  const textWidth = (t) => ctx.measureText(t).width;
  const rowText = ([k, v]) => (v === "" ? k : `${k}: ${v}`);
  let width = Math.max(...lines.map(textWidth), ...details.map((d) => textWidth(rowText(d))));
  if (strip) width = Math.max(width, Math.min(strip.length * 8, 400));
  width = Math.ceil(width) + 2 * PAD + 4;
  const height = PAD * 2 + lines.length * LINE + (strip ? 9 : 0) + (details.length ? details.length * LINE + 4 : 0);
  const x = 0;
  const y = node.flags?.collapsed ? 4 : (node.size?.[1] ?? 0) + 6;

  ctx.globalAlpha = 0.94;
  ctx.fillStyle = "#1b1f24";
  roundRect(ctx, x, y, width, height, 5);
  ctx.fill();
  ctx.globalAlpha = 1;
  ctx.fillStyle = ACCENT[kindOf(runs[0].technique, runs[0].stats)];
  ctx.fillRect(x, y + 3, 3, height - 6);

  ctx.textAlign = "left";
  ctx.textBaseline = "top";
  let ty = y + PAD;
  ctx.fillStyle = "#e8e8e8";
  for (const line of lines) {
    ctx.fillText(line, x + PAD + 4, ty);
    ty += LINE;
  }
  if (strip) {
    drawStrip(ctx, strip, x + PAD + 4, ty + 1, width - 2 * PAD - 4);
    ty += 9;
  }
  if (details.length) {
    ty += 4;
    for (const row of details) {
      ctx.fillStyle = row[1] === "" ? "#9ecfff" : "#bdbdbd";
      ctx.fillText(rowText(row), x + PAD + 4, ty);
      ty += LINE;
    }
  }
  ctx.restore();
}

function onStats({ detail }) {
  const chain = resolveExecutionId(app.graph, detail?.node);
  if (!chain) return;
  const target = chain[chain.length - 1];
  const run = { technique: detail.technique, stats: detail.stats || {}, promptId: detail.prompt_id };
  addRun(target, run);
  // The enclosing subgraph nodes name the inner node, so the root graph shows the run as well.
  const innerName = target.title || target.type || String(target.id);
  for (const outer of chain.slice(0, -1)) addRun(outer, { ...run, inner: innerName });
  app.canvas?.setDirty?.(true, true);
}

app.registerExtension({
  name: "comfyui-optim.stats",
  setup() {
    api.addEventListener(STATS_EVENT, onStats);
    api.addEventListener("execution_start", () => {
      clearAll();
      app.canvas?.setDirty?.(true, true);
    });
  },
});
