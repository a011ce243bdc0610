// node --test tests/web/ : the badge formatter (web/optim_stats_format.js).
import assert from "node:assert/strict";
import test from "node:test";

import {
  badgeLines, detailRows, executionPath, formatBytes, formatValue, kindOf, resolveExecutionId,
  stepHits, summarize, techniqueLabel,
} from "../../web/optim_stats_format.js";

test("DiT cache: steps reused from the hit strip, blocks skipped, the measured speedup", () => {
  const stats = { steps: 9, calls: 9, calls_cached: 4, steps_cached: 4, blocks_skipped: 8,
    estimated_speedup: 1.25, timed_speedup: 1.214, stepped_aside: false, hits: "001101101" };
  assert.equal(summarize(stats), "5/9 steps reused · 8 blocks skipped · 1.21× measured");
  assert.equal(kindOf("ditcache", stats), "cache");
});

test("without a hit strip, steps_cached/steps or shallow/full calls", () => {
  assert.equal(summarize({ steps: 10, steps_cached: 6, estimated_speedup: 1.4 }), "6/10 steps reused · ~1.40× est.");
  assert.equal(summarize({ full_calls: 4, shallow_calls: 6, timed_speedup: 1.8 }), "6/10 calls shallow · 1.80× measured");
});

test("a DiT cache that stepped aside says so", () => {
  assert.equal(summarize({ stepped_aside: true, calls: 0, hits: "" }), "stepped aside");
  assert.equal(summarize({ stepped_aside: true, calls: 0, hits: "----", estimated_speedup: 1 }), "stepped aside · ~1.00× est.");
});

test("memory and VAE keys: peak, bytes moved, GB/s, tiles", () => {
  const offload = { peak_vram_bytes: 3.5 * 2 ** 30, bytes_moved: 12 * 2 ** 30, gbps: 11.26 };
  assert.equal(summarize(offload), "peak 3.50 GiB · moved 12.0 GiB · 11.3 GB/s");
  assert.equal(kindOf("group_offload", offload), "memory");
  const vae = { tiles: 16, peak_memory_bytes: 700 * 2 ** 20 };
  assert.equal(summarize(vae), "16 tiles · peak 700 MiB");
  assert.equal(kindOf("vae_tiling", vae), "vae");
});

test("unknown techniques: a few numeric fields, sizes and speedups first, units from the key", () => {
  const stats = { groups_streamed: 12, transfers: 0, prefetch_hits: 40, peak_inflight_bytes: 512 * 2 ** 20,
    per_group: { a: 1 }, label: "x" };
  assert.equal(summarize(stats), "peak inflight 512 MiB · groups streamed 12 · prefetch hits 40");
  assert.equal(summarize({ cast_layers: 412, saved_mb: 1234.5 }), "saved 1235 MiB · cast layers 412");
  assert.equal(techniqueLabel("layer_stream"), "Layer stream");
  assert.equal(techniqueLabel("group_offload"), "Group offload");
  assert.equal(summarize({}), "ran");
});

test("a known key with too little beside it is topped up from the other fields", () => {
  assert.equal(summarize({ bytes_moved: 2048, transfers: 8 }), "moved 2.00 KiB · transfers 8");
});

test("values take the unit their key names", () => {
  assert.equal(formatBytes(0), "0 B");
  assert.equal(formatBytes(1536), "1.50 KiB");
  assert.equal(formatValue("shallow_fraction", 0.6), "60%");
  assert.equal(formatValue("timed_speedup", 1.2345), "1.23×");
  assert.equal(formatValue("load_seconds", 2.345), "2.35 s");
  assert.equal(formatValue("saved_mb", 12.5), "12.5 MiB");
  assert.equal(formatValue("stepped_aside", true), "yes");
  assert.equal(formatValue("gate_step", null), "—");
});

test("hit strips from a string or a list", () => {
  assert.deepEqual(stepHits({ hits: "01p-x" }), ["0", "1", "p", "-", "-"]);
  assert.deepEqual(stepHits({ hits: [true, false, 0.5] }), ["1", "0", "p"]);
  assert.equal(stepHits({ hits: "" }), null);
  assert.equal(stepHits({ hits: "---" }), null);   // no step saw a call: no strip
  assert.equal(stepHits({}), null);
});

test("one badge line per run when samplers share the model; inner nodes are named", () => {
  const run = (n) => ({ technique: "deepcache", stats: { full_calls: 4, shallow_calls: n } });
  assert.deepEqual(badgeLines([run(6)]), ["DeepCache: 6/10 calls shallow"]);
  assert.deepEqual(badgeLines([run(6), run(5)]),
    ["DeepCache (run 1): 6/10 calls shallow", "DeepCache (run 2): 5/9 calls shallow"]);
  assert.equal(badgeLines([run(1), run(2), run(3), run(4), run(5)]).at(-1), "+2 more runs");
  assert.deepEqual(badgeLines([{ ...run(6), inner: "My DeepCache" }]), ["My DeepCache: 6/10 calls shallow"]);
  assert.deepEqual(badgeLines([{ ...run(6), inner: "My DeepCache" }, { ...run(5), inner: "My DeepCache" }]),
    ["My DeepCache (run 1): 6/10 calls shallow", "My DeepCache (run 2): 5/9 calls shallow"]);
});

