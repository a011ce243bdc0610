"""Results files become the README's tables."""
import math

import pytest

from bench import report


def result(technique="noop", family="sd15", speedup=1.01, psnr=math.inf):
    return {"technique": technique, "family": family, "size": "bench", "steps": 20, "repeats": 3, "device": "cpu",
            "weights": "generated", "versions": {"cpu_count": 2},
            "baseline": {"model_calls": 20, "peak_mem_mb": 100.0},
            "optimized": {"model_calls": 20, "peak_mem_mb": 101.0},
            "speedup": speedup, "psnr_latent_db": psnr, "psnr_image_db": psnr, "ssim_image": 1.0}


def test_table_has_a_row_per_result_with_its_figures():
    table = report.markdown_tables([result(), result(family="flux", speedup=0.98, psnr=31.234)])
    lines = table.splitlines()
    assert len(lines) == 4
    assert "| noop | flux (generated) | bench | 20 (3) | cpu (2 cores) | 0.98x | - | model calls 20 -> 20 | 31.23 |" in table
    assert "| inf | inf | 1.0000 | 100 / 101 |" in lines[3]


def test_technique_stats_and_flops_are_summarised():
    r = result(technique="tgate_deepcache3", speedup=3.4)
    r["flops_ratio"] = 3.66
    r["technique_stats"] = {
        "comfyui-optim.deepcache": {"full_calls": 7, "shallow_calls": 13},
        "comfyui-optim.tgate": {"cross_attn_computed": 53, "cross_attn_reused": 72, "uncond_passes_dropped": 12}}
    row = report.markdown_tables([r]).splitlines()[2]
    assert ("| 3.40x | 3.66x fewer | 13/20 UNet calls shallow; 72/125 cross-attn reused, "
            "12 uncond passes dropped |") in row


def test_update_readme_replaces_only_the_marked_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.BEGIN}\nold\n{report.END}\noutro\n")
    report.update_readme(readme, "NEW TABLE")
    assert readme.read_text() == f"intro\n{report.BEGIN}\nNEW TABLE\n{report.END}\noutro\n"
    (tmp_path / "bad.md").write_text("no markers")
    with pytest.raises(ValueError, match="no <!-- bench:begin -->"):
        report.update_readme(tmp_path / "bad.md", "x")


def test_readme_family_table_is_current():
    """The README's DiT family table is generated from optim.dit_layout (`python -m bench report --readme`)."""
    from bench.comfy_env import REPO_ROOT
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split(report.FAMILIES_BEGIN, 1)[1].split(report.FAMILIES_END, 1)[0].strip()
    assert section == report.dit_families_table(), "stale: run python -m bench report --readme README.md"
    from optim import dit_layout
    assert len(section.splitlines()) == 2 + len(dit_layout.FAMILIES)


def test_sweep_table_lists_arms_and_the_comparison():
    arm = lambda kind, label, speed, db: {"kind": kind, "label": label, "speedup": speed, "psnr_latent_db": db,
                                          "psnr_image_db": db - 5, "ssim_image": 0.9, "work_speedup": speed + 0.1}
    sweep = {"family": "flux", "size": "bench", "blocks": 12, "steps": 20, "cfg": 1.0, "resolution": [256, 256],
             "cases": [["a", 1], ["b", 2]], "device": "cpu", "weights": "generated", "versions": {"cpu_count": 2},
             "baseline": {"seconds": 40.0},
             "arms": [arm("ours: searched", "target 1.5x", 1.52, 33.0), arm("built-in: LazyCache", "0.2", 1.4, 29.5)],
             "comparison": [{"builtin": "built-in: LazyCache 0.2", "speedup": 1.4, "psnr_latent_db": 29.5,
                             "ours": "ours: searched target 1.5x", "ours_speedup": 1.52,
                             "ours_psnr_latent_db": 33.0, "margin_db": 3.5}]}
    sweep["comparison_work"] = [{"builtin": "built-in: LazyCache 0.2", "speedup": 1.5, "psnr_latent_db": 29.5,
                                 "ours": None}]
    table = report.sweep_tables([sweep])
    assert "| ours: searched | target 1.5x | 1.52x | 1.62x | 33.00 | 28.00 | 0.9000 |" in table
    assert "| built-in: LazyCache 0.2 | 1.40x, 29.50 dB | ours: searched target 1.5x: 1.52x, 33.00 dB | +3.50 dB |" in table
    assert "| built-in arm | its work speedup, PSNR | ours at >= that work speedup | margin |" in table
    assert "| built-in: LazyCache 0.2 | 1.50x, 29.50 dB | none as fast | - |" in table
    assert report.sweep_tables([]).startswith("_No sweep yet")


def test_dit_cache_stats_are_summarised():
    r = result(technique="ditcache", family="flux", speedup=1.66)
    r["technique_stats"] = {"comfyui-optim.ditcache": {"calls": 20, "calls_cached": 9, "cached_blocks": 10,
                                                       "blocks_per_call": 12, "blocks_skipped": 90}}
    assert "| 9/20 calls skipped 10 of 12 blocks |" in report.markdown_tables([r])


def test_sweep_comparison_by_work_is_exact_and_by_wall_allows_timing_noise():
    from bench.ditcache_sweep import compare
    row = lambda kind, speed, work, db: {"kind": kind, "label": "x", "speedup": speed, "work_speedup": work,
                                        "psnr_latent_db": db}
    rows = [row("ours: fixed", 1.58, 1.6, 35.0), row("built-in: LazyCache", 1.6, 1.67, 33.0)]
    assert compare(rows)[0]["margin_db"] == 2.0            # 1.58 is within 3% of 1.6 by the clock
    assert compare(rows, "work_speedup")[0]["ours"] is None  # 1.6 < 1.67 by work: no comparison
