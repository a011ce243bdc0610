"""The setup script: requirement filtering and a fast, clear failure when ComfyUI is unreachable."""
import os
import subprocess
import sys
import time

from bench import comfy_env

SETUP = comfy_env.REPO_ROOT / "tools" / "setup_env.py"
sys.path.insert(0, str(SETUP.parent))
import setup_env  # noqa: E402


def test_requirements_pair_torch_with_torchvision_and_drop_torchaudio(tmp_path):
    (tmp_path / "requirements.txt").write_text(
        "comfyui-frontend-package==1.27.10\ntorch\ntorchsde\ntorchvision\ntorchaudio\n"
        "numpy>=1.25.0\n\n#non essential dependencies:\nkornia>=0.7.1\n")
    reqs = setup_env.requirements(tmp_path)
    assert reqs[:2] == ["torch", "torchvision"]
    assert "torchaudio" not in reqs and reqs.count("torch") == 1 and reqs.count("torchvision") == 1
    assert {"torchsde", "numpy>=1.25.0", "kornia>=0.7.1", "requests", "pytest", "DeepCache", "playwright"} <= set(reqs)


def test_unreachable_repo_fails_fast_naming_both_variables(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_PATH", "COMFYUI_REF")}
    env.update(XDG_CACHE_HOME=str(tmp_path), COMFYUI_REPO=str(tmp_path / "no-such-repo"))
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, str(SETUP)], env=env, capture_output=True, text=True, timeout=90)
    assert time.monotonic() - t0 < 60
    assert done.returncode == 2
    assert "COMFYUI_PATH" in done.stderr and "COMFYUI_REPO" in done.stderr
    assert not (tmp_path / "comfyui-optim" / "venv").exists()


def test_bad_comfyui_path_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path))
    root, why = comfy_env.find_comfyui()
    assert root is None and "COMFYUI_PATH" in why and "not a ComfyUI checkout" in why


def test_cache_folder_follows_xdg_and_ref(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("COMFYUI_REF", "0123456789abcdef")
    assert comfy_env.cached_checkout_dir() == tmp_path / "comfyui-optim" / "ComfyUI-0123456789ab"