test("details list every field but the hit string", () => {
  assert.deepEqual(detailRows({ calls: 9, hits: "01", timed_speedup: 1.5 }), [["calls", "9"], ["timed speedup", "1.50×"]]);
});

function fakeGraph(nodes) {
  const byId = Object.fromEntries(nodes.map((n) => [String(n.id), n]));
  return { getNodeById: (id) => byId[String(id)] ?? null };
}

test("execution ids resolve through subgraphs, outermost node first", () => {
  const inner = { id: 3, title: "inner" };
  const container = { id: 5, subgraph: fakeGraph([inner]) };
  const plain = { id: 7 };
  const root = fakeGraph([container, plain]);
  assert.deepEqual(executionPath("5:3"), ["5", "3"]);
  assert.deepEqual(resolveExecutionId(root, "7"), [plain]);
  assert.deepEqual(resolveExecutionId(root, 7), [plain]);
  assert.deepEqual(resolveExecutionId(root, "5:3"), [container, inner]);
  assert.equal(resolveExecutionId(root, "5:4"), null);
  assert.equal(resolveExecutionId(root, "7:3"), null);   // node 7 is not a subgraph
  assert.equal(resolveExecutionId(root, ""), null);
  assert.equal(resolveExecutionId(null, "7"), null);
});

test("group offload: peak VRAM, bytes moved, GB/s, groups and transfers", () => {
  const stats = { peak_vram_bytes: 3.5 * 2 ** 30, bytes_moved: 12 * 2 ** 30, gbps: 11.26, groups: 24,
    transfers: 480, calls: 20, prefetch_hits: 460, resident_bytes: 2 ** 30, gb_moved: 12.9 };
  assert.equal(summarize(stats, "group_offload"), "peak 3.50 GiB · moved 12.0 GiB · 11.3 GB/s · 24 groups, 480 transfers");
  assert.deepEqual(badgeLines([{ technique: "group_offload", stats }]),
    ["Group offload: peak 3.50 GiB · moved 12.0 GiB · 11.3 GB/s · 24 groups, 480 transfers"]);
  assert.equal(kindOf("group_offload", stats), "memory");
  // on a CPU (no VRAM peak, no rate) and with the older key set (groups_streamed)
  assert.equal(summarize({ peak_vram_bytes: null, bytes_moved: 3 * 2 ** 20, gbps: null, groups_streamed: 3,
    transfers: 27, resident_bytes: -482400 }, "group_offload"), "moved 3.00 MiB · 3 groups, 27 transfers");
  assert.equal(summarize({ bytes_moved: 0, groups: 0, transfers: 0, peak_vram_bytes: 2 ** 30 }, "group_offload"),
    "peak 1.00 GiB · nothing streamed (fits)");
  assert.deepEqual(detailRows({ bytes_moved: 2048, gb_moved: 0.5 }), [["bytes moved", "2.00 KiB"], ["gb moved", "0.50 GiB"]]);
});

test("OptimVAE: tiles and their size, passes, peak memory", () => {
  const stats = { tiles: 16, tile_size: 512, passes: 1, peak_memory_bytes: 700 * 2 ** 20 };
  assert.equal(summarize(stats, "vae"), "16 tiles of 512 px · peak 700 MiB");
  assert.equal(summarize({ ...stats, passes: 2 }, "vae"), "16 tiles of 512 px · 2 passes · peak 700 MiB");
  assert.equal(summarize({ tiles: 1, tile_size: 512, passes: 1, peak_memory_bytes: 2 ** 30 }, "vae"), "not tiled · peak 1.00 GiB");
  assert.equal(kindOf("vae", stats), "vae");
  assert.deepEqual(badgeLines([{ technique: "vae", stats }]), ["VAE: 16 tiles of 512 px · peak 700 MiB"]);
  assert.deepEqual(detailRows({ tile_size: 256 }), [["tile size", "256 px"]]);
});

test("layerwise cast: layers in fp8 and kept, weight bytes before and after", () => {
  const stats = { layers_cast: 412, layers_kept: 37, weight_bytes_before: 4.8 * 2 ** 30, weight_bytes_after: 2.4 * 2 ** 30 };
  assert.equal(summarize(stats, "layerwise_cast"), "412 layers fp8, 37 kept · weights 4.80 GiB → 2.40 GiB (−50%)");
  assert.deepEqual(badgeLines([{ technique: "layerwise_cast", stats }]),
    ["8-bit cast: 412 layers fp8, 37 kept · weights 4.80 GiB → 2.40 GiB (−50%)"]);
  assert.equal(summarize({ ...stats, storage_dtype: "int8" }, "layerwise_cast"),
    "412 layers int8, 37 kept · weights 4.80 GiB → 2.40 GiB (−50%)");
  assert.equal(kindOf("layerwise_cast", stats), "memory");
  // the plan's own keys (cast_layers, skipped_layers, saved_mb) read the same way
  assert.equal(summarize({ cast_layers: 20, skipped_layers: 17, saved_mb: 4.48 }, "layerwise_cast"),
    "20 layers fp8, 17 kept · saved 4.48 MiB");
  assert.deepEqual(detailRows({ weight_bytes_after: 1536 }), [["weight bytes after", "1.50 KiB"]]);
});

