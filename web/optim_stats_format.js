// What the run-stats badges say: pure functions, no ComfyUI imports, so `node --test` checks them
// (tests/web/) and the extension (optim_stats.js) only draws what they return.
//
// The badge reads well-known keys of a node's stats, whatever the technique (web/README.md lists
// them), so a new node gets a sensible badge without frontend changes; a node whose stats have none
// of them shows a few of its numeric fields instead.

export const STATS_EVENT = "comfyui-optim.stats";

export const TECHNIQUE_LABELS = {
  noop: "No-op",
  deepcache: "DeepCache",
  tgate: "T-GATE",
  ditcache: "DiT cache",
  group_offload: "Group offload",
  layerwise_cast: "8-bit cast",
  vae: "VAE",
  vae_tiling: "VAE tiling",
  device_placement: "Device placement",
  attention_backend: "Attention",
  channels_last: "channels_last",
  sharded_load: "Sharded load",
  sharded_save: "Sharded save",
  ditcache_search: "DiT cache search",
  ditcache_config: "DiT cache config",
};

export function techniqueLabel(technique) {
  const name = String(technique ?? "optim");
  if (TECHNIQUE_LABELS[name]) return TECHNIQUE_LABELS[name];
  const words = name.replace(/[_-]+/g, " ").trim();
  return words ? words[0].toUpperCase() + words.slice(1) : "Optim";
}

const isNumber = (v) => typeof v === "number" && Number.isFinite(v);

export function formatBytes(n) {
  if (!isNumber(n)) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = Math.abs(n);
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  const digits = unit === 0 || value >= 100 ? 0 : value >= 10 ? 1 : 2;
  return `${n < 0 ? "-" : ""}${value.toFixed(digits)} ${units[unit]}`;
}

export function formatNumber(v) {
  if (!isNumber(v)) return "—";
  if (Number.isInteger(v)) return String(v);
  const a = Math.abs(v);
  return a >= 100 ? v.toFixed(0) : a >= 10 ? v.toFixed(1) : a >= 0.01 ? v.toFixed(2) : v.toPrecision(2);
}

// A value with the unit its key names (the suffix conventions are in web/README.md).
export function formatValue(key, value) {
  if (value === null || value === undefined) return "—";
  if (typeof value === "boolean") return value ? "yes" : "no";
  if (typeof value === "string") return value.length > 60 ? `${value.slice(0, 57)}...` : value;
  if (Array.isArray(value)) return value.length > 8 ? `${value.length} items` : value.map((v) => formatValue("", v)).join(", ");
  if (typeof value === "object") return `${Object.keys(value).length} entries`;
  if (!isNumber(value)) return String(value);
  const k = String(key);
  if (/(^|_)bytes($|_)/.test(k)) return formatBytes(value);
  if (k === "tile_size" || k.endsWith("_px")) return `${formatNumber(value)} px`;
  if (k.endsWith("speedup")) return `${value.toFixed(2)}×`;
  if (k === "gbps" || k.endsWith("_gbps")) return `${formatNumber(value)} GB/s`;
  if (k.endsWith("_fraction") || k.endsWith("_ratio")) return `${Math.round(value * 100)}%`;
  if (k.endsWith("_seconds") || k.endsWith("_s")) return `${formatNumber(value)} s`;
  if (k.endsWith("_ms")) return `${formatNumber(value)} ms`;
  if (k.endsWith("_db")) return `${formatNumber(value)} dB`;
  if (k.endsWith("_mb")) return `${formatNumber(value)} MiB`;
  if (k.endsWith("_gb") || k.startsWith("gb_")) return `${formatNumber(value)} GiB`;
  return formatNumber(value);
}

// Per-step hits: `hits` is a string with one character per step ('1' reused, '0' computed,
// 'p' partly, '-' no call) or a list of booleans / 0-1 numbers.
// null when no step saw a call (nothing to show).
export function stepHits(stats) {
  const hits = stats?.hits;
  let cells = null;
  if (typeof hits === "string") cells = [...hits].map((c) => ("01p-".includes(c) ? c : "-"));
  else if (Array.isArray(hits)) {
    cells = hits.map((h) => (h === true || h === 1 ? "1" : h === false || h === 0 ? "0" : isNumber(h) ? "p" : "-"));
  }
  return cells && cells.some((c) => c !== "-") ? cells : null;
}

// Memory nodes: what their badge says first, per technique (keys in web/README.md). Each returns
// the parts it made and marks the keys it read; the generic keys below then fill in the rest.
const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;

