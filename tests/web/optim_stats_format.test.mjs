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
