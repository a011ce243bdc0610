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
    header = ("| technique | model (weights) | size | steps | device | speedup | model calls | "
              "latent PSNR dB | image PSNR dB | SSIM | peak mem MiB (base / opt) |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for r in sorted(results, key=lambda r: (r["technique"], r["family"], r["size"], r["device"])):
        b, o = r["baseline"], r["optimized"]
        device = r["versions"].get("gpu", r["device"]) if r["device"] == "cuda" else \
            f"cpu ({r['versions']['cpu_count']} cores)"
        rows.append(
            f"| {r['technique']} | {r['family']} ({r['weights']}) | {r['size']} | {r['steps']} | "
            f"{device} | {r['speedup']:.2f}x | {b['model_calls']} -> {o['model_calls']} | "
            f"{fmt_db(r['psnr_latent_db'])} | {fmt_db(r['psnr_image_db'])} | {r['ssim_image']:.4f} | "
            f"{b['peak_mem_mb']:.0f} / {o['peak_mem_mb']:.0f} |")
    return header + "\n" + "\n".join(rows)


def update_readme(readme: Path, table: str) -> None:
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{readme} has no {BEGIN} ... {END} section")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")
