"""Registry packaging: pyproject.toml has what the Comfy Registry reads, and its version is the
CHANGELOG's newest entry."""
import re

import pytest

from bench import comfy_env

ROOT = comfy_env.REPO_ROOT
tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python >= 3.11")
RAW = "https://raw.githubusercontent.com/comfyui-optim/comfyui-optim/main/"


@pytest.fixture(scope="module")
def project():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def changelog_versions() -> list[str]:
    return re.findall(r"^## (\d+\.\d+\.\d+)\b", (ROOT / "CHANGELOG.md").read_text(), flags=re.M)


def test_version_is_the_changelogs_newest_entry(project):
    versions = changelog_versions()
    assert versions, "CHANGELOG.md has no '## X.Y.Z' entry"
    assert project["project"]["version"] == versions[0], \
        f"pyproject.toml says {project['project']['version']}, CHANGELOG.md's newest entry is {versions[0]}"


def test_changelog_versions_only_go_up():
    key = [tuple(map(int, v.split("."))) for v in changelog_versions()]
    assert key == sorted(key, reverse=True) and len(set(key)) == len(key)


def test_project_fields_follow_the_registry_rules(project):
    p = project["project"]
    # node id: < 100 characters, alphanumerics and - _ . only, no two specials in a row, starts with a letter
    assert len(p["name"]) < 100 and re.fullmatch(r"[A-Za-z](?:[A-Za-z0-9]|[-_.](?=[A-Za-z0-9]))*", p["name"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", p["version"])
    assert p["description"] and p["urls"]["Repository"].startswith("https://")
    assert "Operating System :: OS Independent" in p["classifiers"]


def test_tool_comfy_has_publisher_name_icon_and_banner_that_exist_in_the_repo(project):
    comfy = project["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"]
    for key in ("Icon", "Banner"):
        assert comfy[key].startswith(RAW), comfy[key]
        assert (ROOT / comfy[key][len(RAW):]).is_file(), f"{key} points at a file the repo lacks"
    assert comfy["requires-comfyui"] == f">={comfy_env.MIN_COMFYUI_VERSION}"


def test_banner_has_the_registrys_21_by_9_shape(project):
    banner = ROOT / project["tool"]["comfy"]["Banner"][len(RAW):]
    width, height = int.from_bytes(banner.read_bytes()[16:20], "big"), int.from_bytes(banner.read_bytes()[20:24], "big")
    assert abs(width / height - 21 / 9) < 0.02