function offloadParts(s, push, take) {
  const groups = isNumber(s.groups) ? s.groups : s.groups_streamed;
  take("groups", "groups_streamed", "gb_moved", "resident_bytes");
  if (isNumber(s.peak_vram_bytes)) push(`peak ${formatBytes(s.peak_vram_bytes)}`, "peak_vram_bytes");
  if (s.bytes_moved === 0 && !groups) {
    push("nothing streamed (fits)", "bytes_moved", "transfers", "gbps");
    return;
  }
  if (isNumber(s.bytes_moved)) push(`moved ${formatBytes(s.bytes_moved)}`, "bytes_moved");
  if (isNumber(s.gbps)) push(`${formatNumber(s.gbps)} GB/s`, "gbps");
  if (isNumber(groups) && isNumber(s.transfers)) push(`${plural(groups, "group")}, ${plural(s.transfers, "transfer")}`, "transfers");
  else if (isNumber(groups)) push(plural(groups, "group"));
}

function vaeParts(s, push, take) {
  take("tile_size", "passes");
  if (isNumber(s.tiles)) {
    const size = isNumber(s.tile_size) ? ` of ${s.tile_size} px` : "";
    push(s.tiles > 1 ? `${s.tiles} tiles${size}` : "not tiled", "tiles");
  }
  if (isNumber(s.passes) && s.passes > 1) push(`${s.passes} passes`);
  const peak = isNumber(s.peak_vram_bytes) ? "peak_vram_bytes" : "peak_memory_bytes";
  if (isNumber(s[peak])) push(`peak ${formatBytes(s[peak])}`, "peak_vram_bytes", "peak_memory_bytes");
}

function castParts(s, push, take) {
  const cast = isNumber(s.layers_cast) ? s.layers_cast : s.cast_layers;
  const kept = isNumber(s.layers_kept) ? s.layers_kept : s.skipped_layers;
  take("layers_cast", "cast_layers", "layers_kept", "skipped_layers", "saved_mb", "storage_dtype");
  const storage = s.storage_dtype === "int8" ? "int8" : "fp8";
  if (isNumber(cast)) push(`${cast} layers ${storage}${isNumber(kept) ? `, ${kept} kept` : ""}`);
  const before = s.weight_bytes_before, after = s.weight_bytes_after;
  if (isNumber(before) && isNumber(after)) {
    const change = before > 0 ? ` (${after <= before ? "−" : "+"}${Math.round(Math.abs(1 - after / before) * 100)}%)` : "";
    push(`weights ${formatBytes(before)} → ${formatBytes(after)}${change}`, "weight_bytes_before", "weight_bytes_after");
  } else if (isNumber(s.saved_mb)) push(`saved ${formatValue("saved_mb", s.saved_mb)}`);
}

// `devices`: {device: bytes placed there} or a list of device names
function placementParts(s, push) {
  const d = s.devices;
  if (d && typeof d === "object" && !Array.isArray(d)) {
    const entries = Object.entries(d);
    if (entries.length && entries.every(([, v]) => isNumber(v))) {
      push(entries.slice(0, 3).map(([name, v]) => `${name} ${formatBytes(v)}`).join(", ")
        + (entries.length > 3 ? ` +${entries.length - 3}` : ""), "devices");
    } else if (entries.length) push(plural(entries.length, "device"), "devices");
  } else if (Array.isArray(d) && d.length) push(d.length > 3 ? plural(d.length, "device") : d.join(", "), "devices");
}

// OptimNoop: the model calls it routed (the output is unchanged by design)
function noopParts(s, push, take) {
  if (isNumber(s.calls_routed)) push(`${plural(s.calls_routed, "call")} routed`, "calls_routed");
  if (s.output_changed === false) push("output unchanged", "output_changed");
  take("output_changed");
}

function attentionParts(s, push) {
  if (typeof s.backend === "string" && s.backend) push(s.backend, "backend");
  if (isNumber(s.attention_calls)) push(`${plural(s.attention_calls, "attention call")}`, "attention_calls");
}

function channelsLastParts(s, push, take) {
  take("conv_layers");
  if (isNumber(s.convs_channels_last)) {
    const of = isNumber(s.conv_layers) ? `/${s.conv_layers}` : "";
    push(`${s.convs_channels_last}${of} convs NHWC`, "convs_channels_last");
  }
  if (isNumber(s.calls)) push(`${plural(s.calls, "call")}`, "calls");
}

function shardedLoadParts(s, push, take) {
  take("layout");
  if (isNumber(s.shards_read)) {
    const size = isNumber(s.bytes_read) ? `, ${formatBytes(s.bytes_read)} read` : "";
    push(`${plural(s.shards_read, "shard")}${size}`, "shards_read", "bytes_read");
  }
  if (isNumber(s.peak_ram_above_start_bytes)) push(`RAM +${formatBytes(s.peak_ram_above_start_bytes)}`, "peak_ram_above_start_bytes");
  if (isNumber(s.load_seconds)) push(`${formatNumber(s.load_seconds)} s`, "load_seconds");
  if (isNumber(s.weights_missing) && s.weights_missing > 0) push(`${plural(s.weights_missing, "weight")} missing`, "weights_missing");
  take("weights_missing");
}

