"""T-GATE for ComfyUI's UNet models and PixArt: stop computing cross-attention after a gate step.

Semantics (T-GATE, Liu et al. 2024, and its v2 self-attention caching):
- before the gate, every attention runs normally; each cross-attention layer keeps its latest
  output averaged over the CFG chunks (cond and uncond), the quantity T-GATE caches;
- from the gate step on, cross-attention is not computed at all (projections included): each layer
  returns its cached average, for every chunk of the batch;
- since cond and uncond now see the same cross-attention, the unconditional pass is dropped after
  the gate (default): the sampler gets the conditional prediction for both, which is where T-GATE's
  speed comes from;
- optionally (v2), before the gate self-attention is computed only every `self_attn_interval`
  steps and reused in between.

Steps are counted from sigmas (second-order samplers call the model more than once per step).
Hooks: object patches replace each attention module of the clone by a view that shares its
projections (LoRA and device moves see them); an OUTER_SAMPLE wrapper holds the per-run state and
a CALC_COND_BATCH wrapper drops the unconditional pass; an APPLY_MODEL wrapper hands the call's
transformer_options to the views of models whose blocks do not receive them (PixArt).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from . import steps as step_counter
from .module_views import make_view

KEY = "comfyui-optim.tgate"
log = logging.getLogger("comfyui-optim")


@dataclass(frozen=True)
class TGateParams:
    gate_percent: float = 0.4
    gate_step: int = -1            # absolute gate step; -1: from gate_percent
    self_attn_interval: int = 0    # 0: off
    drop_uncond: bool = True

    def problems(self) -> list[str]:
        out = []
        if not 0.0 <= self.gate_percent <= 1.0:
            out.append(f"gate_percent must be within [0, 1], got {self.gate_percent}")
        if self.gate_step < -1:
            out.append(f"gate_step must be >= 0, or -1 to use gate_percent; got {self.gate_step}")
        if self.self_attn_interval < 0:
            out.append(f"self_attn_interval must be >= 0 (0 = off), got {self.self_attn_interval}")
        return out

    def gate(self, num_steps: int) -> int:
        """First step that uses the cached cross-attention (num_steps: never)."""
        if self.gate_step >= 0:
            return min(self.gate_step, num_steps)
        return min(int(round(self.gate_percent * num_steps)), num_steps)


@dataclass
class RunStats:
    cross_attn_computed: int = 0
    cross_attn_reused: int = 0
    self_attn_computed: int = 0
    self_attn_reused: int = 0
    uncond_passes_dropped: int = 0
    gate_step: int | None = None
    steps: int | None = None
    reused_steps: set = field(default_factory=set)   # steps where anything was reused or dropped
    clock: step_counter.StepClock = field(default_factory=step_counter.StepClock)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("reused_steps", "clock")}
        timed = self.clock.seconds
        d["hits"] = step_counter.hit_string({s: (1, int(s in self.reused_steps)) for s in timed}, self.steps)
        d["timed_speedup"] = self.clock.timed_speedup(s for s in timed if s not in self.reused_steps)
        return d


@dataclass(frozen=True)
class _Call:
    step: int
    gate: int
    chunks: tuple   # cond_or_uncond: one entry per CFG chunk of the batch


@dataclass
class _Run:
    cross: dict = field(default_factory=dict)   # layer -> CFG-averaged output [b, ...]
    self_attn: dict = field(default_factory=dict)  # (layer, chunks, shape) -> (step, output)
    stats: RunStats = field(default_factory=RunStats)


class TGate:
    def __init__(self, params: TGateParams, on_run_end=None):
        self.params, self.on_run_end = params, on_run_end
        self.run: _Run | None = None
        self.call: _Call | None = None
        self.last_stats: dict | None = None

    def __deepcopy__(self, memo):  # clones share the controller (see optim.deepcache)
        return self

    def _step_and_gate(self, transformer_options: dict) -> tuple[int | None, int | None]:
        step = step_counter.step_index(transformer_options)
        n = step_counter.num_steps(transformer_options)
        if step is None or n is None:
            return None, None
        gate = self.params.gate(n)
        if self.run is not None:
            self.run.stats.gate_step, self.run.stats.steps = gate, n
        return step, gate

    def _call_context(self, transformer_options: dict | None) -> _Call | None:
        if self.run is None or not transformer_options:
            return None
        step, gate = self._step_and_gate(transformer_options)
        if step is None:
            return None
        return _Call(step, gate, tuple(transformer_options.get("cond_or_uncond", ())))

    def _current(self, kwargs) -> _Call | None:
        # Set once per model call by the APPLY_MODEL wrapper (PixArt's blocks get no
        # transformer_options); attention driven outside it reads its own options.
        return self.call or self._call_context(kwargs.get("transformer_options"))

    # -- attention views -------------------------------------------------------------------------
    def cross_attention(self, view, layer: str, args, kwargs):
        original_forward = type(view.__dict__["_view_of"]).forward
        call = self._current(kwargs)
        if call is None:
            return original_forward(view, *args, **kwargs)
        run, x = self.run, args[0]
        chunks = max(len(call.chunks), 1)
        cached = run.cross.get(layer)
        if call.step >= call.gate and cached is not None and cached.shape[0] * chunks == x.shape[0] \
                and cached.shape[1:] == x.shape[1:]:  # cross-attention maps query_dim to query_dim
            run.stats.cross_attn_reused += 1
            run.stats.reused_steps.add(call.step)
            return cached.repeat(chunks, *([1] * (cached.dim() - 1)))
        out = original_forward(view, *args, **kwargs)
        run.stats.cross_attn_computed += 1
        if call.step < call.gate or cached is None:
            run.cross[layer] = out.reshape(chunks, -1, *out.shape[1:]).mean(dim=0)
        return out

    def self_attention(self, view, layer: str, args, kwargs):
        original_forward = type(view.__dict__["_view_of"]).forward
        call, k = self._current(kwargs), self.params.self_attn_interval
        if call is None or k <= 0 or call.step >= call.gate:
            return original_forward(view, *args, **kwargs)
        run = self.run
        key = (layer, call.chunks, tuple(args[0].shape))
        cached = run.self_attn.get(key)
        if call.step % k != 0 and cached is not None and cached[0] != call.step:
            run.stats.self_attn_reused += 1
            run.stats.reused_steps.add(call.step)
            return cached[1]
        out = original_forward(view, *args, **kwargs)
        run.stats.self_attn_computed += 1
        if call.step % k == 0:
            run.self_attn[key] = (call.step, out)
        return out

    # -- ComfyUI wrappers --------------------------------------------------------------------------
    def outer_sample(self, executor, *args, **kwargs):
        self.run = _Run()
        try:
            return executor(*args, **kwargs)
        finally:
            stats = self.run.stats.as_dict()
            self.run, self.last_stats = None, stats
            log.info("T-GATE (gate step %s of %s): cross-attention computed %d, reused %d; "
                     "self-attention reused %d; unconditional passes dropped %d",
                     stats["gate_step"], stats["steps"], stats["cross_attn_computed"],
                     stats["cross_attn_reused"], stats["self_attn_reused"],
                     stats["uncond_passes_dropped"])
            if self.on_run_end is not None:
                self.on_run_end(stats)

    def apply_model(self, executor, *args, **kwargs):
        """Work out the step, gate and batch layout once per model call, not once per layer."""
        self.call = call = self._call_context(args[5] if len(args) > 5 else kwargs.get("transformer_options"))
        started = time.perf_counter()
        try:
            out = executor(*args, **kwargs)
            if call is not None and self.run is not None:
                step_counter.sync(out)
                self.run.stats.clock.add(call.step, time.perf_counter() - started)
            return out
        finally:
            self.call = None

    def calc_cond_batch(self, executor, model, conds, x_in, timestep, model_options):
        """After the gate, run only the conditional pass and use it for the unconditional slot."""
        run = self.run
        if run is None or not self.params.drop_uncond or len(conds) < 2 or conds[1] is None:
            return executor(model, conds, x_in, timestep, model_options)
        to = dict(model_options.get("transformer_options", {}), sigmas=timestep)
        step, gate = self._step_and_gate(to)
        if step is None or step < gate or not run.cross:
            return executor(model, conds, x_in, timestep, model_options)
        out = executor(model, [conds[0], None, *conds[2:]], x_in, timestep, model_options)
        run.stats.uncond_passes_dropped += 1
        run.stats.reused_steps.add(step)
        return [out[0], out[0], *out[2:]]


def _view_forward(kind: str):
    def forward(self, *args, **kwargs):
        ctl, layer = self.__dict__["_tgate"], self.__dict__["_tgate_layer"]
        handler = ctl.cross_attention if kind == "cross" else ctl.self_attention
        return handler(self, layer, args, kwargs)
    return forward


_CROSS_FORWARD, _SELF_FORWARD = _view_forward("cross"), _view_forward("self")


# Adapters per family: the block class, its cross- and self-attention attributes.
BLOCKS = {"UNetModel": ("BasicTransformerBlock", "attn2", "attn1"),
          "PixArtMS": ("PixArtMSBlock", "cross_attn", "attn")}


def attention_layers(diffusion_model) -> tuple[list[str], list[str]]:
    """(cross-attention, self-attention) module paths of the model's transformer blocks."""
    cross, self_ = [], []
    adapter = BLOCKS.get(type(diffusion_model).__name__)
    if adapter is None:
        return cross, self_
    block_class, cross_attr, self_attr = adapter
    for name, module in diffusion_model.named_modules():
        if type(module).__name__ != block_class:
            continue
        if getattr(module, cross_attr, None) is not None and not getattr(module, "switch_temporal_ca_to_sa", False):
            cross.append(f"{name}.{cross_attr}")
        if getattr(module, self_attr, None) is not None:
            self_.append(f"{name}.{self_attr}")
    return cross, self_


