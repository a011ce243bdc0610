"""DeepCache for ComfyUI's UNet models (SD1.x, SD2.x, SDXL, SVD): reuse the deep features of the
last full step and recompute only the shallow branch on the steps in between.

Semantics follow the reference `DeepCache` package (DeepCacheSDHelper): `cache_branch_id` b keeps
input blocks 0..b and the b+1 last output blocks; the feature entering the first kept output block
is taken from the last full step. With the SD/SDXL layout (three input blocks per level) branch b
is the reference's (block b // 3, layer b % 3).

How it hooks into ComfyUI, without copying the UNet's forward:
- object patches replace `input_blocks`, `middle_block` and `output_blocks` of the clone by views
  that share the very same child modules (same state-dict keys and parameters, so LoRA patching
  and device moves see them) and, on a shallow call only, iterate placeholders for the deep blocks;
- an input block patch and an output block patch record the deep blocks' output shapes on full
  calls, store the deep feature, and substitute it at the branch boundary on shallow calls;
- a DIFFUSION_MODEL wrapper decides per call (full or shallow) from the step index, counted from
  sigmas; an OUTER_SAMPLE wrapper creates the per-run state and drops it when the run ends.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from . import steps as step_counter
from .module_views import make_view

KEY = "comfyui-optim.deepcache"
SKIP_MODES = ("uniform", "non-uniform")
log = logging.getLogger("comfyui-optim")


@dataclass(frozen=True)
class DeepCacheParams:
    cache_interval: int = 3
    cache_branch_id: int = 0
    skip_mode: str = "uniform"
    center: int = 15          # non-uniform: the step around which full steps are densest
    power: float = 1.4        # non-uniform: exponent of the quadratic spacing
    start_percent: float = 0.0
    end_percent: float = 1.0

    def problems(self, max_branch: int | None = None) -> list[str]:
        """Everything wrong with these parameters, as messages for the user."""
        out = []
        if self.cache_interval < 1:
            out.append(f"cache_interval must be >= 1 (1 means no caching), got {self.cache_interval}")
        if self.cache_branch_id < 0:
            out.append(f"cache_branch_id must be >= 0, got {self.cache_branch_id}")
        if max_branch is not None and self.cache_branch_id > max_branch:
            out.append(f"cache_branch_id {self.cache_branch_id} is beyond this UNet's deepest "
                       f"branch ({max_branch})")
        if self.skip_mode not in SKIP_MODES:
            out.append(f"skip_mode must be one of {SKIP_MODES}, got {self.skip_mode!r}")
        if not 0.0 <= self.start_percent < self.end_percent <= 1.0:
            out.append(f"need 0 <= start_percent < end_percent <= 1, got {self.start_percent} / "
                       f"{self.end_percent}")
        if self.power <= 1.0:
            out.append(f"power must be > 1, got {self.power}")
        return out


def quad_center_steps(total: int, n_samples: int, center: int, power: float) -> list[int]:
    """The reference's `sample_from_quad_center`: full steps spaced quadratically around `center`.

    Kept numerically identical to the reference, including its complex power of the negative
    start (numpy keeps the real part when casting)."""
    p = power
    while p > 1:
        x = np.linspace(complex(-center) ** (1 / p), (total - center) ** (1 / p), n_samples + 1)
        picked = np.unique(np.real(x ** p).astype(np.int32))[1:-1]
        indices = [0] + [int(v) + center for v in picked]
        if len(indices) == n_samples:
            return sorted(indices)
        p -= 0.02
    raise ValueError(f"non-uniform schedule: no spacing gives {n_samples} full steps out of {total} "
                     f"around center {center}; lower the center or the interval")


def full_steps(num_steps: int, params: DeepCacheParams) -> set[int]:
    """Steps (0-based, of the run's schedule) on which the whole UNet runs."""
    if params.cache_interval <= 1 or num_steps <= 2:
        return set(range(num_steps))
    uniform = set(range(0, num_steps, params.cache_interval))
    if params.skip_mode == "uniform":
        return uniform
    n_full = -(-num_steps // params.cache_interval)
    center = min(params.center, num_steps - 1)
    try:
        return set(quad_center_steps(num_steps, n_full, center, params.power))
    except ValueError as e:  # known only once the run's step count is: never fail the run for it
        log.warning("DeepCache: %s; using the uniform schedule for this run", e)
        return uniform


@dataclass
class _Call:
    full: bool
    key: tuple
    transformer_options: dict
    shapes: dict


@dataclass
class RunStats:
    full_calls: int = 0
    shallow_calls: int = 0
    steps_seen: set = field(default_factory=set)
    fallbacks: int = 0     # calls that would have been shallow but ran full (ControlNet, no cache)
    per_step: dict = field(default_factory=dict)   # step -> (calls, shallow calls)
    clock: step_counter.StepClock = field(default_factory=step_counter.StepClock)

    def count(self, step: int | None, shallow: bool) -> None:
        self.steps_seen.add(step)
        if shallow:
            self.shallow_calls += 1
        else:
            self.full_calls += 1
        calls, reused = self.per_step.get(step, (0, 0))
        self.per_step[step] = (calls + 1, reused + int(shallow))

    def as_dict(self) -> dict:
        total = self.full_calls + self.shallow_calls
        return {"full_calls": self.full_calls, "shallow_calls": self.shallow_calls,
                "steps": len(self.steps_seen), "fallback_calls": self.fallbacks,
                "shallow_fraction": self.shallow_calls / total if total else 0.0,
                "hits": step_counter.hit_string(self.per_step),
                "timed_speedup": self.clock.timed_speedup(
                    s for s, (calls, shallow) in self.per_step.items() if shallow == 0)}


class _Run:
    """State of one sampling run: dropped when the run ends, so nothing leaks into the next."""

    def __init__(self, params: DeepCacheParams, sigma_start: float, sigma_end: float):
        self.params, self.sigma_start, self.sigma_end = params, sigma_start, sigma_end
        self.features: dict[tuple, torch.Tensor] = {}
        self.shapes: dict[tuple, dict] = {}
        self.full: set[int] | None = None
        self.eligible: set[int] = set()
        self.stats = RunStats()

    def derive(self, key: tuple) -> None:
        """Cache entries for a batch made of chunks of a cached one (T-GATE drops the uncond
        chunk after its gate; ComfyUI may split cond and uncond when memory is short)."""
        chunks, shape, dtype = key
        for (c_chunks, c_shape, c_dtype), feature in list(self.features.items()):
            if c_dtype != dtype or not chunks or not set(chunks) <= set(c_chunks) \
                    or c_shape[0] * len(chunks) != shape[0] * len(c_chunks) or c_shape[1:] != shape[1:]:
                continue
            per = feature.shape[0] // len(c_chunks)
            self.features[key] = torch.cat([feature[c_chunks.index(c) * per:(c_chunks.index(c) + 1) * per]
                                            for c in chunks])
            self.shapes[key] = {k: ((v[0][0] // len(c_chunks) * len(chunks), *v[0][1:]), v[1])
                                for k, v in self.shapes[(c_chunks, c_shape, c_dtype)].items()}
            return

    def is_full_step(self, step: int | None, transformer_options: dict) -> bool:
        if step is None:
            return True
        if self.full is None:  # once per run: the schedule is fixed for the run
            schedule = transformer_options["sample_sigmas"]
            eligible = [i for i in range(len(schedule) - 1)
                        if self.sigma_end < float(schedule[i]) <= self.sigma_start]
            # Count the schedule from the first step where caching is allowed, as the reference
            # counts from the first step it sees; steps outside the window are always full.
            self.eligible = set(eligible)
            first = eligible[0] if eligible else 0
            self.full = {s + first for s in full_steps(len(eligible), self.params)}
        return step not in self.eligible or step in self.full


class DeepCache:
    """Controller shared by the patches of one patched model (and its later clones)."""

    def __init__(self, params: DeepCacheParams, n_output: int,
                 transformers_per_block: dict[tuple, int], on_run_end=None):
        self.params = params
        self.keep_input = params.cache_branch_id + 1           # input blocks 0..b run
        self.boundary = n_output - 1 - params.cache_branch_id  # first output block that runs
        self.transformers_per_block = transformers_per_block
        self.on_run_end = on_run_end
        self.run: _Run | None = None
        self.call: _Call | None = None
        self.last_stats: dict | None = None

    def __deepcopy__(self, memo):
        # ModelPatcher.clone() deep-copies model_options, which hold our block patches as bound
        # methods: every clone must keep talking to this one controller, not to a copy of it.
        return self

    # -- which blocks a shallow call skips ---------------------------------------------------
    def is_deep(self, kind: str, index: int) -> bool:
        if kind == "input":
            return index >= self.keep_input
        if kind == "output":
            return index < self.boundary
        return True  # middle

    def blocks_for(self, kind: str, blocks):
        call = self.call
        if call is None or call.full:
            return iter(blocks)
        if kind == "middle":  # the middle block's iteration yields layers: one placeholder layer
            return iter([_Placeholder(self, "middle", 0)])
        return iter([_placeholder_block(self, kind, i) if self.is_deep(kind, i) else b
                     for i, b in enumerate(blocks)])

    # -- ComfyUI hooks -------------------------------------------------------------------------
    def outer_sample(self, executor, *args, **kwargs):
        guider = executor.class_obj
        sampling = guider.model_patcher.get_model_object("model_sampling")
        sigma_start = float(sampling.percent_to_sigma(self.params.start_percent))
        sigma_end = float(sampling.percent_to_sigma(self.params.end_percent))
        self.run = _Run(self.params, sigma_start, sigma_end)
        try:
            return executor(*args, **kwargs)
        finally:
            stats = self.run.stats.as_dict()
            self.run, self.call, self.last_stats = None, None, stats
            log.info("DeepCache (interval %d, branch %d, %s): %d full and %d shallow UNet calls "
                     "over %d steps", self.params.cache_interval, self.params.cache_branch_id,
                     self.params.skip_mode, stats["full_calls"], stats["shallow_calls"], stats["steps"])
            if self.on_run_end is not None:
                self.on_run_end(stats)

    def diffusion_model(self, executor, *args, **kwargs):
        run = self.run
        if run is None:  # called outside a sampling run of this model: nothing to cache
            return executor(*args, **kwargs)
        x = args[0]
        control = args[4] if len(args) > 4 else kwargs.get("control")
        to = args[5] if len(args) > 5 else kwargs["transformer_options"]
        step = step_counter.step_index(to)
        key = (tuple(to.get("cond_or_uncond", ())), tuple(x.shape), x.dtype)
        full = run.is_full_step(step, to)
        if not full and key not in run.features:
            run.derive(key)
        if not full and (control is not None or key not in run.features):
            full = True  # ControlNet residuals reach deep blocks; or nothing cached for this batch yet
            run.stats.fallbacks += 1
        run.stats.count(step, shallow=not full)
        self.call = _Call(full, key, to, run.shapes.setdefault(key, {}))
        started = time.perf_counter()
        try:
            out = executor(*args, **kwargs)
            step_counter.sync(out)
            run.stats.clock.add(step, time.perf_counter() - started)
            return out
        finally:
            self.call = None

    def input_block_patch(self, h, transformer_options):
        call = self.call
        if call is not None and call.full:
            _, index = transformer_options["block"]
            if self.is_deep("input", index):
                call.shapes[("input", index)] = (h.shape, h.dtype)
        return h

    def output_block_patch(self, h, hsp, transformer_options):
        call = self.call
        if call is None:
            return h, hsp
        _, index = transformer_options["block"]
        if call.full:
            previous = ("middle", 0) if index == 0 else ("output", index - 1)
            call.shapes[previous] = (h.shape, h.dtype)
            if index == self.boundary:
                self.run.features[call.key] = h
        elif index == self.boundary:
            h = self.run.features[call.key]
        return h, hsp


class _Placeholder:
    """Stands in for a skipped deep block on a shallow call: zeros of the block's recorded output
    shape (never consumed: the boundary patch replaces what reaches the kept blocks)."""

    def __init__(self, ctl: DeepCache, kind: str, index: int):
        self.ctl, self.kind, self.index = ctl, kind, index

    def __call__(self, x):
        call = self.ctl.call
        to = call.transformer_options
        if "transformer_index" in to:  # keep attention-patch indices what a full call gives
            to["transformer_index"] += self.ctl.transformers_per_block.get((self.kind, self.index), 0)
        shape, dtype = call.shapes[(self.kind, self.index)]
        return torch.zeros(shape, dtype=dtype, device=x.device)


def _placeholder_block(ctl: DeepCache, kind: str, index: int) -> list:
    return [_Placeholder(ctl, kind, index)]


def _iterate_through_controller(self):
    return self.__dict__["_deepcache"].blocks_for(self.__dict__["_deepcache_kind"],
                                                  list(self._modules.values()))


def _iteration_view(original: torch.nn.Module, ctl: DeepCache, kind: str) -> torch.nn.Module:
    """The block list (or middle block) with the same children, iterated through the controller."""
    return make_view(original, "DeepCache", {"__iter__": _iterate_through_controller},
                     _deepcache=ctl, _deepcache_kind=kind)


def supports(diffusion_model) -> bool:
    return all(hasattr(diffusion_model, a) for a in ("input_blocks", "middle_block", "output_blocks")) \
        and type(diffusion_model).__name__ == "UNetModel"


def max_branch(diffusion_model) -> int:
    return len(diffusion_model.input_blocks) - 1


def _count_transformers(block) -> int:
    return sum(1 for layer in block if "SpatialTransformer" in type(layer).__name__
               or "SpatialVideoTransformer" in type(layer).__name__)


def attach(patcher, params: DeepCacheParams, on_run_end=None) -> DeepCache:
    """Install DeepCache on `patcher` (a clone owned by the caller). The caller checked `supports`
    and `params.problems`."""
    dm = patcher.get_model_object("diffusion_model")
    if isinstance(patcher.get_model_object("diffusion_model.input_blocks").__dict__.get("_deepcache"),
                  DeepCache):
        raise ValueError("DeepCache is already applied to this model; apply it once")
    counts = {("input", i): _count_transformers(b) for i, b in enumerate(dm.input_blocks)}
    counts.update({("output", i): _count_transformers(b) for i, b in enumerate(dm.output_blocks)})
    counts[("middle", 0)] = _count_transformers(dm.middle_block) if dm.middle_block is not None else 0
    ctl = DeepCache(params, len(dm.output_blocks), counts, on_run_end)
    if params.cache_interval <= 1:
        return ctl  # every step is a full step: install nothing, output is bit-identical
    for kind, attr in (("input", "input_blocks"), ("middle", "middle_block"), ("output", "output_blocks")):
        original = patcher.get_model_object(f"diffusion_model.{attr}")
        if original is not None:
            patcher.add_object_patch(f"diffusion_model.{attr}", _iteration_view(original, ctl, kind))
    patcher.set_model_input_block_patch(ctl.input_block_patch)
    patcher.set_model_output_block_patch(ctl.output_block_patch)
    patcher.add_wrapper_with_key("outer_sample", KEY, ctl.outer_sample)
    patcher.add_wrapper_with_key("diffusion_model", KEY, ctl.diffusion_model)
    return ctl
