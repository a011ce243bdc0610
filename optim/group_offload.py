"""Group offload for ComfyUI models: the weights ComfyUI leaves off the GPU are streamed in, one
group of blocks (or one leaf layer) at a time, in the order the model runs them, with the next
group prefetched from pinned memory on a side CUDA stream while the current one computes.

It builds on ComfyUI's own low-VRAM machinery instead of replacing it (diffusers' and accelerate's
hooks break on ComfyUI models, see the project notes):
- ComfyUI decides which layers are resident and keeps the accounting: after its load, the
  PREPARE_SAMPLING wrapper trims the resident weights to `vram_budget_gb` with ComfyUI's own
  `partially_unload` (which turns the layers it moves into low-VRAM layers: weights on the offload
  device, `comfy_cast_weights`, LoRA applied on the fly through `weight_function`).
- An injection installs forward pre-hooks on those offloaded layers only (leaves: hooks on UNet
  block containers or on blocks replaced by views would never fire). The first layer of a group to
  run swaps the group's parameters for device copies; the next group's copies are started on a
  side stream; the previous group's parameters are swapped back. ComfyUI's per-layer cast then
  finds each weight already on the device and only applies LoRA patches, exactly as it would.
- An APPLY_MODEL wrapper swaps every parameter back when a model call ends (or fails), so between
  calls the model is exactly as ComfyUI left it; the injection's eject removes every hook before
  ComfyUI moves or unpatches weights, so unloading, `/free`, other clones and later prompts see
  plain ComfyUI.
- Prefetch follows the order the groups actually ran in earlier calls (a few recent call traces
  are remembered), so a block a cache skips is not fetched: where the traces disagree about what
  comes next (a cache's branch point) the next group is loaded when it starts instead.
- Pinned copies are validated against their source (storage pointer and version counter) at each
  use, so a LoRA patch or a new weight never streams a stale copy; they are dropped when ComfyUI
  detaches the model.

On a CPU-only machine load and offload devices are both the CPU: the same code runs, a "transfer"
is a copy and streams are no-ops, so the tests exercise the logic everywhere.
"""
from __future__ import annotations

import collections
import logging
import time
import weakref
from dataclasses import dataclass, field

import torch

from . import disk_offload, dit_layout

KEY = "comfyui-optim.group_offload"
OFFLOAD_TYPES = ("block_level", "leaf_level")
TRACES_KEPT = 4
GIB = 1024 ** 3
log = logging.getLogger("comfyui-optim")


@dataclass(frozen=True)
class GroupOffloadParams:
    offload_type: str = "block_level"
    num_blocks_per_group: int = 1
    use_stream: bool = True
    record_stream: bool = False
    low_cpu_mem_usage: bool = False
    vram_budget_gb: float = 0.0    # resident weights plus in-flight groups; 0: as little as possible
    offload_to_disk: bool = False  # offloaded weights in a memory-mapped file under ComfyUI's temp dir

    def problems(self) -> list[str]:
        out = []
        if self.offload_type not in OFFLOAD_TYPES:
            out.append(f"offload_type must be one of {OFFLOAD_TYPES}, got {self.offload_type!r}")
        if self.num_blocks_per_group < 1:
            out.append(f"num_blocks_per_group must be >= 1, got {self.num_blocks_per_group}")
        if not self.vram_budget_gb >= 0:
            out.append(f"vram_budget_gb must be >= 0, got {self.vram_budget_gb}")
        if self.record_stream and not self.use_stream:
            out.append("record_stream needs use_stream")
        return out


# ---------------------------------------------------------------------------------------------
# Plan: groups of leaf layers in execution order

@dataclass
class Group:
    name: str
    leaves: list[tuple[str, torch.nn.Module]]   # (path from the diffusion model, module)

    @property
    def nbytes(self) -> int:
        return sum(p.nelement() * p.element_size() for _, m in self.leaves
                   for p in m._parameters.values() if p is not None)


