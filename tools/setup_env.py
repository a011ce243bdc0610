"""Provide what tests, demo and benchmarks need: a ComfyUI checkout and a virtual environment.

ComfyUI comes from COMFYUI_PATH (used as is) or is cloned from COMFYUI_REPO at COMFYUI_REF into
the cache folder. The virtual environment (OPTIM_VENV, default in the cache folder) gets torch and
torchvision as a matching pair plus ComfyUI's requirements, torchaudio left out. Idempotent: a
stamp records what was installed, and a second run does nothing.

Usage: python3 tools/setup_env.py [--comfyui-optional] [--print-python]
  --comfyui-optional  when no ComfyUI can be had, warn and set up the environment for the unit
                      tests only (the ComfyUI-dependent tests then skip) instead of failing
  --print-python      only print the virtual environment's python; change nothing
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.comfy_env import (DEFAULT_COMFYUI_REPO, cached_checkout_dir, comfyui_ref,  # noqa: E402
                             find_comfyui, is_comfyui_checkout, venv_dir)

REACH_TIMEOUT_S = 50
# Blobs that some mirrors of ComfyUI lack; none of them is needed by this pack or its tests.
OPTIONAL_PATHS = ["comfy/text_encoders/llama_tokenizer/tokenizer.json"]
# torch/torchvision are installed as a pair; torchaudio only serves ComfyUI's audio nodes.
SKIPPED_REQUIREMENTS = {"torch", "torchvision", "torchaudio"}
EXTRA_REQUIREMENTS = ["requests", "pytest",  # requests: ComfyUI's frontend manager imports it
                      "diffusers", "DeepCache",  # test-only: the reference DeepCache runs on diffusers
                      # test-only: drives the browser test; its wheel carries its own driver, and the
                      # browser is the system's Chromium (apt-get install chromium), never downloaded
                      "playwright"]
# What the unit tests need when no ComfyUI (and so no requirements.txt) is available.
STANDALONE_REQUIREMENTS = ["torch", "numpy", "pillow", "psutil", "safetensors", "pytest"]


class NoComfyUI(Exception):
    pass


def log(msg: str) -> None:
    print(f"[setup] {msg}", flush=True)


def fail(msg: str) -> None:
    raise NoComfyUI(msg)


def git(*args: str, cwd: Path | None = None, timeout: float | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0")
    return subprocess.run(["git", *args], cwd=cwd, env=env, timeout=timeout,
                          capture_output=True, text=True)


def clone_comfyui(dest: Path) -> None:
    repo = os.environ.get("COMFYUI_REPO") or DEFAULT_COMFYUI_REPO
    ref = comfyui_ref()
    log(f"cloning ComfyUI from {repo} at {ref} into {dest}")
    try:
        probe = git("ls-remote", "--heads", repo, timeout=REACH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        fail(f"COMFYUI_REPO={repo} did not answer within {REACH_TIMEOUT_S}s. "
             "Set COMFYUI_PATH to an existing ComfyUI checkout, or COMFYUI_REPO to a reachable git source.")
    if probe.returncode != 0:
        fail(f"cannot reach COMFYUI_REPO={repo}: {probe.stderr.strip()[:300]}. "
             "Set COMFYUI_PATH to an existing ComfyUI checkout, or COMFYUI_REPO to a reachable git source.")
    tmp = dest.with_name(dest.name + ".partial")
    subprocess.run(["rm", "-rf", str(tmp)], check=True)
    done = git("clone", "-n", "-q", repo, str(tmp))
    if done.returncode != 0:
        fail(f"git clone of {repo} failed: {done.stderr.strip()[:300]}")
    checkout = git("checkout", "-q", ref, cwd=tmp)
    if checkout.returncode != 0:
        # A source missing some large blobs: leave those files out of the work tree.
        log("full checkout failed (" + checkout.stderr.strip().splitlines()[-1][:120]
            + "); retrying without optional large files")
        git("sparse-checkout", "set", "--no-cone", "/*", *[f"!/{p}" for p in OPTIONAL_PATHS], cwd=tmp)
        checkout = git("checkout", "-q", ref, cwd=tmp)
        if checkout.returncode != 0:
            fail(f"cannot check out {ref} from {repo}: {checkout.stderr.strip()[:300]}")
    tmp.rename(dest)


def ensure_comfyui() -> Path:
    root, why = find_comfyui()
    if root is not None:
        log(f"ComfyUI: {root}")
        return root
    if os.environ.get("COMFYUI_PATH"):
        fail(why)
    dest = cached_checkout_dir()
    dest.parent.mkdir(parents=True, exist_ok=True)
    clone_comfyui(dest)
    if not is_comfyui_checkout(dest):
        fail(f"{dest} does not look like ComfyUI after checkout")
    return dest


def requirements(comfy: Path) -> list[str]:
    reqs = []
    for line in (comfy / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name = line.split(";")[0]
        for sep in "<>=~![ ":
            name = name.split(sep)[0]
        if name.lower() not in SKIPPED_REQUIREMENTS:
            reqs.append(line)
    return ["torch", "torchvision", *reqs, *EXTRA_REQUIREMENTS]


def venv_python() -> Path:
    return venv_dir() / "bin" / "python"


def ensure_venv(comfy: Path | None) -> Path:
    reqs = requirements(comfy) if comfy else STANDALONE_REQUIREMENTS
    stamp_value = hashlib.sha256("\n".join(reqs).encode()).hexdigest()
    stamp = venv_dir() / ".optim-stamp"
    py = venv_python()
    # The stamp lists every requirement set installed so far, so switching between the set with
    # ComfyUI and the one without does not reinstall.
    installed = stamp.read_text().split() if stamp.exists() else []
    if py.exists() and stamp_value in installed:
        log(f"virtual environment up to date: {venv_dir()}")
        return py
    if not py.exists():
        log(f"creating virtual environment {venv_dir()}")
        venv.EnvBuilder(with_pip=True).create(venv_dir())
    log("installing torch + torchvision (a matching pair) and ComfyUI's requirements (no torchaudio)"
        if comfy else "installing what the unit tests need (no ComfyUI)")
    pip = [str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, *reqs], check=True)
    stamp.write_text("\n".join([*installed, stamp_value]) + "\n")
    return py


def main() -> int:
    if "--print-python" in sys.argv:
        print(venv_python())
        return 0
    try:
        comfy = ensure_comfyui()
    except NoComfyUI as e:
        if "--comfyui-optional" not in sys.argv:
            print(f"[setup] ERROR: {e}", file=sys.stderr, flush=True)
            return 2
        print(f"[setup] WARNING: {e}\n[setup] continuing without ComfyUI: its tests will skip",
              file=sys.stderr, flush=True)
        comfy = None
    ensure_venv(comfy)
    return 0


if __name__ == "__main__":
    sys.exit(main())
