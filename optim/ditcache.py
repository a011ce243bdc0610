"""DiT block caching: skip a range of transformer blocks on some steps and add the range's cached
delta instead (msModelSlim's DitCacheAdaptor, generalised to every DiT family ComfyUI runs).

Semantics:
- The range is blocks [cache_block_start, cache_block_start + cache_num_blocks) of the model's block
  index space (`optim.dit_layout`). On a refresh step the range runs and its delta, output of the
  last block minus input of the first, is stored; on a cached step every block of the range passes
  its input through and the last one returns the range's input plus the stored delta.
- A range that spans two block lists (Flux: double then single blocks) is cached as one delta per
  list. The glue between the lists (concatenating text and image tokens) is linear, so this equals
  one delta over the whole range.
- Fixed mode: steps before `cache_step_start` run fully; from there on, every
  `cache_step_interval`-th step refreshes and the others reuse. Steps are counted from sigmas, so
  second-order samplers and split CFG batches count right.
- Adaptive mode: after `cache_step_start` warm-up steps, a call reuses while the accumulated
  relative L1 change of the range's input since the last refresh stays under `threshold`, for at
  most `max_consecutive` calls in a row. No per-model coefficients. Schedules under 8 steps run
  uncached unless `force` is set: a distilled model's steps differ too much to reuse.
- Deltas are kept per conditioning (ComfyUI's per-chunk uuids), so cond and uncond, and every item
  of a batch, reuse their own. A call that carries ControlNet residuals runs fully.

Hooks: block replace for the families whose forward honours it, block views (object patches) for
the others; an APPLY_MODEL wrapper works out the call's step and layout once; an OUTER_SAMPLE
wrapper owns the per-run state, so nothing outlives a run.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field

import torch

from . import dit_layout
from . import steps as step_counter
from .module_views import make_view

KEY = "comfyui-optim.ditcache"
MODES = ("fixed", "adaptive")
FEW_STEPS = 8
log = logging.getLogger("comfyui-optim")


@dataclass(frozen=True)
class DiTCacheConfig:
    cache_block_start: int = 1
    cache_num_blocks: int = -1       # -1: up to the model's last block but one
    cache_step_start: int = 2        # steps before this run uncached (adaptive: warm-up)
    cache_step_interval: int = 2     # fixed mode: refresh every n-th step from cache_step_start
    mode: str = "fixed"
    threshold: float = 0.15          # adaptive: accumulated relative L1 change allowed
    max_consecutive: int = 3         # adaptive: longest run of reused calls
    force: bool = False              # adaptive: cache schedules under FEW_STEPS too
    delta_order: int = 0             # 0: reuse the last delta; 1: extrapolate from the last two
    # what a searched or saved configuration was made for (None when set by hand)
    family: str | None = None
    num_blocks: int | None = None
    steps: int | None = None
    sampler: str | None = None
    scheduler: str | None = None

    def block_range(self, total_blocks: int) -> tuple[int, int]:
        """[start, end) of the cached range in a model with `total_blocks` blocks."""
        n = self.cache_num_blocks if self.cache_num_blocks >= 0 else total_blocks - 1 - self.cache_block_start
        return self.cache_block_start, self.cache_block_start + n

    def problems(self, family: str | None = None, total_blocks: int | None = None) -> list[str]:
        """What is wrong with this configuration, alone or for a model (family, block count)."""
        out = []
        if self.mode not in MODES:
            out.append(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.cache_block_start < 0:
            out.append(f"cache_block_start must be >= 0, got {self.cache_block_start}")
        if self.cache_num_blocks == 0 or self.cache_num_blocks < -1:
            out.append(f"cache_num_blocks must be >= 1 (or -1: up to the last block but one), "
                       f"got {self.cache_num_blocks}: the cached range is empty")
        if self.cache_step_start < 0:
            out.append(f"cache_step_start must be >= 0, got {self.cache_step_start}")
        if self.cache_step_interval < 1:
            out.append(f"cache_step_interval must be >= 1, got {self.cache_step_interval}")
        if self.steps is not None and self.cache_step_start >= self.steps:
            out.append(f"cache_step_start {self.cache_step_start} is beyond the schedule of "
                       f"{self.steps} steps this configuration was made for")
        if not self.threshold > 0:
            out.append(f"threshold must be > 0, got {self.threshold}")
        if self.max_consecutive < 1:
            out.append(f"max_consecutive must be >= 1, got {self.max_consecutive}")
        if self.delta_order not in (0, 1):
            out.append(f"delta_order must be 0 (reuse) or 1 (linear extrapolation), got {self.delta_order}")
        if family is not None and self.family is not None and family != self.family:
            out.append(f"this configuration was made for a {self.family} model, not {family}")
        if total_blocks is not None and not out:
            start, end = self.block_range(total_blocks)
            if start >= total_blocks or end > total_blocks:
                out.append(f"cached blocks {start}..{end - 1} are outside the model's {total_blocks} "
                           f"blocks (0..{total_blocks - 1})")
            elif end <= start:
                out.append(f"the cached range is empty: cache_block_start {start} with "
                           f"cache_num_blocks {self.cache_num_blocks} in a model of {total_blocks} blocks")
        return out

    def mismatches(self, steps: int | None = None, sampler: str | None = None,
                   scheduler: str | None = None, total_blocks: int | None = None) -> list[str]:
        """Settings that differ from those this configuration was made for (warnings, not errors)."""
        out = []
        for what, made, now in (("steps", self.steps, steps), ("sampler", self.sampler, sampler),
                                ("scheduler", self.scheduler, scheduler),
                                ("block count", self.num_blocks, total_blocks)):
            if made is not None and now is not None and made != now:
                out.append(f"{what}: made for {made}, used with {now}")
        return out

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "DiTCacheConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"the cache configuration is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError("the cache configuration must be a JSON object")
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict) -> "DiTCacheConfig":
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown cache configuration fields: {', '.join(unknown)}")
        values = {}
        for name, value in data.items():
            kind = known[name].type
            if value is None and "None" in str(kind):
                values[name] = None
            elif "bool" in str(kind):
                if not isinstance(value, bool):
                    raise ValueError(f"{name} must be true or false, got {value!r}")
                values[name] = value
            elif "int" in str(kind):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"{name} must be an integer, got {value!r}")
                values[name] = value
            elif "float" in str(kind):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"{name} must be a number, got {value!r}")
                values[name] = float(value)
            else:
                if not isinstance(value, str):
                    raise ValueError(f"{name} must be a string, got {value!r}")
                values[name] = value
        return cls(**values)


@dataclass
class RunStats:
    steps: int | None = None
    calls: int = 0
    calls_cached: int = 0
    steps_cached: int = 0
    blocks_per_call: int = 0
    cached_blocks: int = 0
    blocks_skipped: int = 0
    estimated_speedup: float = 1.0   # from the blocks skipped (every block costing the same)
    timed_speedup: float = 1.0       # from timed calls and timed ranges of the refresh calls
    stepped_aside: bool = False
    hits: str = ""                   # one character per step: see steps.hit_string

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Call:
    step: int
    uuids: tuple
    refresh: bool | None       # None: adaptive, decided at the range's first block
    full: bool = False         # run every block, store nothing (ControlNet)
    range_started: float | None = None
    sigma: float = 0.0         # where in the schedule this call is (delta extrapolation runs in sigma)


@dataclass
class _Run:
    deltas: dict = field(default_factory=dict)        # (segment, uuid) -> {stream: delta chunk}
    older: dict = field(default_factory=dict)         # (segment, uuid) -> the refresh before: (sigma, deltas)
    delta_at: dict = field(default_factory=dict)      # (segment, uuid) -> (step, sigma) of the stored delta
    keys: dict = field(default_factory=dict)          # segment -> stream keys the blocks return
    seg_in: dict = field(default_factory=dict)        # segment -> streams at its first block (this call)
    prev_input: dict = field(default_factory=dict)    # uuid -> range input of the previous call
    change: dict = field(default_factory=dict)        # uuid -> accumulated relative change
    consecutive: int = 0
    cached_steps: set = field(default_factory=set)
    per_step: dict = field(default_factory=dict)      # step -> (calls, calls that reused the range)
    call_time: float = 0.0
    refresh_range_time: float = 0.0
    refresh_calls: int = 0
    stats: RunStats = field(default_factory=RunStats)


def _chunks(t: torch.Tensor, n: int) -> list[torch.Tensor]:
    return list(t.chunk(n, dim=0)) if n > 1 else [t]


def _sync(t) -> None:
    if isinstance(t, torch.Tensor) and t.device.type == "cuda":
        torch.cuda.synchronize(t.device)


class DiTCache:
    def __init__(self, family: dit_layout.Family, refs: list, config: DiTCacheConfig, on_run_end=None):
        self.family, self.config, self.on_run_end = family, config, on_run_end
        self.total_blocks = len(refs)
        self.start, self.end = config.block_range(len(refs))
        in_range = refs[self.start:self.end]
        # first and last block index of each block list inside the range
        self.segment_bounds: dict[int, tuple[int, int]] = {}
        for ref in in_range:
            first, _ = self.segment_bounds.get(ref.segment, (ref.index, ref.index))
            self.segment_bounds[ref.segment] = (first, ref.index)
        self.run: _Run | None = None
        self.call: _Call | None = None
        self.last_stats: dict | None = None

    def __deepcopy__(self, memo):  # ModelPatcher.clone deep-copies model_options: share the controller
        return self

    # -- per call ---------------------------------------------------------------------------------
    def _deltas_ready(self, run: _Run, uuids: tuple, img: torch.Tensor | None) -> bool:
        """Every block list of the range has a delta for every conditioning of this batch, shaped
        like this call's input."""
        if any((seg, u) not in run.deltas for seg in self.segment_bounds for u in uuids):
            return False
        stored = run.deltas[(min(self.segment_bounds), uuids[0])].get("img")
        return img is None or stored is None or stored.shape == _chunks(img, len(uuids))[0].shape

    def _decide_adaptive(self, run: _Run, call: _Call, img: torch.Tensor) -> bool:
        """True: refresh. Accumulates the relative L1 change of the range's input per conditioning."""
        cfg = self.config
        over = False
        for u, x in zip(call.uuids, _chunks(img, len(call.uuids))):
            prev = run.prev_input.get(u)
            if prev is None or prev.shape != x.shape:
                over = True
            else:
                rel = float((x - prev).abs().mean() / prev.abs().mean().clamp_min(1e-12))
                run.change[u] = run.change.get(u, 0.0) + rel
                over = over or run.change[u] >= cfg.threshold
            run.prev_input[u] = x.detach().clone()
        refresh = over or call.step < cfg.cache_step_start or run.consecutive >= cfg.max_consecutive
        return refresh

    def block(self, ref, streams: dict, run_original):
        """One block of the range: `streams` are its hidden inputs, `run_original()` runs it and
        returns its hidden outputs as a dict."""
        run, call = self.run, self.call
        if run is None or call is None or call.full:
            return run_original()
        seg = ref.segment
        first, last = self.segment_bounds[seg]
        if ref.index == self.start:
            self._decide(run, call, streams.get("img"))
        if ref.index == first:   # the block list's input: what its delta is measured from / added to
            # a copy: blocks may add to their input in place (Flux's, LTXV's), which would make a
            # refresh's delta zero and, on a reused call, change the base the delta is added to
            run.seg_in[seg] = {k: v.clone() for k, v in streams.items() if isinstance(v, torch.Tensor)}
        if call.refresh:
            out = run_original()
            if ref.index == last:
                self._store_delta(run, call, seg, out)
            if ref.index == self.end - 1:
                _sync(out.get("img"))
                run.refresh_range_time += time.perf_counter() - call.range_started
                run.refresh_calls += 1
            return out
        if ref.index != last:
            return {k: streams.get(k) for k in run.keys[seg]}
        return self._reused_output(run, call, seg, streams)

    def _decide(self, run: _Run, call: _Call, img) -> None:
        """At the range's first block: refresh or reuse, for the whole call."""
        if self.config.mode == "adaptive":
            call.refresh = self._decide_adaptive(run, call, img) or bool(call.refresh)
        if not call.refresh and not self._deltas_ready(run, call.uuids, img):
            call.refresh = True
        if call.refresh:
            run.consecutive = 0
            run.change = {u: 0.0 for u in run.change}
            _sync(img)
            call.range_started = time.perf_counter()
        else:
            run.consecutive += 1

    def _reused_output(self, run: _Run, call: _Call, seg: int, streams: dict) -> dict:
        """The last block of a block list on a reused call: the list's input plus its delta."""
        out = {}
        for k in run.keys[seg]:
            deltas = [self._delta_now(run, seg, u, k, call.sigma) for u in call.uuids]
            base = run.seg_in[seg].get(k)
            if base is None or any(d is None for d in deltas):
                out[k] = streams.get(k)
            else:
                delta = deltas[0] if len(deltas) == 1 else torch.cat(deltas, dim=0)
                out[k] = base + delta.to(base.dtype)
        return out

    def _delta_now(self, run: _Run, seg: int, u, k: str, sigma: float):
        """The stored delta, or with delta_order 1 its linear extrapolation in sigma from the last
        two refreshes to this call (a first-order Taylor step along the sampler's own time)."""
        d1 = run.deltas[(seg, u)].get(k)
        if self.config.delta_order == 0 or d1 is None or (seg, u) not in run.older:
            return d1
        sigma0, older = run.older[(seg, u)]
        d0, sigma1 = older.get(k), run.delta_at[(seg, u)][1]
        if d0 is None or sigma1 == sigma0 or d0.shape != d1.shape:
            return d1
        return d1 + (d1 - d0) * ((sigma - sigma1) / (sigma1 - sigma0))

    def _store_delta(self, run: _Run, call: _Call, seg: int, out: dict) -> None:
        run.keys[seg] = tuple(out.keys())
        seg_in = run.seg_in.pop(seg, {})
        n = len(call.uuids)
        per_uuid = [dict() for _ in call.uuids]
        for k, v in out.items():
            base = seg_in.get(k)
            if not isinstance(v, torch.Tensor) or base is None or base.shape != v.shape:
                continue  # a stream that changes shape (or ends) inside the range passes through
            for i, d in enumerate(_chunks(v - base, n)):
                per_uuid[i][k] = d
        if "img" not in per_uuid[0]:
            return  # the image stream changed shape inside the range: this range is never reused
        for u, d in zip(call.uuids, per_uuid):
            key = (seg, u)
            if self.config.delta_order and key in run.deltas and run.delta_at[key][0] < call.step:
                run.older[key] = (run.delta_at[key][1], run.deltas[key])
            run.deltas[key] = d
            run.delta_at[key] = (call.step, call.sigma)

    # -- ComfyUI wrappers -------------------------------------------------------------------------
    def apply_model(self, executor, *args, **kwargs):
        """Work out the step, the conditionings of the batch and the refresh decision once per call."""
        to = args[5] if len(args) > 5 else kwargs.get("transformer_options", {})
        control = args[4] if len(args) > 4 else kwargs.get("control")
        self.call = self._call_context(to or {}, control)
        started = time.perf_counter()
        try:
            return executor(*args, **kwargs)
        finally:
            call, run = self.call, self.run
            self.call = None
            if run is not None and call is not None:
                run.call_time += time.perf_counter() - started
                run.stats.calls += 1
                reused = not call.full and call.refresh is False
                if reused:
                    run.stats.calls_cached += 1
                    run.cached_steps.add(call.step)
                calls, hits = run.per_step.get(call.step, (0, 0))
                run.per_step[call.step] = (calls + 1, hits + int(reused))

    def _call_context(self, to: dict, control) -> _Call | None:
        run, cfg = self.run, self.config
        if run is None:
            return None
        step, n = step_counter.step_index(to), step_counter.num_steps(to)
        uuids = tuple(to.get("uuids") or ())
        if step is None or not uuids:
            return None
        if run.stats.steps is None:
            run.stats.steps = n
            if cfg.cache_step_start >= n:
                # A configuration made for other steps is refused at validation; a hand-set start
                # past a short run (a preview, a refiner pass) is no reason to lose the run.
                log.warning("OptimDiTCache: cache_step_start %d is beyond this schedule of %d steps; "
                            "this run is not cached", cfg.cache_step_start, n)
            if cfg.mode == "adaptive" and n < FEW_STEPS and not cfg.force:
                run.stats.stepped_aside = True
                log.warning("OptimDiTCache: %d steps is a few-step schedule; the adaptive cache steps "
                            "aside (set force to cache anyway)", n)
        if run.stats.stepped_aside:
            return None
        sigma = float(to["sigmas"].detach().flatten()[0])
        if control is not None:
            return _Call(step, uuids, refresh=True, full=True, sigma=sigma)
        if cfg.mode == "adaptive":
            return _Call(step, uuids, refresh=True if step < cfg.cache_step_start else None, sigma=sigma)
        refresh = step < cfg.cache_step_start or (step - cfg.cache_step_start) % cfg.cache_step_interval == 0
        return _Call(step, uuids, refresh=refresh, sigma=sigma)

    def outer_sample(self, executor, *args, **kwargs):
        self.run = _Run()
        sampler, sigmas = (args[2], args[3]) if len(args) > 3 else (None, None)
        name = getattr(getattr(sampler, "sampler_function", None), "__name__", "")
        for m in self.config.mismatches(steps=len(sigmas) - 1 if sigmas is not None else None,
                                        sampler=name[len("sample_"):] if name.startswith("sample_") else None):
            log.warning("OptimDiTCache: the configuration was made for other settings (%s)", m)
        try:
            return executor(*args, **kwargs)
        finally:
            run, self.run = self.run, None
            stats = self._finish(run)
            self.last_stats = stats
            log.info("DiT cache (%s, blocks %d..%d of %d): %d of %d calls reused the range (%d steps); "
                     "%d block calls skipped; estimated %.2fx, timed %.2fx",
                     self.config.mode, self.start, self.end - 1, self.total_blocks, stats["calls_cached"],
                     stats["calls"], stats["steps_cached"], stats["blocks_skipped"],
                     stats["estimated_speedup"], stats["timed_speedup"])
            if self.on_run_end is not None:
                self.on_run_end(stats)

    def _finish(self, run: _Run) -> dict:
        s = run.stats
        s.blocks_per_call, s.cached_blocks = self.total_blocks, self.end - self.start
        s.steps_cached = len(run.cached_steps)
        s.hits = step_counter.hit_string(run.per_step, s.steps)
        s.blocks_skipped = s.calls_cached * s.cached_blocks
        total = s.calls * self.total_blocks
        if total and total > s.blocks_skipped:
            s.estimated_speedup = round(total / (total - s.blocks_skipped), 3)
        if run.refresh_calls and run.call_time > 0:
            saved = s.calls_cached * run.refresh_range_time / run.refresh_calls
            s.timed_speedup = round((run.call_time + saved) / run.call_time, 3)
        return s.as_dict()