def managed_leaves(root: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Modules whose parameters are all their own, in registration order: the units ComfyUI's
    loader moves and casts (modules with parameters in both themselves and their children are
    left alone by ComfyUI's partial load, and so by us)."""
    out = []
    for name, m in root.named_modules():
        own = [p for p in m._parameters.values() if p is not None]
        if own and len(own) == sum(1 for _ in m.parameters()):
            out.append((name, m))
    return out


def block_paths(diffusion_model: torch.nn.Module) -> list[str]:
    """Paths of the model's blocks in execution order: the family layout where one is known (Flux
    double then single blocks, Wan blocks, ...), else the children of every top-level block list
    (UNet input blocks, output blocks; a VAE's up and down levels) and a UNet's middle block as
    one block."""
    fam = dit_layout.family_of(diffusion_model)
    if fam is not None:
        return [ref.path for ref in dit_layout.block_refs(diffusion_model, fam)]
    out: list[str] = []
    lists: list[str] = []     # outermost block lists found so far (nested lists belong to their blocks)
    for name, child in diffusion_model.named_modules():
        if any(name.startswith(f"{outer}.") for outer in lists):
            continue
        if name == "middle_block":
            out.append(name)
            lists.append(name)
        elif isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)) and name:
            lists.append(name)
            out.extend(f"{name}.{sub}" for sub in child._modules)
    return out


def _block_of(path: str, blocks: list[str]) -> str | None:
    for b in blocks:
        if path == b or path.startswith(b + "."):
            return b
    return None


def plan_groups(diffusion_model: torch.nn.Module, offload_type: str, num_blocks_per_group: int) -> list[Group]:
    """Every managed leaf of the model in exactly one group, groups in execution order. Layers
    outside the blocks (embedders, final layers) form groups of their own, one per contiguous run."""
    leaves = managed_leaves(diffusion_model)
    if offload_type == "leaf_level":
        return [Group(path, [(path, m)]) for path, m in leaves]
    blocks = block_paths(diffusion_model)
    units: list[tuple[str | None, list]] = []   # (block path or None for loose layers, leaves)
    unit_of_block: dict[str, int] = {}
    for path, m in leaves:
        b = _block_of(path, blocks)
        if b is not None and b in unit_of_block:
            units[unit_of_block[b]][1].append((path, m))
        elif b is not None:
            unit_of_block[b] = len(units)
            units.append((b, [(path, m)]))
        elif units and units[-1][0] is None:
            units[-1][1].append((path, m))
        else:
            units.append((None, [(path, m)]))
    # blocks in layout order (registration order already matches it for every known family)
    groups: list[Group] = []
    run: list[tuple[str, list]] = []

    def flush():
        if run:
            name = run[0][0] if len(run) == 1 else f"{run[0][0]}..{run[-1][0]}"
            groups.append(Group(name, [leaf for _, ls in run for leaf in ls]))
            run.clear()

    for block, ls in units:
        if block is None:
            flush()
            groups.append(Group(ls[0][0] if len(ls) == 1 else f"{ls[0][0]}..{ls[-1][0]}", ls))
            continue
        run.append((block, ls))
        if len(run) >= num_blocks_per_group:
            flush()
    flush()
    return groups


# ---------------------------------------------------------------------------------------------
# Transfers

@dataclass
class _Flight:
    """Device copies of one group's parameters, possibly still being written on the side stream."""
    tensors: list[torch.Tensor]
    nbytes: int
    event: object = None
    staging: list = field(default_factory=list)   # pinned buffers made on the fly, kept until the copy ends


