"""A real ComfyUI server (`main.py --cpu`) on a free loopback port, with this pack installed the way
a user installs it (linked into custom_nodes/), and a small client for its HTTP API."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from bench.comfy_env import PACK_NAME, REPO_ROOT, find_comfyui


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """Context manager. `base_dir` becomes ComfyUI's --base-directory: custom_nodes/, models/,
    output/ and user/ live there. `extra_custom_nodes` are more folders to link into custom_nodes/."""

    def __init__(self, base_dir: Path, extra_custom_nodes: tuple[Path, ...] = (),
                 python: str = sys.executable, start_timeout_s: float = 180, device: str = "cpu"):
        root, why = find_comfyui()
        if root is None:
            raise RuntimeError(why)
        self.root, self.base_dir, self.python = root, Path(base_dir), python
        self.extra_custom_nodes, self.start_timeout_s, self.device = extra_custom_nodes, start_timeout_s, device
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base_dir / "comfyui.log"
        self.client_id = uuid.uuid4().hex
        self.proc: subprocess.Popen | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def _install_pack(self) -> None:
        custom = self.base_dir / "custom_nodes"
        custom.mkdir(parents=True, exist_ok=True)
        for src, name in [(REPO_ROOT, PACK_NAME), *[(p, p.name) for p in self.extra_custom_nodes]]:
            link = custom / name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(Path(src).resolve(), target_is_directory=True)

    def start(self) -> "ComfyServer":
        self._install_pack()
        cmd = [self.python, "main.py", "--base-directory", str(self.base_dir), "--listen", "127.0.0.1",
               "--port", str(self.port), "--disable-api-nodes", "--use-pytorch-cross-attention",
               "--disable-auto-launch"]
        if self.device == "cpu":
            cmd.append("--cpu")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=self.root, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} while starting:\n{self.log()[-3000:]}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {self.start_timeout_s}s:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- HTTP API ---------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path: str, payload: dict, timeout: float = 30) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = r.read()
                return r.status, (json.loads(body) if body else {})
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def queue(self, prompt: dict) -> tuple[int, dict]:
        """POST /prompt; returns (status, body): 200 with prompt_id, or 400 with node_errors."""
        return self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})

    def wait(self, prompt_id: str, timeout_s: float = 600) -> dict:
        """Poll /history until the prompt finished; returns its history entry."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                entry = hist[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log()[-3000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout_s}s")

    def run(self, prompt: dict, timeout_s: float = 600) -> dict:
        status, body = self.queue(prompt)
        if status != 200:
            raise RuntimeError(f"prompt rejected ({status}): {json.dumps(body)[:2000]}")
        return self.wait(body["prompt_id"], timeout_s)

    def output_images(self, entry: dict, node_id: str) -> list[Path]:
        images = entry["outputs"][node_id]["images"]
        return [self.base_dir / "output" / i.get("subfolder", "") / i["filename"] for i in images]


def read_images(paths) -> "numpy.ndarray":
    """The saved images of a prompt as one uint8 array [N, H, W, C]."""
    import numpy as np
    from PIL import Image
    return np.stack([np.asarray(Image.open(p)) for p in paths])


def execution_error(entry: dict) -> dict | None:
    """The `execution_error` message of a finished prompt, if it failed."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return data
    return None


def collect_events(server: ComfyServer, prompt: dict, event: str, timeout_s: float = 300) -> tuple[dict, list]:
    """Run `prompt` while listening on the server's websocket as this client; returns the history
    entry and the data of every `event` message received during the run."""
    import asyncio

    import aiohttp

    async def listen():
        got = []
        url = f"{server.url.replace('http', 'ws')}/ws?clientId={server.client_id}"
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(url) as ws:
                status, body = server.queue(prompt)
                if status != 200:
                    raise RuntimeError(f"prompt rejected ({status}): {body}")
                prompt_id = body["prompt_id"]

                async def until_done():
                    async for msg in ws:
                        if msg.type != aiohttp.WSMsgType.TEXT:
                            continue
                        data = json.loads(msg.data)
                        if data.get("type") == event:
                            got.append(data["data"])
                        if data.get("type") == "executing" and data["data"].get("node") is None \
                                and data["data"].get("prompt_id") == prompt_id:
                            return

                await asyncio.wait_for(until_done(), timeout_s)
                return prompt_id, got

    prompt_id, got = asyncio.run(listen())
    return server.wait(prompt_id), got