def _view_forward(self, *args, **kwargs):
    hook, ref, seg = self.__dict__["_dit_hook"], self.__dict__["_dit_ref"], self.__dict__["_dit_seg"]
    original_forward = type(self.__dict__["_view_of"]).forward
    streams = seg.streams_in(args, kwargs)
    out = hook(ref, streams, lambda: seg.streams_out(original_forward(self, *args, **kwargs)))
    return seg.to_return(out, args, kwargs)


def _replace_patch(hook, ref, previous):
    def patch(args, extra):
        original = extra["original_block"]
        if previous is not None:   # another pack's replacement of this block stays in the chain
            def run_original():
                return previous(args, extra)
        else:
            def run_original():
                return original(args)
        return hook(ref, {k: args[k] for k in ("img", "txt") if k in args}, run_original)
    return patch


def install_block_hooks(patcher, fam: dit_layout.Family, refs: list, hook, owner) -> None:
    """Route blocks `refs` of the clone `patcher` through `hook(ref, streams, run_original)`:
    block replace where the family honours it, block views elsewhere. `owner` marks the hooks, so
    a second install of the same kind is refused."""
    replace = patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    for ref in refs:
        seg = fam.segments[ref.segment]
        if seg.replace_kind is not None:
            previous = replace.get((seg.replace_kind, ref.local))
            if type(getattr(previous, "_dit_owner", None)) is type(owner):
                raise ValueError("the DiT cache is already applied to this model; apply it once")
            patch = _replace_patch(hook, ref, previous)
            patch._dit_owner = owner
            patcher.set_model_patch_replace(patch, "dit", seg.replace_kind, ref.local)
        else:
            path = f"diffusion_model.{ref.path}"
            original = patcher.get_model_object(path)
            if type(original.__dict__.get("_dit_owner")) is type(owner):
                raise ValueError("the DiT cache is already applied to this model; apply it once")
            patcher.add_object_patch(path, make_view(original, "DiTHook", {"forward": _view_forward},
                                                     _dit_hook=hook, _dit_ref=ref, _dit_seg=seg,
                                                     _dit_owner=owner))


def supports(diffusion_model) -> bool:
    return dit_layout.family_of(diffusion_model) is not None


def model_blocks(diffusion_model) -> tuple[dit_layout.Family | None, list]:
    fam = dit_layout.family_of(diffusion_model)
    return fam, (dit_layout.block_refs(diffusion_model, fam) if fam is not None else [])


def attach(patcher, config: DiTCacheConfig, on_run_end=None) -> DiTCache:
    """Install the cache on `patcher` (a clone owned by the caller). Raises ValueError naming what
    is wrong when the configuration does not fit the model."""
    dm = patcher.get_model_object("diffusion_model")
    fam, refs = model_blocks(dm)
    if fam is None:
        raise ValueError(f"{type(dm).__name__} is not a DiT family this cache knows")
    problems = config.problems(fam.name, len(refs))
    if problems:
        raise ValueError("; ".join(problems))
    ctl = DiTCache(fam, refs, config, on_run_end)
    install_block_hooks(patcher, fam, refs[ctl.start:ctl.end], ctl.block, ctl)
    patcher.add_wrapper_with_key("outer_sample", KEY, ctl.outer_sample)
    patcher.add_wrapper_with_key("apply_model", KEY, ctl.apply_model)
    return ctl