class Mover:
    """Copies groups to the load device: pinned sources and a side stream on CUDA, plain copies
    elsewhere (on the CPU the copy keeps the path and the byte counts honest)."""

    def __init__(self, device: torch.device, use_stream: bool, record_stream: bool, low_cpu_mem_usage: bool):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self.stream = torch.cuda.Stream(device=self.device) if (use_stream and self.cuda) else None
        self.record_stream = record_stream and self.stream is not None
        self.low_cpu_mem_usage = low_cpu_mem_usage
        self.pinned: dict[tuple[str, str], tuple[int, int, torch.Tensor]] = {}
        self.pinned_bytes = 0
        # time spent copying: seconds of synchronous copies, (start, end) CUDA events of the rest
        self.copy_seconds = 0.0
        self.copy_events: list[tuple] = []

    def take_copy_seconds(self) -> float:
        """Seconds spent in copies since the last call (waits for the copies still queued)."""
        total = self.copy_seconds
        for start, end in self.copy_events:
            end.synchronize()
            total += start.elapsed_time(end) / 1000.0
        self.copy_seconds = 0.0
        self.copy_events = []
        return total

    def _source(self, key, t: torch.Tensor, staging: list) -> torch.Tensor:
        if not self.cuda or t.device.type != "cpu":
            return t
        if self.low_cpu_mem_usage:
            if self.stream is None:
                return t                       # a synchronous copy needs no pinned buffer
            p = t.pin_memory()
            staging.append(p)
            return p
        hit = self.pinned.get(key)
        # a copy is valid only for the very storage and version it was made from: a LoRA patch,
        # a reload or an in-place edit of the weight changes one of them
        if hit is not None and hit[0] == t.data_ptr() and hit[1] == t._version and hit[2].shape == t.shape \
                and hit[2].dtype == t.dtype:
            return hit[2]
        if hit is not None:
            self.pinned_bytes -= hit[2].nelement() * hit[2].element_size()
        p = t.pin_memory()
        self.pinned[key] = (t.data_ptr(), t._version, p)
        self.pinned_bytes += p.nelement() * p.element_size()
        return p

    def start(self, slots) -> _Flight:
        """Begin copying `slots` [(key, param)] to the device; on a side stream when there is one."""
        staging: list = []
        sources = [self._source(key, p.data, staging) for key, p in slots]
        nbytes = sum(s.nelement() * s.element_size() for s in sources)
        if self.stream is None:
            if self.cuda:
                t0 = torch.cuda.Event(enable_timing=True)
                t0.record()
                tensors = [s.to(self.device, non_blocking=s.is_pinned(), copy=True) for s in sources]
                t1 = torch.cuda.Event(enable_timing=True)
                t1.record()
                self.copy_events.append((t0, t1))
            else:
                t0 = time.perf_counter()
                tensors = [s.to(self.device, copy=True) for s in sources]
                self.copy_seconds += time.perf_counter() - t0
            return _Flight(tensors, nbytes, None, staging)
        current = torch.cuda.current_stream(self.device)
        if self.record_stream:
            # allocated on the side stream, so the copy need not wait for the computation queued so
            # far; `finish` records the compute stream on each tensor before it is used
            with torch.cuda.stream(self.stream):
                tensors = [torch.empty_like(s, device=self.device) for s in sources]
        else:
            # allocated on the compute stream; the side stream first waits for the work queued so far
            # (which may still read memory the allocator hands out again), then copies
            tensors = [torch.empty_like(s, device=self.device) for s in sources]
            self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            t0 = torch.cuda.Event(enable_timing=True)
            t0.record(self.stream)
            for dst, src in zip(tensors, sources):
                dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event(enable_timing=True)
            event.record(self.stream)
            self.copy_events.append((t0, event))
        return _Flight(tensors, nbytes, event, staging)

    def finish(self, flight: _Flight) -> list[torch.Tensor]:
        if flight.event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(flight.event)
            if self.record_stream:
                for t in flight.tensors:
                    t.record_stream(current)
        flight.staging.clear()
        return flight.tensors

    def drop_pinned(self):
        self.pinned.clear()
        self.pinned_bytes = 0


# ---------------------------------------------------------------------------------------------
# Statistics

