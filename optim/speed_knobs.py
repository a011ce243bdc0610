"""Speed knobs from the diffusers memory guide, the ComfyUI way, per model clone:

- attention backend: ComfyUI's `optimized_attention_override` in transformer_options routes every
  attention call of the model (UNet and DiT families that pass transformer_options down) to a
  function ComfyUI registered (`comfy.ldm.modules.attention.get_attention_function`): PyTorch SDPA,
  sub-quadratic, split, and xformers / flash-attn / SageAttention when they are installed;
- channels_last: the UNet's 4-D conv weights (and its input) in NHWC memory layout, installed as a
  `PatcherInjection` (new Parameters on the clone, originals back on eject: the shared modules and
  other branches keep their layout and their bit-exact outputs).

`torch.jit.trace` from the guide is superseded by ComfyUI's own TorchCompileModel node (a
DIFFUSION_MODEL wrapper that compiles the forward); the pack's nodes compose with it in either order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import weight_swap

ATTENTION_KEY = "optimized_attention_override"
# node choice -> name in ComfyUI's attention registry
BACKENDS = {"pytorch_sdpa": "pytorch", "sub_quadratic": "sub_quad", "split": "split",
            "xformers": "xformers", "flash_attn": "flash", "sage_attention": "sage"}
INSTALL_HINT = {"xformers": "pip install xformers", "flash_attn": "pip install flash-attn",
                "sage_attention": "pip install sageattention"}
CHANNELS_LAST_KEY = "comfyui-optim.channels_last"


def available_backends() -> dict[str, bool]:
    from comfy.ldm.modules import attention
    return {choice: attention.get_attention_function(name, None) is not None for choice, name in BACKENDS.items()}


def backend_problem(choice: str) -> str | None:
    if choice not in BACKENDS:
        return f"attention backend must be one of {list(BACKENDS)}, got {choice!r}"
    if not available_backends()[choice]:
        return (f"attention backend {choice!r} is not installed in this ComfyUI (or was disabled at "
                f"start-up); {INSTALL_HINT.get(choice, '')}; installed: "
                f"{[c for c, ok in available_backends().items() if ok]}")
    return None


@dataclass
class AttentionOverride:
    """transformer_options['optimized_attention_override']: calls the chosen registered function
    in place of whichever one the model would have used. Counts the calls of each sampling run
    (an OUTER_SAMPLE wrapper opens and closes the run) and hands them to `on_run_end`."""
    backend: str
    calls: int = 0
    on_run_end: object = None

    def __deepcopy__(self, memo):
        # ModelPatcher.clone() deep-copies model_options: clones keep routing through this counter
        return self

    def __call__(self, default_fn, *args, **kwargs):
        from comfy.ldm.modules import attention
        self.calls += 1
        return attention.get_attention_function(BACKENDS[self.backend])(*args, **kwargs)

    def run_stats(self) -> dict:
        return {"backend": self.backend, "attention_calls": self.calls}

    def outer_sample(self, executor, *args, **kwargs):
        self.calls = 0
        try:
            return executor(*args, **kwargs)
        finally:
            if self.on_run_end is not None:
                self.on_run_end(self.run_stats())


def set_attention_backend(patcher, choice: str, on_run_end=None) -> AttentionOverride:
    problem = backend_problem(choice)
    if problem:
        raise ValueError(problem)
    override = AttentionOverride(choice, on_run_end=on_run_end)
    patcher.model_options.setdefault("transformer_options", {})[ATTENTION_KEY] = override
    from comfy.patcher_extension import WrappersMP
    patcher.remove_wrappers_with_key(WrappersMP.OUTER_SAMPLE, ATTENTION_KEY)
    patcher.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, ATTENTION_KEY, override.outer_sample)
    return override


@dataclass
class ChannelsLast:
    """Injection: 4-D conv weights of the diffusion model in channels_last layout, on this clone.
    Also the DIFFUSION_MODEL wrapper (NHWC input) and the run's call count for `on_run_end`."""
    converted: int = 0
    calls: int = 0
    on_run_end: object = None

    def __deepcopy__(self, memo):
        return self   # clones deep-copy the wrappers: they keep this one state

    def inject(self, patcher) -> None:
        offload = patcher.offload_device
        n = 0
        with torch.no_grad():
            for m in patcher.model.diffusion_model.modules():
                w = m._parameters.get("weight") if isinstance(m, torch.nn.Conv2d) else None
                if w is None or w.dim() != 4 or w.is_contiguous(memory_format=torch.channels_last):
                    continue
                on_accelerator = offload is not None and w.device != torch.device(offload)
                weight_swap.swap(patcher.model, m, torch.nn.Parameter(
                    w.detach().contiguous(memory_format=torch.channels_last), requires_grad=False),
                    offload_device=offload if on_accelerator else None)
                n += 1
        self.converted = n

    def eject(self, patcher) -> None:
        weight_swap.restore_all(patcher.model)

    def diffusion_model(self, executor, x, *args, **kwargs):
        self.calls += 1
        return input_to_channels_last(executor, x, *args, **kwargs)

    def run_stats(self, patcher) -> dict:
        convs = sum(1 for m in patcher.model.diffusion_model.modules() if isinstance(m, torch.nn.Conv2d))
        nhwc = sum(1 for m in patcher.model.diffusion_model.modules()
                   if isinstance(m, torch.nn.Conv2d) and m.weight.dim() == 4
                   and m.weight.is_contiguous(memory_format=torch.channels_last))
        return {"conv_layers": convs, "convs_channels_last": nhwc, "calls": self.calls}

    def outer_sample(self, executor, *args, **kwargs):
        self.calls = 0
        try:
            return executor(*args, **kwargs)
        finally:
            if self.on_run_end is not None:
                self.on_run_end(self.run_stats(executor.class_obj.model_patcher))


def input_to_channels_last(executor, x, *args, **kwargs):
    """DIFFUSION_MODEL wrapper: NHWC input in, the usual contiguous layout out."""
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    out = executor(x, *args, **kwargs)
    return out.contiguous() if isinstance(out, torch.Tensor) else out


def set_channels_last(patcher, on_run_end=None) -> ChannelsLast:
    from comfy.patcher_extension import PatcherInjection, WrappersMP
    state = ChannelsLast(on_run_end=on_run_end)
    patcher.set_injections(CHANNELS_LAST_KEY, [PatcherInjection(inject=state.inject, eject=state.eject)])
    patcher.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, CHANNELS_LAST_KEY, state.diffusion_model)
    patcher.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, CHANNELS_LAST_KEY, state.outer_sample)
    return state