def supports(diffusion_model) -> bool:
    return bool(attention_layers(diffusion_model)[0])


def attach(patcher, params: TGateParams, on_run_end=None) -> TGate:
    """Install T-GATE on `patcher` (a clone owned by the caller; `supports` was checked)."""
    dm = patcher.get_model_object("diffusion_model")
    ctl = TGate(params, on_run_end)
    cross, self_ = attention_layers(dm)
    if params.gate_step < 0 and params.gate_percent >= 1.0:
        return ctl  # the gate is never reached: install nothing, output is bit-identical
    for path, forward, tag in [(p, _CROSS_FORWARD, "TGateCross") for p in cross] + \
            ([(p, _SELF_FORWARD, "TGateSelf") for p in self_] if params.self_attn_interval > 0 else []):
        full = f"diffusion_model.{path}"
        original = patcher.get_model_object(full)
        if "_tgate" in original.__dict__:
            raise ValueError("T-GATE is already applied to this model; apply it once")
        patcher.add_object_patch(full, make_view(original, tag, {"forward": forward},
                                                 _tgate=ctl, _tgate_layer=path))
    patcher.add_wrapper_with_key("outer_sample", KEY, ctl.outer_sample)
    patcher.add_wrapper_with_key("apply_model", KEY, ctl.apply_model)
    patcher.add_wrapper_with_key("calc_cond_batch", KEY, ctl.calc_cond_batch)
    return ctl