@dataclass
class OffloadStats:
    calls: int = 0
    groups_streamed: int = 0        # groups with offloaded layers in the current installation
    streamed_bytes_per_pass: int = 0
    transfers: int = 0              # group copies started (on demand or prefetched)
    bytes_moved: int = 0
    sync_loads: int = 0             # a group that started before its copy had been issued
    prefetch_hits: int = 0
    prefetch_wasted: int = 0        # prefetched, then not run before the call ended
    peak_inflight_bytes: int = 0    # largest amount of streamed weights on the device at once
    resident_bytes: int = 0         # ComfyUI's accounting of loaded weights after the budget
    disk_bytes: int = 0             # offloaded weights held in files instead of RAM
    disk_file_backed_bytes: int = 0  # of which read back from the model's own safetensors files
    copy_seconds: float = 0.0       # time the copies took (CUDA events on a GPU, wall time elsewhere)
    peak_vram_bytes: int | None = None   # torch.cuda.max_memory_allocated over the run; None off CUDA
    per_group: collections.Counter = field(default_factory=collections.Counter)  # transfers by group name

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("calls", "groups_streamed", "streamed_bytes_per_pass", "transfers",
                                           "bytes_moved", "sync_loads", "prefetch_hits", "prefetch_wasted",
                                           "peak_inflight_bytes", "resident_bytes", "disk_bytes",
                                           "disk_file_backed_bytes", "peak_vram_bytes")}
        d["gb_moved"] = round(self.bytes_moved / GIB, 3)
        d["groups"] = self.groups_streamed
        d["copy_seconds"] = round(self.copy_seconds, 6)
        # achieved transfer rate (decimal GB/s, as bandwidths are quoted); None without copies
        d["gbps"] = round(self.bytes_moved / self.copy_seconds / 1e9, 3) if self.copy_seconds > 0 else None
        return d


# ---------------------------------------------------------------------------------------------
# Installation: hooks on one loaded model