function shardedSaveParts(s, push, take) {
  take("layout");
  if (isNumber(s.shards_written)) {
    const size = isNumber(s.bytes_written) ? `, ${formatBytes(s.bytes_written)}` : "";
    push(`${plural(s.shards_written, "shard")}${size}`, "shards_written", "bytes_written");
  }
  if (typeof s.folder === "string" && s.folder) push(`→ ${formatValue("folder", s.folder)}`, "folder");
}

// OptimDiTCacheSearch: what it tried and what it chose; its sampler's runs come as `ditcache`
function searchParts(s, push, take) {
  take("candidates_scored", "mode", "cache_step_start", "cache_step_interval", "threshold", "ssim",
    "reference_seconds", "predicted_speedup");
  if (isNumber(s.configs_tried)) push(`${plural(s.configs_tried, "config")} tried`, "configs_tried");
  if (typeof s.blocks === "string") {
    let when = isNumber(s.cache_step_start) ? ` from step ${s.cache_step_start}` : "";
    if (s.mode === "adaptive") when += isNumber(s.threshold) ? `, adaptive ${formatNumber(s.threshold)}` : ", adaptive";
    else if (isNumber(s.cache_step_interval)) when += `, every ${s.cache_step_interval}`;
    push(`blocks ${s.blocks}${when}`, "blocks");
  }
  if (isNumber(s.measured_speedup)) push(`${s.measured_speedup.toFixed(2)}× measured`, "measured_speedup");
  if (isNumber(s.psnr_db)) push(`${formatNumber(s.psnr_db)} dB`, "psnr_db");
}

// OptimDiTCacheConfig / Load: the configuration (its description is the `note`) and what it was made for
function configParts(s, push, take) {
  take("name");
  if (typeof s.made_for === "string" && s.made_for) push(`for ${s.made_for}`, "made_for");
}

const TECHNIQUE_PARTS = {
  group_offload: offloadParts, vae: vaeParts, vae_tiling: vaeParts, layerwise_cast: castParts,
  device_placement: placementParts, noop: noopParts, attention_backend: attentionParts,
  channels_last: channelsLastParts, sharded_load: shardedLoadParts, sharded_save: shardedSaveParts,
  ditcache_search: searchParts, ditcache_config: configParts,
};

// The parts of the compact summary: the technique's own first, then the well-known keys it left,
// most telling first.
function knownParts(stats, technique) {
  const s = stats || {};
  const parts = [];
  const used = new Set();
  const take = (...keys) => keys.forEach((k) => used.add(k));
  const push = (text, ...keys) => {
    parts.push(text);
    take(...keys);
  };
  const free = (...keys) => keys.every((k) => !used.has(k));

  const own = TECHNIQUE_PARTS[String(technique ?? "")];
  if (own) own(s, push, take);

  if (typeof s.note === "string" && s.note) {
    parts.unshift(s.note);
    take("note");
  }
  if (s.stepped_aside === true) {
    parts.push("stepped aside");
    take("stepped_aside");
  }
  const hits = stepHits(s);
  if (hits) {
    const ran = hits.filter((c) => c !== "-").length;
    const reused = hits.filter((c) => c === "1" || c === "p").length;
    parts.push(`${reused}/${ran} steps reused`);
    take("hits", "steps", "steps_cached");
  } else if (isNumber(s.steps_cached) && isNumber(s.steps)) {
    parts.push(`${s.steps_cached}/${s.steps} steps reused`);
    take("steps", "steps_cached");
  } else if (isNumber(s.shallow_calls) && isNumber(s.full_calls)) {
    parts.push(`${s.shallow_calls}/${s.shallow_calls + s.full_calls} calls shallow`);
    take("shallow_calls", "full_calls");
  }
  if (isNumber(s.blocks_skipped) && s.blocks_skipped > 0) {
    parts.push(`${s.blocks_skipped} blocks skipped`);
    take("blocks_skipped");
  }
  if (isNumber(s.timed_speedup)) {
    parts.push(`${s.timed_speedup.toFixed(2)}× measured`);
    take("timed_speedup", "estimated_speedup");
  } else if (isNumber(s.estimated_speedup)) {
    parts.push(`~${s.estimated_speedup.toFixed(2)}× est.`);
    take("estimated_speedup");
  }
  if (isNumber(s.tiles) && free("tiles")) {
    parts.push(`${s.tiles} tile${s.tiles === 1 ? "" : "s"}`);
    take("tiles");
  }
  if (isNumber(s.peak_vram_bytes) && free("peak_vram_bytes")) {
    parts.push(`peak ${formatBytes(s.peak_vram_bytes)}`);
    take("peak_vram_bytes", "peak_memory_bytes");
  } else if (isNumber(s.peak_memory_bytes) && free("peak_memory_bytes")) {
    parts.push(`peak ${formatBytes(s.peak_memory_bytes)}`);
    take("peak_memory_bytes");
  }
  if (isNumber(s.bytes_moved) && free("bytes_moved")) {
    parts.push(`moved ${formatBytes(s.bytes_moved)}`);
    take("bytes_moved", "gb_moved");
  }
  if (isNumber(s.gbps) && free("gbps")) {
    parts.push(`${formatNumber(s.gbps)} GB/s`);
    take("gbps");
  }
  return { parts, used };
}

