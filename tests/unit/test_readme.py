"""The README points at things that exist: results files its figures come from, pictures,
example workflows and its own section anchors."""
import re

from bench import comfy_env

ROOT = comfy_env.REPO_ROOT
README = (ROOT / "README.md").read_text()
RESULTS = ROOT / "bench" / "results"


def github_anchor(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_every_results_file_named_exists():
    named = set(re.findall(r"`((?:bench/results/)?[\w./-]+\.json)`", README))
    results = {n for n in named if n.startswith("bench/results/") or re.search(r"-(cpu|cuda)\.json$", n)}
    assert results, "the README names no results file"
    missing = [n for n in results if not ((ROOT / n).exists() or (RESULTS / n).exists())]
    assert not missing, f"README names results files that are not under bench/results/: {missing}"


def test_every_picture_exists():
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README)
    assert "docs/frontend-badges.png" in pictures
    assert not [p for p in pictures if not (ROOT / p).exists()]


def test_every_workflow_listed_exists():
    table = README.split("## Example workflows", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\| `([\w-]+)` \|", table, flags=re.M)
    assert sorted(listed) == sorted(p.stem for p in (ROOT / "workflows").glob("*.json")), "list every workflow"
    for name in listed:
        assert (ROOT / "workflows" / f"{name}.json").exists(), name
        assert (ROOT / "workflows" / "api" / f"{name}.json").exists(), name


def test_internal_links_reach_a_heading():
    anchors = {github_anchor(h) for h in re.findall(r"^#+ (.+)$", README, flags=re.M)}
    links = re.findall(r"\]\(#([\w-]+)\)", README)
    assert links
    assert not [a for a in links if a not in anchors]
