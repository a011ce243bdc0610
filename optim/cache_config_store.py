"""Named DiT cache configurations as JSON files in one folder (ComfyUI's user directory in the
node; any folder in tests).

Names are plain file stems: letters, digits, space, dot, dash and underscore, no path separators,
no leading dot, so a name can never leave the folder. Saving over a configuration made for another
model family is refused unless the caller says to overwrite.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from .ditcache import DiTCacheConfig

SUBDIR = Path("comfyui-optim") / "dit-cache"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9 _.\-]{0,79}$")


def name_problem(name: str) -> str | None:
    if not isinstance(name, str) or not name.strip():
        return "the configuration name is empty"
    if "/" in name or "\\" in name or ".." in name or os.sep in name:
        return f"configuration name {name!r} must not contain path separators or '..'"
    if not _NAME.match(name) or name.endswith((" ", ".")):
        return (f"configuration name {name!r} may use letters, digits, space, '.', '-' and '_' "
                "(at most 80, not starting with '.' or ending with a space or '.')")
    return None


class ConfigStore:
    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def _path(self, name: str) -> Path:
        problem = name_problem(name)
        if problem:
            raise ValueError(problem)
        path = (self.folder / f"{name}.json").resolve()
        if path.parent != self.folder.resolve():
            raise ValueError(f"configuration name {name!r} leaves the configuration folder")
        return path

    def names(self) -> list[str]:
        if not self.folder.is_dir():
            return []
        return sorted(p.stem for p in self.folder.glob("*.json") if name_problem(p.stem) is None)

    def load(self, name: str) -> DiTCacheConfig:
        path = self._path(name)
        if not path.is_file():
            known = ", ".join(self.names()) or "none saved yet"
            raise ValueError(f"no saved DiT cache configuration named {name!r} (saved: {known})")
        return DiTCacheConfig.from_json(path.read_text())

    def save(self, name: str, config: DiTCacheConfig, overwrite: bool = False) -> tuple[Path, str | None]:
        """Write `config` as `name`; returns the path and a note when it replaced a file."""
        path = self._path(name)
        note = None
        if path.is_file():
            try:
                old_family = json.loads(path.read_text()).get("family")
            except (json.JSONDecodeError, AttributeError):
                old_family = None
            if old_family != config.family and not overwrite:
                raise ValueError(f"{name!r} already holds a configuration for a {old_family} model; "
                                 f"choose another name or set overwrite to replace it with this "
                                 f"{config.family} one")
            note = f"replaced the saved configuration {name!r} (was for {old_family})"
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")   # atomic: no half-written file
        with os.fdopen(fd, "w") as f:
            f.write(config.to_json())
        os.replace(tmp, path)
        return path, note
