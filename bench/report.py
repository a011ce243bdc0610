"""Turn bench/results/*.json into the README's results tables."""
from __future__ import annotations

import json
from pathlib import Path

from bench.runner import RESULTS_DIR, fmt_db

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
FAMILIES_BEGIN, FAMILIES_END = "<!-- dit-families:begin -->", "<!-- dit-families:end -->"
SWEEP_BEGIN, SWEEP_END = "<!-- ditcache-sweep:begin -->", "<!-- ditcache-sweep:end -->"


def load_results(folder: Path = RESULTS_DIR) -> list[dict]:
    """The side-by-side runs of `python -m bench run` (the offload, layerwise and VAE benchmarks
    keep their own result formats in the same folder and their own tables in the README)."""
    results = (json.loads(p.read_text()) for p in sorted(folder.glob("*.json")))
    return [r for r in results if "technique" in r and "baseline" in r]


def markdown_tables(results: list[dict]) -> str:
    if not results:
        return "_No benchmark results yet: run `python -m bench run <technique>`._"
    header = ("| technique | model (weights) | size | steps (repeats) | device | speedup (wall) | FLOPs | skipped | "
              "latent PSNR dB | image PSNR dB | SSIM | peak mem MiB (base / opt) |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for r in sorted(results, key=lambda r: (r["technique"], r["family"], r["size"], r["device"])):
        b, o = r["baseline"], r["optimized"]
        flops = f"{r['flops_ratio']:.2f}x fewer" if r.get("flops_ratio") else "-"
        device = r["versions"].get("gpu", r["device"]) if r["device"] == "cuda" else \
            f"cpu ({r['versions']['cpu_count']} cores)"
        rows.append(
            f"| {r['technique']} | {r['family']} ({r['weights']}) | {r['size']} | {r['steps']} ({r['repeats']}) | "
            f"{device} | {r['speedup']:.2f}x | {flops} | {skipped_summary(r)} | "
            f"{fmt_db(r['psnr_latent_db'])} | {fmt_db(r['psnr_image_db'])} | {r['ssim_image']:.4f} | "
            f"{b['peak_mem_mb']:.0f} / {o['peak_mem_mb']:.0f} |")
    return header + "\n" + "\n".join(rows)


def skipped_summary(result: dict) -> str:
    """What the technique skipped, from the stats its nodes reported (model calls otherwise)."""
    parts = []
    for key, stats in result.get("technique_stats", {}).items():
        if "shallow_calls" in stats:
            parts.append(f"{stats['shallow_calls']}/{stats['shallow_calls'] + stats['full_calls']} UNet calls shallow")
        if "blocks_skipped" in stats:
            parts.append(f"{stats['calls_cached']}/{stats['calls']} calls skipped {stats['cached_blocks']} of "
                         f"{stats['blocks_per_call']} blocks")
        if "cross_attn_reused" in stats:
            total = stats["cross_attn_reused"] + stats["cross_attn_computed"]
            parts.append(f"{stats['cross_attn_reused']}/{total} cross-attn reused, "
                         f"{stats['uncond_passes_dropped']} uncond passes dropped")
    if not parts:
        b, o = result["baseline"]["model_calls"], result["optimized"]["model_calls"]
        parts.append(f"model calls {b} -> {o}")
    return "; ".join(parts)


def dit_families_table() -> str:
    """The README's table of DiT families the block cache covers, from `optim.dit_layout`."""
    from optim import dit_layout
    rows = ["| family | ComfyUI diffusion model class | block index space | hooked through | note |",
            "|---|---|---|---|---|"]
    for fam in dit_layout.FAMILIES:
        classes = ", ".join(f"`{c.rsplit('.', 1)[1]}`" for c in fam.classes)
        space = ", then ".join(f"`{seg.attr}`" for seg in fam.segments)
        rows.append(f"| {fam.name} | {classes} | {space} | {fam.method} | {fam.note} |")
    return "\n".join(rows)


def load_sweeps(folder: Path = RESULTS_DIR / "sweeps") -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("ditcache-sweep-*.json"))]


def sweep_tables(sweeps: list[dict]) -> str:
    """One table per DiT caching sweep: every arm, then the comparisons at equal speedup (by the wall
    clock, and by the work left out where the sweep measured it)."""
    if not sweeps:
        return "_No sweep yet: run `python -m bench sweep-ditcache`._"
    out = []
    for r in sweeps:
        device = r["versions"].get("gpu", r["device"]) if r["device"] == "cuda" else \
            f"cpu ({r['versions']['cpu_count']} cores)"
        out.append(f"**{r['family']}** ({r['size']}, {r['blocks']} blocks, {r['steps']} steps, cfg {r['cfg']}, "
                   f"{r['resolution'][0]}x{r['resolution'][1]}, {len(r['cases'])} prompt/seed cases, {device}, "
                   f"{r['weights']} weights); baseline {r['baseline']['seconds']:.1f} s for all cases.\n")
        judged = "adherence" in r["baseline"]
        if judged:
            out.append(f"Prompt adherence of the uncached outputs: {r['baseline']['adherence']:.3f}.\n")
        out.append("| arm | setting | speedup (wall) | work | latent PSNR dB | image PSNR dB | SSIM |"
                   + (" adherence |" if judged else "") + "\n|---|---|---|---|---|---|---|" + ("---|" if judged else ""))
        for a in r["arms"]:
            work = f"{a['work_speedup']:.2f}x" if "work_speedup" in a else "-"
            out.append(f"| {a['kind']} | {a['label']} | {a['speedup']:.2f}x | {work} | {fmt_db(a['psnr_latent_db'])} | "
                       f"{fmt_db(a['psnr_image_db'])} | {a['ssim_image']:.4f} |"
                       + (f" {a['adherence']:.3f} |" if judged else ""))
        for key, what in (("comparison", "speedup (wall)"), ("comparison_work", "work speedup")):
            if key in r:
                out.append("\n" + _comparison_table(r[key], what))
        out.append("")
    return "\n".join(out).rstrip()


def _comparison_table(rows: list[dict], what: str) -> str:
    out = [f"| built-in arm | its {what}, PSNR | ours at >= that {what} | margin |", "|---|---|---|---|"]
    for c in rows:
        theirs = f"{c['speedup']:.2f}x, {fmt_db(c['psnr_latent_db'])} dB"
        if c.get("note"):
            out.append(f"| {c['builtin']} | {theirs} | {c['note']} | - |")
        elif c["ours"] is None:
            out.append(f"| {c['builtin']} | {theirs} | none as fast | - |")
        else:
            out.append(f"| {c['builtin']} | {theirs} | {c['ours']}: {c['ours_speedup']:.2f}x, "
                       f"{fmt_db(c['ours_psnr_latent_db'])} dB | {c['margin_db']:+.2f} dB |")
    return "\n".join(out)


def replace_section(text: str, begin: str, end: str, body: str) -> str:
    if begin not in text or end not in text:
        raise ValueError(f"no {begin} ... {end} section")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body}\n{end}{tail}"


def update_readme(readme: Path, table: str) -> None:
    text = replace_section(readme.read_text(), BEGIN, END, table)
    if FAMILIES_BEGIN in text:
        text = replace_section(text, FAMILIES_BEGIN, FAMILIES_END, dit_families_table())
    if SWEEP_BEGIN in text:
        text = replace_section(text, SWEEP_BEGIN, SWEEP_END, sweep_tables(load_sweeps()))
    readme.write_text(text)