class _Installation:
    def __init__(self, ctl: "GroupOffload", groups: list[Group], mover: Mover, stats: OffloadStats):
        self.ctl, self.groups, self.mover, self.stats = ctl, groups, mover, stats
        # per group: [(pinned-copy key, module, parameter name, resting parameter)]
        self.slots = [[((path, pname), m, pname, p) for path, m in g.leaves
                       for pname, p in m._parameters.items() if p is not None] for g in groups]
        self.nbytes = [g.nbytes for g in groups]
        self.onloaded: set[int] = set()
        self.inflight: dict[int, _Flight] = {}
        self.current: int | None = None
        self.trace: list[int] = []
        self.matching: list[tuple] = []
        self.in_call = False
        self.handles = []
        for gi, g in enumerate(groups):
            for _, m in g.leaves:
                self.handles.append(m.register_forward_pre_hook(self._pre_hook(gi)))

    def _pre_hook(self, gi: int):
        def hook(_module, _args):
            # outside a model call seen by the APPLY_MODEL wrapper ComfyUI's own per-layer cast
            # serves the layer, so nothing can stay swapped in
            if self.in_call and gi != self.current:
                self.activate(gi)
        return hook

    def _swap_in(self, gi: int, tensors: list[torch.Tensor]) -> None:
        for (_, m, pname, _p), t in zip(self.slots[gi], tensors):
            m._parameters[pname] = torch.nn.Parameter(t, requires_grad=False)
        self.onloaded.add(gi)

    def _swap_out(self, gi: int) -> None:
        for _, m, pname, p in self.slots[gi]:
            m._parameters[pname] = p
        self.onloaded.discard(gi)

    def _start(self, gi: int) -> _Flight:
        flight = self.mover.start([(key, p) for key, _m, _n, p in self.slots[gi]])
        self.stats.transfers += 1
        self.stats.bytes_moved += flight.nbytes
        self.stats.per_group[self.groups[gi].name] += 1
        return flight

    def activate(self, gi: int) -> None:
        self.trace.append(gi)
        self.matching = [t for t in self.matching if len(t) >= len(self.trace) and t[len(self.trace) - 1] == gi]
        # the previous group goes first: its device copies return to the allocator (stream-ordered,
        # so kernels still queued on them are safe) before this group's are taken
        for other in list(self.onloaded):
            if other != gi:
                self._swap_out(other)
        if gi not in self.onloaded:
            flight = self.inflight.pop(gi, None)
            if flight is None:
                self.stats.sync_loads += 1
                flight = self._start(gi)
            else:
                self.stats.prefetch_hits += 1
            self._swap_in(gi, self.mover.finish(flight))
        self.current = gi
        nxt = self.predict_next(gi)
        for stale in [k for k in self.inflight if k != nxt]:
            del self.inflight[stale]
            self.stats.prefetch_wasted += 1
        if self.ctl.params.use_stream and nxt is not None and nxt not in self.onloaded and nxt not in self.inflight:
            self.inflight[nxt] = self._start(nxt)
        inflight = self.nbytes[gi] + sum(self.nbytes[k] for k in self.inflight)
        self.stats.peak_inflight_bytes = max(self.stats.peak_inflight_bytes, inflight)

    def predict_next(self, gi: int) -> int | None:
        """The group that followed this point in every remembered call that ran like this one so
        far; with no history, the next group in order; None where the history disagrees (a cache
        decides there) or where this call left every remembered path."""
        pos = len(self.trace)
        if not self.ctl.traces:
            return gi + 1 if gi + 1 < len(self.groups) else None
        nexts = {t[pos] for t in self.matching if len(t) > pos}
        if len(nexts) == 1 and all(len(t) > pos for t in self.matching):
            return nexts.pop()
        return None

    def begin_call(self) -> None:
        self.trace = []
        self.matching = list(self.ctl.traces)
        self.current = None
        self.in_call = True
        self.stats.calls += 1

    def end_call(self) -> None:
        self.in_call = False
        for gi in list(self.onloaded):
            self._swap_out(gi)
        self.stats.prefetch_wasted += len(self.inflight)
        self.inflight.clear()
        self.current = None
        if self.trace:
            self.ctl.remember(tuple(self.trace))

    def remove(self) -> None:
        for gi in list(self.onloaded):
            self._swap_out(gi)
        self.inflight.clear()
        for h in self.handles:
            h.remove()
        self.handles.clear()


# ---------------------------------------------------------------------------------------------
# Controller: ComfyUI's faces (injection, wrappers, callback)

def offloaded(module: torch.nn.Module, load_device: torch.device) -> bool:
    """Whether ComfyUI left this layer's weights off the device: its loader marks each layer it
    keeps loaded with `comfy_patched_weights = True`; on a GPU the weights' device confirms it."""
    if getattr(module, "comfy_patched_weights", False) is True:
        return False
    params = [p for p in module._parameters.values() if p is not None]
    if not params:
        return False
    if torch.device(load_device).type != "cpu":
        return any(p.device != torch.device(load_device) for p in params)
    return True


