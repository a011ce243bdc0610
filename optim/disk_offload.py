"""Disk offload: the offloaded weights of a model live in a memory-mapped file instead of RAM.

The file is written once per set of weights, in a folder under ComfyUI's temp directory named by
the content hash of what it holds (names, dtypes, shapes and bytes), so two models can never read
each other's weights: different weights give a different folder, and identical weights are
identical bytes. The folder path is made here from that hash only; no prompt input reaches it.

Each parameter keeps its identity; only its storage is swapped (`param.data`) for a view of the
private (copy-on-write) mapping, whose clean pages the kernel can drop under memory pressure and
read back from the file on the next use. When ComfyUI unloads the model, `release` copies the
weights back into RAM (where plain ComfyUI keeps an unloaded model) and removes the folder.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import torch

FOLDER = "comfyui-optim-offload"
ALIGN = 64
log = logging.getLogger("comfyui-optim")

_refs: dict[Path, int] = {}     # folder -> stores using it (identical content shares a folder)
_lock = threading.Lock()
_counter = itertools.count()


def base_dir() -> Path:
    import folder_paths
    return Path(folder_paths.get_temp_directory()) / FOLDER


class DiskStore:
    """One file holding a set of parameters, mapped back in place of their RAM storage."""

    def __init__(self, params: list[tuple[str, torch.nn.Parameter]], base: Path | None = None):
        self.base = Path(base) if base is not None else base_dir()
        self.base.mkdir(parents=True, exist_ok=True)
        self.params = params
        self.nbytes = 0
        self.folder = self._write()
        self.views = self._map()

    def _layout(self):
        offset, out = 0, []
        for name, p in self.params:
            n = p.nelement() * p.element_size()
            out.append((name, p, offset, n))
            offset += (n + ALIGN - 1) // ALIGN * ALIGN
        return out, offset

    def _write(self) -> Path:
        layout, total = self._layout()
        h = hashlib.blake2b(digest_size=20)
        tmp = self.base / f".writing-{os.getpid()}-{next(_counter)}"
        with open(tmp, "wb") as f:
            for name, p, offset, n in layout:
                h.update(f"{name}|{p.dtype}|{tuple(p.shape)}|{offset};".encode())
                data = p.data.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy()
                h.update(data)
                f.seek(offset)
                f.write(data.tobytes())
            f.truncate(total)
        self.nbytes = total
        folder = self.base / h.hexdigest()
        with _lock:
            if folder.exists() and (folder / "weights.bin").exists():
                tmp.unlink()          # the same content is already on disk
            else:
                folder.mkdir(exist_ok=True)
                os.replace(tmp, folder / "weights.bin")
            _refs[folder] = _refs.get(folder, 0) + 1
        return folder

    def _map(self) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
        layout, total = self._layout()
        if total == 0:
            return []
        buf = torch.from_numpy(np.memmap(self.folder / "weights.bin", dtype=np.uint8, mode="c", shape=(total,)))
        views = []
        for _name, p, offset, n in layout:
            v = buf[offset:offset + n].view(p.dtype).view(p.shape)
            p.data = v
            views.append((p, v))
        return views

    def in_use(self) -> bool:
        """Whether any parameter still rests on this file (ComfyUI may have loaded some to the GPU)."""
        return any(p.data.data_ptr() == v.data_ptr() for p, v in self.views)

    def release(self) -> None:
        """Copy every parameter still on the file back into RAM, then drop the folder."""
        for p, v in self.views:
            if p.data.data_ptr() == v.data_ptr():
                p.data = v.clone()
        self.views = []
        with _lock:
            left = _refs.get(self.folder, 1) - 1
            if left > 0:
                _refs[self.folder] = left
                return
            _refs.pop(self.folder, None)
        shutil.rmtree(self.folder, ignore_errors=True)


def pointers(stores: list[DiskStore]) -> set[int]:
    """Storage pointers of every mapped view: a parameter whose data has one rests on disk."""
    return {v.data_ptr() for s in stores for _, v in s.views}


def release_all(stores: list[DiskStore]) -> None:
    while stores:
        stores.pop().release()
