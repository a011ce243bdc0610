"""Which sampling step a model call belongs to, counted from sigmas rather than from calls.

Second-order samplers (heun, dpmpp_2s_ancestral, ...) call the model more than once per step, and
ComfyUI may split cond and uncond into separate calls, so counting calls miscounts steps. ComfyUI
puts the whole schedule (`sample_sigmas`) and the current sigma of each batch item (`sigmas`) into
transformer_options; the step is the schedule entry nearest to the current sigma.
"""
from __future__ import annotations

import torch


def step_index(transformer_options: dict) -> int | None:
    """Index of the current step in the run's schedule, or None outside a sampling run."""
    schedule = transformer_options.get("sample_sigmas")
    sigmas = transformer_options.get("sigmas")
    if schedule is None or sigmas is None:
        return None
    sigma = sigmas.detach().flatten()[0].to(schedule.device, schedule.dtype)
    return int(torch.argmin((schedule - sigma).abs()))


def num_steps(transformer_options: dict) -> int | None:
    schedule = transformer_options.get("sample_sigmas")
    return None if schedule is None else max(len(schedule) - 1, 1)


def hit_string(per_step: dict, steps: int | None = None) -> str:
    """One character per sampling step, for the frontend's hit strip and the log: '1' when every
    model call of the step reused cached work, '0' when none did, 'p' when some did, '-' when the
    step saw no call. `per_step` maps step -> (calls, calls that reused)."""
    known = [s for s in per_step if s is not None]
    n = max(steps or 0, max(known) + 1 if known else 0)
    chars = []
    for s in range(n):
        calls, reused = per_step.get(s, (0, 0))
        chars.append("-" if calls == 0 else "1" if reused == calls else "0" if reused == 0 else "p")
    return "".join(chars)


class StepClock:
    """Wall time of the model calls of each sampling step, to measure what reuse saved: a step
    that ran in full shows what every step would have cost without the cache.

    CUDA work is asynchronous, so each timed call ends with a sync of its output's device (once per
    model call, negligible next to the call)."""

    def __init__(self):
        self.seconds: dict[int, float] = {}

    def add(self, step: int | None, seconds: float) -> None:
        if step is not None:
            self.seconds[step] = self.seconds.get(step, 0.0) + seconds

    def timed_speedup(self, full_steps) -> float | None:
        """Time the run would have taken with every step in full over the time it took, or None
        when no step ran in full. The first step (allocations, lazy loads) stands in for the mean
        only when no other full step was timed."""
        full = sorted(s for s in full_steps if s in self.seconds)
        if not full or not self.seconds:
            return None
        sample = full[1:] or full
        per_step = sum(self.seconds[s] for s in sample) / len(sample)
        took = sum(self.seconds.values())
        return round(per_step * len(self.seconds) / took, 3) if took > 0 else None


def sync(t) -> None:
    """Wait for the device work that produces `t` (CUDA only; CPU work is already done)."""
    if isinstance(t, torch.Tensor) and t.device.type == "cuda":
        torch.cuda.synchronize(t.device)