class GroupOffload:
    """`target` "diffusion": a MODEL's diffusion model, with sampling wrappers for the budget and
    the call boundaries. "module": the patcher's whole module (a VAE's or text encoder's), with the
    budget applied when the model is injected and each call of one of its top-level children as a
    call boundary (VAE decode runs `decoder`, not `forward`)."""

    def __init__(self, params: GroupOffloadParams, on_run_end=None, target: str = "diffusion", run_id=None):
        self.params = params
        self.target = target
        # modules only (no sampling run to wrap): `run_id()` names the run a call belongs to (the
        # node passes the prompt id), so the statistics sent after each call are that run's
        self.run_id = run_id
        self.last_run_id = object()
        self.boundary_handles: list = []
        self.boundary_owner = None
        self.enforcing = False
        self.on_run_end = on_run_end
        self.install: _Installation | None = None
        self.mover: Mover | None = None
        self.traces: collections.deque = collections.deque(maxlen=TRACES_KEPT)
        self.stats = OffloadStats()
        self.last_stats: dict | None = None
        self.run_active = False
        self.stores: list[disk_offload.DiskStore] = []
        # if the node's MODEL is dropped while its weights rest on disk, they come back to RAM
        self._finalizer = weakref.finalize(self, disk_offload.release_all, self.stores)

    def remember(self, trace: tuple) -> None:
        if trace in self.traces:
            self.traces.remove(trace)
        self.traces.append(trace)

    def budget_bytes(self, groups: list[Group]) -> int:
        """Resident weights allowed: the budget less room for the group computing and the one in
        flight."""
        window = sorted((g.nbytes for g in groups), reverse=True)[:2 if self.params.use_stream else 1]
        return max(0, int(self.params.vram_budget_gb * GIB) - sum(window))

    # -- injection: runs after ComfyUI loaded the model / before it moves weights
    def root(self, patcher) -> torch.nn.Module:
        return patcher.model.diffusion_model if self.target == "diffusion" else patcher.model

    def inject(self, patcher) -> None:
        if self.enforcing:
            return
        if self.install is not None:
            self.install.remove()
        if self.target == "module":
            self.enforce_budget(patcher, from_inject=True)
        dm = self.root(patcher)
        groups = plan_groups(dm, self.params.offload_type, self.params.num_blocks_per_group)
        streamed = []
        for g in groups:
            leaves = [(path, m) for path, m in g.leaves if offloaded(m, patcher.load_device)]
            if leaves:
                streamed.append(Group(g.name, leaves))
        self.install = None
        if not streamed:
            return
        if self.params.offload_to_disk:
            self._to_disk(streamed, patcher.get_attachment(disk_offload.SOURCES_KEY)
                          if self.target == "diffusion" and hasattr(patcher, "get_attachment") else None)
        if self.mover is None or self.mover.device != torch.device(patcher.load_device):
            # weights on disk are pinned per transfer: a pinned copy would hold them in RAM again
            self.mover = Mover(patcher.load_device, self.params.use_stream, self.params.record_stream,
                               self.params.low_cpu_mem_usage or self.params.offload_to_disk)
        self.stats.groups_streamed = len(streamed)
        self.stats.streamed_bytes_per_pass = sum(g.nbytes for g in streamed)
        self.install = _Installation(self, streamed, self.mover, self.stats)
        if self.target == "module":
            self._install_boundaries(dm)

    def _install_boundaries(self, root: torch.nn.Module) -> None:
        def begin(child):
            def hook(_m, _args):
                if self.boundary_owner is None and self.install is not None:
                    run = self.run_id() if self.run_id is not None else None
                    if run != self.last_run_id:
                        self.last_run_id = run
                        self._start_run()
                    self.boundary_owner = child
                    self.install.begin_call()
            return hook

        def end(child):
            def hook(_m, _args, _out):
                if self.boundary_owner is child:
                    self.boundary_owner = None
                    if self.install is not None:
                        self.install.end_call()
                    self._finish_run(accumulate=True)   # this run's totals so far, after each call
            return hook
        for _name, child in root.named_children():
            self.boundary_handles.append(child.register_forward_pre_hook(begin(child)))
            # always_call: an exception inside the call still swaps every parameter back
            self.boundary_handles.append(child.register_forward_hook(end(child), always_call=True))

    def _remove_boundaries(self) -> None:
        for h in self.boundary_handles:
            h.remove()
        self.boundary_handles.clear()
        self.boundary_owner = None

    def _to_disk(self, streamed: list[Group], sources: dict | None = None) -> None:
        """Move the RAM storage of the streamed layers to disk (layers already there stay): mapped
        from the model's own safetensors file where the weight is byte for byte the file's
        (`sources`: key -> (file, name in file), set by the sharded loader), else written once to a
        content-keyed file under ComfyUI's temp directory."""
        there = disk_offload.pointers(self.stores)
        todo = [(f"{path}.{pname}", p) for g in streamed for path, m in g.leaves
                for pname, p in m._parameters.items()
                if p is not None and p.device.type == "cpu" and p.data_ptr() not in there]
        unused = [s for s in self.stores if not s.in_use()]   # ComfyUI moved their layers since
        if todo and sources:
            from_file = [(name, p, *sources[name]) for name, p in todo if name in sources]
            if from_file:
                store = disk_offload.FileBackedStore(from_file)
                if store.views:
                    self.stores.append(store)
                taken = {name for name, *_ in from_file} - set(store.rejected)
                todo = [(name, p) for name, p in todo if name not in taken]
        if todo:
            self.stores.append(disk_offload.DiskStore(todo))
        for store in unused:     # after the write: identical content keeps its folder
            self.stores.remove(store)
            store.release()
        self.stats.disk_bytes = sum(s.nbytes for s in self.stores)
        self.stats.disk_file_backed_bytes = sum(s.nbytes for s in self.stores
                                                if isinstance(s, disk_offload.FileBackedStore))

    def eject(self, patcher) -> None:
        if self.enforcing:
            return
        self._remove_boundaries()
        if self.install is not None:
            self.install.remove()
            self.install = None

    def on_detach(self, patcher, unpatch_all) -> None:
        """ComfyUI unloaded the model: release the pinned copies and the call history. (A detach
        without unpatching is ComfyUI re-registering the same model for the next prompt.)"""
        self.eject(patcher)
        if not unpatch_all:
            return
        disk_offload.release_all(self.stores)
        if self.mover is not None:
            self.mover.drop_pinned()
        self.traces.clear()

    # -- wrappers
    def prepare_sampling(self, executor, model, *args, **kwargs):
        out = executor(model, *args, **kwargs)
        self.enforce_budget(model)
        return out

    def enforce_budget(self, patcher, from_inject: bool = False) -> None:
        """Move layers beyond the budget off the device with ComfyUI's own partial unload, so its
        accounting (`loaded_size`) stays the truth."""
        groups = plan_groups(self.root(patcher), self.params.offload_type, self.params.num_blocks_per_group)
        target = self.budget_bytes(groups)
        loaded = patcher.loaded_size()
        # ComfyUI's unload measures what it frees with other injections ejected: where one of them
        # shrinks the weights (an fp8 cast), one pass frees less than asked; go on while it helps
        while loaded > target:
            # from inside our injection, ComfyUI's unload may eject and re-inject: ignore those
            # calls (the injection goes on to plan from the new state); from the sampling wrapper
            # the re-injection is what installs the hooks for the new state
            self.enforcing = from_inject
            try:
                patcher.partially_unload(patcher.offload_device, loaded - target)
            finally:
                self.enforcing = False
            loaded, before = patcher.loaded_size(), loaded
            if loaded >= before:
                break
        self.stats.resident_bytes = patcher.loaded_size()

    def apply_model(self, executor, *args, **kwargs):
        inst = self.install
        if inst is None:
            return executor(*args, **kwargs)
        inst.begin_call()
        try:
            return executor(*args, **kwargs)
        finally:
            inst.end_call()

    def _cuda_device(self):
        return self.mover.device if self.mover is not None and self.mover.cuda else None

    def _start_run(self) -> None:
        """Fresh counters for a run; the figures of the installation (groups, resident and disk
        bytes) carry over."""
        self.stats = OffloadStats(resident_bytes=self.stats.resident_bytes, disk_bytes=self.stats.disk_bytes,
                                  disk_file_backed_bytes=self.stats.disk_file_backed_bytes,
                                  groups_streamed=self.stats.groups_streamed,
                                  streamed_bytes_per_pass=self.stats.streamed_bytes_per_pass)
        if self.install is not None:
            self.install.stats = self.stats
        if self._cuda_device() is not None:
            torch.cuda.reset_peak_memory_stats(self._cuda_device())
        if self.mover is not None:
            self.mover.take_copy_seconds()     # copies of an earlier run or of a VAE call belong elsewhere

    def _finish_run(self, accumulate: bool = False) -> None:
        """Close the run's figures, log them and hand them to `on_run_end`."""
        if self.mover is not None:
            took = self.mover.take_copy_seconds()
            self.stats.copy_seconds = self.stats.copy_seconds + took if accumulate else took
        if self._cuda_device() is not None:
            self.stats.peak_vram_bytes = torch.cuda.max_memory_allocated(self._cuda_device())
        stats = self.stats.as_dict()
        if self.mover is not None:
            stats["pinned_gb"] = round(self.mover.pinned_bytes / GIB, 3)
        self.last_stats = stats
        self.last_per_group = dict(self.stats.per_group)
        log.info("Group offload (%s, %d per group, streams %s): %d groups streamed, %.3f GB moved in "
                 "%d transfers over %d calls, %d prefetch hits, %d wasted, %d on demand",
                 self.params.offload_type, self.params.num_blocks_per_group, self.params.use_stream,
                 stats["groups_streamed"], stats["gb_moved"], stats["transfers"], stats["calls"],
                 stats["prefetch_hits"], stats["prefetch_wasted"], stats["sync_loads"])
        if self.on_run_end is not None:
            self.on_run_end(stats)

    def outer_sample(self, executor, *args, **kwargs):
        self._start_run()
        self.run_active = True
        try:
            return executor(*args, **kwargs)
        finally:
            self.run_active = False
            self._finish_run()


