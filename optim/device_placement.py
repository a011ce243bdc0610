"""Device placement for ComfyUI models: the diffusion model's blocks run on several devices (GPUs,
the CPU), following diffusers' `device_map` ("balanced", or a map of module prefix -> device) and
`max_memory` per device.

How it lives inside ComfyUI (official extension points only):
- The unit of placement is a module the model *calls* (a "unit"): a Flux/Wan/... block, the
  children of a UNet's TimestepEmbedSequential containers (the containers themselves are iterated,
  never called, so a hook on them would never fire), and the other top-level layers (embedders,
  final layers). Everything a unit computes happens inside its own forward, so it can run on one
  device.
- ComfyUI loads the model onto its load device as usual (and keeps its accounting); an injection
  (which runs after every load and whose eject runs before ComfyUI moves or unpatches weights)
  then moves the weights of each unit mapped elsewhere to that device, and moves them back on
  eject. So ComfyUI's loads cannot collapse the model onto one device: every load is followed by
  the placement, and ComfyUI always finds its weights where it left them. Layers ComfyUI left
  off its device (low-VRAM layers, cast per call to the device of their input) move with their
  unit too: on the unit's device ComfyUI's cast finds them in place and only applies LoRA patches,
  so a model larger than the first GPU still runs from the second GPU's memory rather than being
  streamed from the CPU.
- Forward pre-hooks move a unit's tensor inputs to its device; forward hooks move its outputs back
  to the main (load) device. The model's own code between units (residual sums, the UNet's skip
  concatenation, ControlNet additions, other packs' patches) therefore only ever sees tensors on
  the main device. The price is two activation copies per placed unit and call, small next to
  the weights of a block.

Planning `balanced`: with accelerate installed, its `get_balanced_memory` and
`infer_auto_device_map` plan (every unit class unsplittable), as diffusers does. accelerate is not
a dependency of this pack (ComfyUI does not install it); without it `plan_balanced` follows the same
rule: units in execution order, in contiguous runs of about equal size over the GPUs, each capped by
`max_memory`, the rest on the CPU. (A unit on "cpu" computes on the CPU here; accelerate's own
hooks would stream its weights to the GPU instead: OptimGroupOffload's job in this pack.)
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from typing import Callable

import torch


KEY = "comfyui-optim.device_placement"
STRATEGIES = ("balanced", "custom", "none")
log = logging.getLogger("comfyui-optim")


class PlacementError(ValueError):
    """A placement input that cannot be honoured (bad JSON, unknown device or module, ...)."""


# ---------------------------------------------------------------------------------------------
# Units: the modules the model calls, in execution order

@dataclass
class Unit:
    path: str                 # from the diffusion model
    module: torch.nn.Module

    @property
    def nbytes(self) -> int:
        return sum(t.nelement() * t.element_size() for t in
                   list(self.module.parameters()) + list(self.module.buffers()))


def _is_iterated_container(m: torch.nn.Module) -> bool:
    # a UNet's TimestepEmbedSequential: the UNet iterates its children, it never calls it
    return type(m).__name__ == "TimestepEmbedSequential"


def _has_params(m: torch.nn.Module) -> bool:
    return any(True for _ in m.parameters()) or any(True for _ in m.buffers())


def units_of(diffusion_model: torch.nn.Module) -> list[Unit]:
    """The placeable units in execution order (registration order matches it for every family
    ComfyUI ships: embedders, blocks, final layers)."""
    out: list[Unit] = []

    def add(path: str, m: torch.nn.Module):
        if not _has_params(m):
            return
        if isinstance(m, torch.nn.ModuleList) or _is_iterated_container(m):
            for name, child in m._modules.items():
                if child is not None:
                    add(f"{path}.{name}", child)
        else:
            out.append(Unit(path, m))

    for name, child in diffusion_model._modules.items():
        if child is not None:
            add(name, child)
    return out


def fixed_bytes(diffusion_model: torch.nn.Module) -> int:
    """Parameters and buffers held by the diffusion model itself (not by a unit): they stay on the
    main device."""
    return sum(t.nelement() * t.element_size() for t in
               list(diffusion_model._parameters.values()) + list(diffusion_model._buffers.values())
               if t is not None)


# ---------------------------------------------------------------------------------------------
# Inputs: devices, memory sizes, maps

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
          "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40,
          "K": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9, "T": 10 ** 12}


def parse_size(value, what: str = "size") -> int:
    """Bytes from an int or a string such as "2GB", "512MiB", "1.5 GB" (accelerate's spelling)."""
    if isinstance(value, bool):
        raise PlacementError(f"{what}: expected a size such as \"10GB\", got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise PlacementError(f"{what} must not be negative, got {value}")
        return int(value)
    if isinstance(value, str):
        s = value.strip()
        if s.startswith("-"):
            raise PlacementError(f"{what} must not be negative, got {value!r}")
        m = _SIZE.match(s)
        if m and m.group(2).upper() in _UNITS:
            return int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    raise PlacementError(f"{what}: expected a size such as \"10GB\" or \"512MiB\", got {value!r}")


def available_devices() -> list[str]:
    """GPUs present, then the CPU."""
    out = []
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        out += [f"xpu:{i}" for i in range(xpu.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        out.append("mps")
    return out + ["cpu"]


def normalize_device(value, available: list[str]) -> str:
    """"cpu", "cuda:1", 1 (a GPU index, as diffusers writes it) or "cuda" (GPU 0) -> its name in
    `available`, or a PlacementError naming what is available."""
    if isinstance(value, bool):
        raise PlacementError(f"unknown device {value!r}; available: {', '.join(available)}")
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        name = f"cuda:{int(value)}"
    elif isinstance(value, str):
        name = value.strip().lower()
        if name in ("cuda", "xpu"):
            name += ":0"
        if name == "disk":
            raise PlacementError("device 'disk' is not a placement device here: use OptimGroupOffload "
                                 "with offload_to_disk for weights on disk")
    else:
        raise PlacementError(f"unknown device {value!r}; available: {', '.join(available)}")
    if name not in available:
        raise PlacementError(f"unknown or unavailable device {value!r}; available: {', '.join(available)}")
    return name


def _load_json_object(text: str, what: str) -> dict:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise PlacementError(f"{what}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(obj, dict):
        raise PlacementError(f"{what}: expected a JSON object, got {type(obj).__name__}")
    return obj


def parse_map_text(text: str) -> dict:
    """A device map as a JSON object {"prefix": device} or as lines "prefix: device" /
    "prefix = device" (# starts a comment). Empty text: {}."""
    s = text.strip()
    if not s:
        return {}
    if s.startswith(("{", "[")):
        return _load_json_object(s, "device_map")
    out = {}
    for n, line in enumerate(s.splitlines(), 1):
        line = line.split("#", 1)[0].strip().rstrip(",")
        if not line:
            continue
        m = re.match(r"^([^:=]+?)\s*[:=]\s*(.+)$", line)
        if not m:
            raise PlacementError(f"device_map line {n}: expected 'module.prefix: device', got {line!r}")
        key = m.group(1).strip().strip("\"'")
        if key in out:
            raise PlacementError(f"device_map: {key!r} is given twice")
        out[key] = m.group(2).strip().strip("\"'")
    return out


def parse_max_memory(text: str, available: list[str]) -> dict[str, int]:
    """{"0": "10GB", "cpu": "30GB"} (JSON) or lines "cuda:0: 10GB" -> {device: bytes}."""
    raw = parse_map_text(text) if text.strip() else {}
    out = {}
    for dev, size in raw.items():
        name = normalize_device(dev, available)
        if name in out:
            raise PlacementError(f"max_memory: device {name} is given twice")
        out[name] = parse_size(size, f"max_memory[{dev}]")
    return out


# ---------------------------------------------------------------------------------------------
# Plans

@dataclass
class Plan:
    main_device: str
    devices: dict[str, str]               # unit path -> device, every unit, execution order
    nbytes: dict[str, int] = field(default_factory=dict)   # unit path -> bytes
    explicit: frozenset = frozenset()    # units a custom map named (hooked even on the main device)
    planner: str = "custom"              # "custom", "balanced" (ours) or "accelerate"

    def bytes_per_device(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for path, dev in self.devices.items():
            out[dev] = out.get(dev, 0) + self.nbytes.get(path, 0)
        return out

    def placed(self) -> dict[str, str]:
        """Units away from the main device."""
        return {p: d for p, d in self.devices.items() if d != self.main_device}

    def hooked(self) -> dict[str, str]:
        """Units that get hooks: those away from the main device and those a custom map names
        (on the main device their moves are no-ops; a map that names the main device still runs
        the whole path, which is how a single-device machine tests it)."""
        return {p: d for p, d in self.devices.items() if d != self.main_device or p in self.explicit}

    def compact(self) -> dict[str, str]:
        """The map with runs of one list's units on one device written as the list's prefix where
        the whole list is on that device (as diffusers' hf_device_map does)."""
        groups: dict[str, set] = {}
        for path, dev in self.devices.items():
            parent = path.rsplit(".", 1)[0] if "." in path else path
            groups.setdefault(parent, set()).add(dev)
        out: dict[str, str] = {}
        for path, dev in self.devices.items():
            parent = path.rsplit(".", 1)[0] if "." in path else path
            if parent != path and len(groups[parent]) == 1 and parent.split(".")[0] == path.split(".")[0]:
                out[parent] = dev
            else:
                out[path] = dev
        return out

    def describe(self) -> str:
        return json.dumps({"main_device": self.main_device, "planner": self.planner,
                           "bytes_per_device": self.bytes_per_device(),
                           "device_map": self.compact()}, indent=1)


def plan_custom(units: list[Unit], mapping: dict, main_device: str, available: list[str],
                max_memory: dict[str, int] | None = None) -> Plan:
    """Each unit takes the device of the longest prefix of the map that covers it; units no prefix
    covers stay on the main device. A prefix must name a unit or a group of units: one naming a
    part of a unit, or nothing at all, is an error (the unit computes as a whole on one device)."""
    paths = [u.path for u in units]
    resolved: dict[str, str] = {}
    for prefix, dev in mapping.items():
        if not isinstance(prefix, str) or not prefix.strip():
            raise PlacementError(f"device_map: empty module prefix {prefix!r}")
        prefix = prefix.strip()
        covers = [p for p in paths if p == prefix or p.startswith(prefix + ".")]
        if not covers:
            inside = [p for p in paths if prefix.startswith(p + ".")]
            if inside:
                raise PlacementError(f"device_map: {prefix!r} is a part of {inside[0]!r}, which runs as a "
                                     f"whole on one device; map {inside[0]!r} instead")
            near = [p for p in paths if p.split(".")[0] == prefix.split(".")[0]][:3] or paths[:3]
            raise PlacementError(f"device_map: unknown module prefix {prefix!r} (units are e.g. "
                                 f"{', '.join(near)})")
        resolved[prefix] = normalize_device(dev, available)
    devices = {}
    explicit = set()
    for p in paths:
        best = max((k for k in resolved if p == k or p.startswith(k + ".")), key=len, default=None)
        devices[p] = resolved[best] if best is not None else main_device
        if best is not None:
            explicit.add(p)
    plan = Plan(main_device, devices, {u.path: u.nbytes for u in units}, frozenset(explicit))
    if max_memory:
        for dev, used in plan.bytes_per_device().items():
            if dev in max_memory and used > max_memory[dev]:
                raise PlacementError(f"device_map puts {used / 1e9:.3f} GB of weights on {dev}, more than "
                                     f"its max_memory of {max_memory[dev] / 1e9:.3f} GB")
    return plan


def default_capacity(device: str) -> int | None:
    """Free memory of a GPU now (accelerate's default); None (no limit) for the CPU."""
    if device.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free * 0.9)
    return None


def plan_balanced(units: list[Unit], main_device: str, available: list[str],
                  max_memory: dict[str, int] | None = None,
                  capacity: Callable[[str], int | None] = default_capacity, extra_bytes: int = 0) -> Plan:
    """diffusers' `balanced`: units in execution order in contiguous runs of about equal size over
    the accelerators (each capped by max_memory, else by its free memory), what does not fit on
    the CPU. With max_memory given, only the devices it names are used (as in diffusers).
    `extra_bytes` (weights the diffusion model holds itself) count against the main device."""
    sizes = [u.nbytes for u in units]
    total = sum(sizes) + extra_bytes
    pool = [d for d in available if (not max_memory or d in max_memory)]
    gpus = [d for d in pool if d != "cpu"]
    cap = {d: (max_memory[d] if max_memory and d in max_memory else capacity(d)) for d in pool}
    used = {d: (extra_bytes if d == main_device else 0) for d in pool}
    devices: dict[str, str] = {}
    share = -(-total // len(gpus)) if gpus else 0
    gi = 0
    for u, size in zip(units, sizes):
        placed = None
        while gi < len(gpus):
            d = gpus[gi]
            limit = cap[d] if gi == len(gpus) - 1 else min(c for c in (cap[d], share) if c is not None)
            if limit is None or used[d] + size <= limit:
                placed = d
                break
            if used[d] == 0 and (cap[d] is None or size <= cap[d]):
                placed = d        # a unit larger than the share still goes somewhere: alone
                break
            gi += 1
        if placed is None:
            if "cpu" in pool and (cap["cpu"] is None or used["cpu"] + size <= cap["cpu"]):
                placed = "cpu"
            else:
                need = sum(sizes) + extra_bytes
                raise PlacementError(f"the model ({need / 1e9:.3f} GB) does not fit the max_memory given "
                                     f"({', '.join(f'{d}: {cap[d] / 1e9:.3f} GB' for d in pool if cap[d] is not None)})")
        devices[u.path] = placed
        used[placed] += size
    return Plan(main_device, devices, {u.path: u.nbytes for u in units}, planner="balanced")


def accelerate_available() -> bool:
    try:
        import accelerate  # noqa: F401
    except ImportError:
        return False
    return True


def plan_accelerate(diffusion_model: torch.nn.Module, units: list[Unit], main_device: str, available: list[str],
                    max_memory: dict[str, int] | None = None,
                    capacity: Callable[[str], int | None] = default_capacity) -> Plan | None:
    """The same `balanced` strategy planned by accelerate (`get_balanced_memory` then
    `infer_auto_device_map`, with every unit class unsplittable), as diffusers does. None where
    accelerate has nothing to add: no accelerate, no CUDA device in the pool, or devices it does
    not name the way it expects (then `plan_balanced` plans)."""
    if not accelerate_available():
        return None
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory
    pool = [d for d in available if (not max_memory or d in max_memory)]
    if not any(d.startswith("cuda:") for d in pool) or any(d != "cpu" and not d.startswith("cuda:") for d in pool):
        return None
    key = {d: (int(d.split(":")[1]) if d.startswith("cuda:") else d) for d in pool}
    caps = {}
    for d in pool:
        c = max_memory[d] if max_memory and d in max_memory else capacity(d)
        caps[key[d]] = c if c is not None else 2 ** 62
    classes = sorted({type(u.module).__name__ for u in units})
    balanced = get_balanced_memory(diffusion_model, max_memory=caps, no_split_module_classes=classes, low_zero=False)
    amap = infer_auto_device_map(diffusion_model, max_memory=balanced, no_split_module_classes=classes)
    name = {v: k for k, v in key.items()}
    paths = [u.path for u in units]
    devices = {}
    for prefix, dev in amap.items():
        if dev not in name:       # "disk": it does not fit the devices given
            total = sum(u.nbytes for u in units)
            raise PlacementError(f"the model ({total / 1e9:.3f} GB) does not fit the max_memory given")
        for p in paths:
            if prefix == "" or p == prefix or p.startswith(prefix + "."):
                devices[p] = name[dev]
    # parameters the model holds itself are not units: they stay on the main device
    devices = {p: devices.get(p, main_device) for p in paths}
    return Plan(main_device, devices, {u.path: u.nbytes for u in units}, planner="accelerate")


def make_plan(diffusion_model: torch.nn.Module, strategy: str, device_map_text: str, max_memory_text: str,
              main_device: str, available: list[str] | None = None,
              capacity: Callable[[str], int | None] = default_capacity) -> Plan | None:
    """Validate the node's inputs against this model and plan; None for strategy "none"."""
    if strategy not in STRATEGIES:
        raise PlacementError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    available = list(available) if available is not None else available_devices()
    main = str(torch.device(main_device)) if not isinstance(main_device, str) else main_device
    if main == "cuda":
        main = "cuda:0"
    if main not in available:
        available.append(main)
    mapping = parse_map_text(device_map_text)
    max_memory = parse_max_memory(max_memory_text, available)
    if strategy == "none":
        return None
    units = units_of(diffusion_model)
    if not units:
        raise PlacementError(f"{type(diffusion_model).__name__} has no placeable layers")
    if strategy == "custom":
        if not mapping:
            raise PlacementError("strategy 'custom' needs a device_map, e.g. {\"output_blocks\": \"cpu\"}")
        return plan_custom(units, mapping, main, available, max_memory)
    if mapping:
        raise PlacementError("device_map is only read with strategy 'custom' (clear it, or choose 'custom')")
    planned = plan_accelerate(diffusion_model, units, main, available, max_memory, capacity)
    if planned is not None:
        return planned
    return plan_balanced(units, main, available, max_memory, capacity, fixed_bytes(diffusion_model))


# ---------------------------------------------------------------------------------------------
# Running a plan: weights moved after each load, activations moved at unit boundaries

def _to(t: torch.Tensor, device) -> torch.Tensor:
    return t.to(device, non_blocking=t.device.type == "cpu" and t.is_pinned())


def move_tree(obj, device, transfer: Callable = _to):
    """Tensors in obj (itself, or inside tuples and lists) moved; anything else (dicts such as
    transformer_options, named tuples) as is."""
    if isinstance(obj, torch.Tensor):
        return transfer(obj, device)
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(move_tree(o, device, transfer) for o in obj)
    if isinstance(obj, list):
        return [move_tree(o, device, transfer) for o in obj]
    return obj


@dataclass
class PlacementStats:
    moved_bytes: int = 0          # weights moved to other devices by the last injection
    units_placed: int = 0
    installs: int = 0             # injections so far (ComfyUI loads the model)


class DevicePlacement:
    """One plan on one patcher chain. `transfer(tensor, device)` moves a tensor; tests substitute a
    fake (e.g. a dtype standing in for a second device)."""

    def __init__(self, plan: Plan, transfer: Callable = _to, on_run_end: Callable | None = None):
        self.plan = plan
        self.transfer = transfer
        self.on_run_end = on_run_end
        self.moved: list[tuple[torch.nn.Module, str, str, object]] = []   # (module, kind, name, home)
        self.handles: list = []
        self.stats = PlacementStats()

    # -- injection
    def inject(self, patcher) -> None:
        self.eject(patcher)
        dm = patcher.model.diffusion_model
        main = self.plan.main_device
        units = {u.path: u for u in units_of(dm)}
        moved = 0
        for path, dev in self.plan.hooked().items():
            unit = units.get(path)
            if unit is None:
                continue        # the model changed under the plan: leave it where ComfyUI put it
            for m in unit.module.modules():
                for name, p in m._parameters.items():
                    if p is not None:
                        self.moved.append((m, "param", name, p.device))
                        moved += p.nelement() * p.element_size()
                        p.data = self.transfer(p.data, dev)
                for name, b in m._buffers.items():
                    if b is not None:
                        self.moved.append((m, "buffer", name, b.device))
                        moved += b.nelement() * b.element_size()
                        m._buffers[name] = self.transfer(b, dev)
            self.handles.append(unit.module.register_forward_pre_hook(self._inputs_to(dev), with_kwargs=True))
            self.handles.append(unit.module.register_forward_hook(self._outputs_to(main)))
        # whatever the last unit was, the model's result is on the main device, as ComfyUI expects
        self.handles.append(dm.register_forward_hook(self._outputs_to(main)))
        self.stats.moved_bytes = moved
        self.stats.units_placed = len(self.plan.placed())
        self.stats.installs += 1
        per = self.plan.bytes_per_device()
        log.info("Device placement: %d units hooked, %d away from %s; weights per device: %s",
                 len(self.plan.hooked()), self.stats.units_placed, main,
                 ", ".join(f"{d} {b / 1e9:.3f} GB" for d, b in per.items()))

    def eject(self, patcher) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        # back to where ComfyUI left each weight (it may since have replaced a Parameter, e.g. for
        # a LoRA: whatever is there now goes back)
        for m, kind, name, home in reversed(self.moved):
            if kind == "param":
                p = m._parameters.get(name)
                if p is not None:
                    p.data = self.transfer(p.data, home)
            else:
                b = m._buffers.get(name)
                if b is not None:
                    m._buffers[name] = self.transfer(b, home)
        self.moved.clear()

    def run_stats(self) -> dict:
        """What a sampling run ran where: weights per device (bytes), units placed away from the
        load device, and the bytes the last load moved there."""
        return {"devices": {str(d): b for d, b in self.plan.bytes_per_device().items()},
                "units_placed": self.stats.units_placed, "bytes_moved": self.stats.moved_bytes,
                "installs": self.stats.installs}

    def outer_sample(self, executor, *args, **kwargs):
        try:
            return executor(*args, **kwargs)
        finally:
            if self.on_run_end is not None:
                self.on_run_end(self.run_stats())

    # -- hooks
    def _inputs_to(self, device):
        def hook(_m, args, kwargs):
            return move_tree(args, device, self.transfer), {k: move_tree(v, device, self.transfer)
                                                             for k, v in kwargs.items()}
        return hook

    def _outputs_to(self, device):
        def hook(_m, _args, out):
            return move_tree(out, device, self.transfer)
        return hook


def attach(patcher, plan: Plan, transfer: Callable = _to, on_run_end: Callable | None = None) -> DevicePlacement:
    """Install `plan` on `patcher` (a clone owned by the caller); replaces an earlier placement.
    `on_run_end(stats)` is called after each sampling run."""
    import comfy.patcher_extension as pe
    ctl = DevicePlacement(plan, transfer, on_run_end)
    patcher.remove_wrappers_with_key(pe.WrappersMP.OUTER_SAMPLE, KEY)
    patcher.set_injections(KEY, [pe.PatcherInjection(inject=ctl.inject, eject=ctl.eject)])
    patcher.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, KEY, ctl.outer_sample)
    return ctl


def detach(patcher) -> bool:
    """Remove a placement from `patcher` (a clone owned by the caller); True if there was one."""
    import comfy.patcher_extension as pe
    if patcher.get_injections(KEY):
        patcher.remove_injections(KEY)
        patcher.remove_wrappers_with_key(pe.WrappersMP.OUTER_SAMPLE, KEY)
        return True
    return False


def controller(patcher) -> DevicePlacement | None:
    inj = (patcher.get_injections(KEY) or [None])[0]
    return getattr(getattr(inj, "inject", None), "__self__", None)