test("device placement: bytes per device or the device names, then the memory keys", () => {
  const stats = { devices: { "cuda:0": 10 * 2 ** 30, "cuda:1": 9.5 * 2 ** 30 }, peak_vram_bytes: 11 * 2 ** 30 };
  assert.equal(summarize(stats, "device_placement"), "cuda:0 10.0 GiB, cuda:1 9.50 GiB · peak 11.0 GiB");
  assert.equal(summarize({ devices: ["cuda:0", "cpu"], bytes_moved: 2 ** 20 }, "device_placement"), "cuda:0, cpu · moved 1.00 MiB");
  assert.equal(techniqueLabel("device_placement"), "Device placement");
  assert.equal(kindOf("device_placement", {}), "memory");
});

test("no-op, attention backend and channels_last: what they routed or converted in the run", () => {
  assert.equal(summarize({ calls_routed: 50, output_changed: false }, "noop"), "50 calls routed · output unchanged");
  assert.equal(summarize({ calls_routed: 1 }, "noop"), "1 call routed");
  assert.equal(summarize({ backend: "sub_quadratic", attention_calls: 480 }, "attention_backend"),
    "sub_quadratic · 480 attention calls");
  assert.equal(summarize({ conv_layers: 24, convs_channels_last: 24, calls: 50 }, "channels_last"),
    "24/24 convs NHWC · 50 calls");
  assert.equal(techniqueLabel("attention_backend"), "Attention");
  assert.equal(techniqueLabel("channels_last"), "channels_last");
  assert.equal(kindOf("noop", { calls_routed: 3 }), "other");
});

test("sharded checkpoints: shards and bytes read with the RAM peak, or written and where", () => {
  const load = { shards_read: 3, bytes_read: 6.5 * 2 ** 30, layout: "comfyui", weights_missing: 0,
    peak_ram_above_start_bytes: 7.1 * 2 ** 30, load_seconds: 12.34 };
  assert.equal(summarize(load, "sharded_load"), "3 shards, 6.50 GiB read · RAM +7.10 GiB · 12.3 s");
  assert.equal(summarize({ ...load, weights_missing: 2, peak_ram_above_start_bytes: null }, "sharded_load"),
    "3 shards, 6.50 GiB read · 12.3 s · 2 weights missing");
  const save = { shards_written: 2, bytes_written: 3 * 2 ** 20, folder: "optim_shards/sd15_00001", layout: "comfyui" };
  assert.equal(summarize(save, "sharded_save"), "2 shards, 3.00 MiB · → optim_shards/sd15_00001");
  assert.equal(techniqueLabel("sharded_load"), "Sharded load");
  assert.equal(kindOf("sharded_save", save), "memory");
  assert.deepEqual(badgeLines([{ technique: "sharded_save", stats: save }]),
    ["Sharded save: 2 shards, 3.00 MiB · → optim_shards/sd15_00001"]);
});

test("DiT cache search: configurations tried, the range and steps chosen, speedup and PSNR", () => {
  const fixed = { configs_tried: 4, candidates_scored: 120, blocks: "2..3 of 4", mode: "fixed", cache_step_start: 2,
    cache_step_interval: 3, measured_speedup: 1.204, predicted_speedup: 1.3, psnr_db: 32.84, ssim: 0.98 };
  assert.equal(summarize(fixed, "ditcache_search"),
    "4 configs tried · blocks 2..3 of 4 from step 2, every 3 · 1.20× measured · 32.8 dB");
  const adaptive = { ...fixed, mode: "adaptive", threshold: 0.2, cache_step_interval: undefined };
  assert.match(summarize(adaptive, "ditcache_search"), /from step 2, adaptive 0\.20 ·/);
  assert.equal(kindOf("ditcache_search", fixed), "cache");
  assert.equal(formatValue("psnr_db", 32.84), "32.8 dB");
  // the search's own line, then the runs of the sampler with the cache it chose
  assert.deepEqual(badgeLines([{ technique: "ditcache_search", stats: fixed },
    { technique: "ditcache", stats: { steps: 9, hits: "001101101" } }]),
    ["DiT cache search (run 1): 4 configs tried · blocks 2..3 of 4 from step 2, every 3 · 1.20× measured · 32.8 dB",
      "DiT cache (run 2): 5/9 steps reused"]);
});

test("DiT cache config and load: the configuration given and what it was made for", () => {
  const stats = { note: "blocks 1..2 of 4, cached from step 2, refresh every 2 steps", made_for: "flux 20 steps euler",
    name: "flux-dev 20 euler" };
  assert.equal(summarize(stats, "ditcache_config"),
    "blocks 1..2 of 4, cached from step 2, refresh every 2 steps · for flux 20 steps euler");
  assert.equal(techniqueLabel("ditcache_config"), "DiT cache config");
  assert.equal(kindOf("ditcache_config", stats), "cache");
});