def attach_module(patcher, params: GroupOffloadParams, on_run_end=None, run_id=None) -> GroupOffload:
    """Install group offload on the patcher of a VAE or text encoder (a clone owned by the caller).
    `on_run_end(stats)` gets the run's figures after each call; `run_id()` says which run a call
    belongs to (calls of one run add up)."""
    import comfy.patcher_extension as pe
    problems = params.problems()
    if problems:
        raise ValueError("; ".join(problems))
    ctl = GroupOffload(params, on_run_end, target="module", run_id=run_id)
    patcher.remove_callbacks_with_key(pe.CallbacksMP.ON_DETACH, KEY)
    patcher.set_injections(KEY, [pe.PatcherInjection(inject=ctl.inject, eject=ctl.eject)])
    patcher.add_callback_with_key(pe.CallbacksMP.ON_DETACH, KEY, ctl.on_detach)
    return ctl


def attach(patcher, params: GroupOffloadParams, on_run_end=None) -> GroupOffload:
    """Install group offload on `patcher` (a clone owned by the caller). A second application on
    the same chain replaces the first."""
    import comfy.patcher_extension as pe
    problems = params.problems()
    if problems:
        raise ValueError("; ".join(problems))
    ctl = GroupOffload(params, on_run_end)
    for kind in (pe.WrappersMP.PREPARE_SAMPLING, pe.WrappersMP.APPLY_MODEL, pe.WrappersMP.OUTER_SAMPLE):
        patcher.remove_wrappers_with_key(kind, KEY)
    patcher.remove_callbacks_with_key(pe.CallbacksMP.ON_DETACH, KEY)
    patcher.set_injections(KEY, [pe.PatcherInjection(inject=ctl.inject, eject=ctl.eject)])
    patcher.add_wrapper_with_key(pe.WrappersMP.PREPARE_SAMPLING, KEY, ctl.prepare_sampling)
    patcher.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, KEY, ctl.apply_model)
    patcher.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, KEY, ctl.outer_sample)
    patcher.add_callback_with_key(pe.CallbacksMP.ON_DETACH, KEY, ctl.on_detach)
    return ctl


def controller(patcher) -> GroupOffload | None:
    inj = (patcher.get_injections(KEY) or [None])[0]
    return getattr(getattr(inj, "inject", None), "__self__", None)