const FALLBACK_SKIP = new Set(["steps", "calls"]);

// Up to `limit` more numeric fields, for stats with few or none of the well-known keys; sizes and
// speedups first, zeros last.
function fallbackParts(stats, used, limit) {
  const rank = (k, v) => (/(_bytes|_mb|_gb|speedup|gbps)$/.test(k) ? 0 : v === 0 ? 2 : 1);
  return Object.entries(stats || {})
    .filter(([k, v]) => isNumber(v) && !used.has(k) && !FALLBACK_SKIP.has(k))
    .map(([k, v], i) => ({ k, v, i, r: rank(k, v) }))
    .sort((a, b) => a.r - b.r || a.i - b.i)
    .slice(0, Math.max(0, limit))
    .map(({ k, v }) => `${shortLabel(k)} ${formatValue(k, v)}`);
}

// A key without the unit suffix its value already shows ("peak_inflight_bytes" -> "peak inflight").
function shortLabel(key) {
  const bare = key.replace(/_(bytes|mb|gb|seconds|s|ms|fraction|ratio|gbps)$/, "");
  return (bare || key).replace(/_/g, " ");
}

// The compact one-line summary of one run's stats (without the technique's name).
export function summarize(stats, technique) {
  const { parts, used } = knownParts(stats, technique);
  if (parts.length < 2) parts.push(...fallbackParts(stats, used, 3 - parts.length));
  return parts.length ? parts.join(" · ") : "ran";
}

// Badge colour family: cache (reuse), memory, vae, or other.
export function kindOf(technique, stats) {
  const s = stats || {};
  const t = String(technique || "");
  if (t.includes("vae") || "tiles" in s) return "vae";
  if (["peak_vram_bytes", "bytes_moved", "gbps", "peak_memory_bytes"].some((k) => k in s)) return "memory";
  if (t.includes("offload") || t.includes("cast") || t.includes("placement") || t.includes("sharded")) return "memory";
  if ("hits" in s || "steps_cached" in s || "shallow_calls" in s || t.includes("cache") || t === "tgate") return "cache";
  return "other";
}

// The badge text lines for the runs a node had in the last prompt (several when samplers share the
// patched model). `runs`: [{technique, stats, inner?}] where inner names a node inside a subgraph.
export function badgeLines(runs, maxRuns = 3) {
  const lines = [];
  const shown = runs.slice(0, maxRuns);
  shown.forEach((run, i) => {
    // a node inside a subgraph goes by its own title on the subgraph node (it names the technique)
    const who = run.inner || techniqueLabel(run.technique);
    const count = runs.length > 1 ? ` (run ${i + 1})` : "";
    lines.push(`${who}${count}: ${summarize(run.stats, run.technique)}`);
  });
  if (runs.length > maxRuns) lines.push(`+${runs.length - maxRuns} more run${runs.length - maxRuns === 1 ? "" : "s"}`);
  return lines;
}

function humanKey(key) {
  return String(key).replace(/_/g, " ");
}

// Every scalar field of one run, as [label, value] rows for the details panel.
export function detailRows(stats) {
  return Object.entries(stats || {})
    .filter(([k]) => k !== "hits")
    .map(([k, v]) => [humanKey(k), formatValue(k, v)]);
}

// Split an execution id ("12", or "5:3" for node 3 inside the subgraph of node 5) into node ids.
export function executionPath(executionId) {
  return String(executionId ?? "").split(":").filter((p) => p !== "");
}

// The nodes an execution id passes through, outermost first, ending with the node itself; null when
// some step is missing. `graph` needs getNodeById; a subgraph node carries its graph in .subgraph.
export function resolveExecutionId(graph, executionId) {
  const path = executionPath(executionId);
  if (!graph || !path.length) return null;
  const chain = [];
  let current = graph;
  for (let i = 0; i < path.length; i++) {
    const node = current?.getNodeById?.(path[i]) ?? current?.getNodeById?.(Number(path[i]));
    if (!node) return null;
    chain.push(node);
    if (i < path.length - 1) {
      current = node.subgraph;
      if (!current) return null;
    }
  }
  return chain;
}
