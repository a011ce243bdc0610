"""Turn bench/results/*.json into the README's results tables."""
from __future__ import annotations

import json
from pathlib import Path

from bench.runner import RESULTS_DIR, fmt_db

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def load_results(folder: Path = RESULTS_DIR) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


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
        if "cross_attn_reused" in stats:
            total = stats["cross_attn_reused"] + stats["cross_attn_computed"]
            parts.append(f"{stats['cross_attn_reused']}/{total} cross-attn reused, "
                         f"{stats['uncond_passes_dropped']} uncond passes dropped")
    if not parts:
        b, o = result["baseline"]["model_calls"], result["optimized"]["model_calls"]
        parts.append(f"model calls {b} -> {o}")
    return "; ".join(parts)


def update_readme(readme: Path, table: str) -> None:
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{readme} has no {BEGIN} ... {END} section")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")
