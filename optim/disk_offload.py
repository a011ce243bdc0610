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


class _MappedViews:
    """Parameters whose storage is a view of a mapped file: `views` = [(parameter, view)]."""
    views: list[tuple[torch.nn.Parameter, torch.Tensor]]

    def in_use(self) -> bool:
        """Whether any parameter still rests on the file (ComfyUI may have loaded some to the GPU)."""
        return any(p.data.data_ptr() == v.data_ptr() for p, v in self.views)

    def _back_to_ram(self) -> None:
        """Copy every parameter still on the file back into RAM."""
        for p, v in self.views:
            if p.data.data_ptr() == v.data_ptr():
                p.data = v.clone()
        self.views = []


class DiskStore(_MappedViews):
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

    def release(self) -> None:
        """Copy every parameter still on the file back into RAM, then drop the folder."""
        self._back_to_ram()
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


# ---------------------------------------------------------------------------------------------
# Reading back from the model's own safetensors files (no copy written)

SOURCES_KEY = "comfyui-optim.source_files"
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def safetensors_header(path: Path) -> tuple[int, dict]:
    """(offset of the data section, header) of a safetensors file, read without loading it."""
    import json
    import struct
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return 8 + n, header


class FileBackedStore(_MappedViews):
    """Parameters whose bytes are exactly those of a tensor in the model's own safetensors file get
    a private (copy-on-write) mapping of that file as their storage: nothing is written, the kernel
    reads the pages back from the file when needed. A parameter whose content differs from the file
    (a LoRA baked in, another dtype, any edit) is not taken: it is listed in `rejected`.

    `params`: [(name, parameter, file path, tensor name in the file)]. The file is never written
    (the mapping is private) nor removed."""

    def __init__(self, params: list[tuple[str, torch.nn.Parameter, Path, str]]):
        self.views: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        self.rejected: list[str] = []
        self.nbytes = 0
        self.files: set[Path] = set()
        by_file: dict[Path, list] = {}
        for name, p, path, key in params:
            by_file.setdefault(Path(path), []).append((name, p, key))
        for path, entries in by_file.items():
            try:
                start, header = safetensors_header(path)
                buf = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c"))
            except (OSError, ValueError) as e:
                log.info("disk offload: cannot map %s (%s); its weights are copied instead", path, e)
                self.rejected += [name for name, _p, _k in entries]
                continue
            for name, p, key in entries:
                view = self._view(buf, start, header.get(key), p)
                if view is None or not torch.equal(p.data, view):
                    self.rejected.append(name)
                    continue
                p.data = view
                self.views.append((p, view))
                self.nbytes += p.nelement() * p.element_size()
                self.files.add(path)

    @staticmethod
    def _view(buf: torch.Tensor, start: int, info, p: torch.Tensor) -> torch.Tensor | None:
        if not isinstance(info, dict) or _ST_DTYPES.get(info.get("dtype")) != p.dtype \
                or list(info.get("shape", [])) != list(p.shape) or p.device.type != "cpu":
            return None
        begin, end = info["data_offsets"]
        if end - begin != p.nelement() * p.element_size() or (start + begin) % p.element_size():
            return None
        return buf[start + begin:start + end].view(p.dtype).view(p.shape)

    def release(self) -> None:
        """Copy every parameter still on the file back into RAM (the file itself stays)."""
        self._back_to_ram()
