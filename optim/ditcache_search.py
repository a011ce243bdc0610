"""Search for a fixed DiT cache configuration that reaches a target speedup with the least error.

1. Reference: sample uncached with each calibration seed (the fidelity targets), and time one
   seed again once the model is loaded.
2. Profile: one more uncached sampling with every block hooked: each block's time, each call's
   time, and at every step the hidden state entering and leaving each block (a fixed subset of
   tokens, enough to compare deltas).
3. Candidates: every (block range, first cached step, interval). The profile predicts each one's
   time (a call that reuses the range saves exactly the range's timed blocks) and its error proxy:
   how far the range's delta at each reused step is from the delta at its refresh step, relative to
   the hidden state's size.
4. Evaluation: the candidates predicted to land in [target, 1.1 x target) with the lowest error
   proxy are sampled for real with every calibration seed, `budget` of them at most, timed and
   compared with the references (PSNR, SSIM of the latents). The best PSNR among those whose
   measured speedup reaches 0.9 x target wins; if none does, the fastest measured one.

Plain torch: the caller supplies `sample(patcher, seed) -> latent`, so this runs under ComfyUI's
sampler in the node and under anything in tests.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace

import torch

from . import ditcache, metrics
from . import steps as step_counter

log = logging.getLogger("comfyui-optim")
MAX_INTERVAL = 5
TOKENS_KEPT = 64


@dataclass
class Profile:
    steps: int
    block_time: list[float]                       # seconds per call, per block
    call_time: float                              # seconds per model call
    calls: int
    states: dict = field(default_factory=dict)    # (step, block) -> (input, output) token subsets


@dataclass(frozen=True)
class Candidate:
    config: ditcache.DiTCacheConfig
    predicted_speedup: float
    error_proxy: float


@dataclass
class Evaluation:
    config: ditcache.DiTCacheConfig
    predicted_speedup: float
    measured_speedup: float
    psnr: float
    ssim: float

    def as_dict(self) -> dict:
        return {"config": {k: v for k, v in self.config.__dict__.items()},
                "predicted_speedup": round(self.predicted_speedup, 3),
                "measured_speedup": round(self.measured_speedup, 3),
                "psnr": self.psnr, "ssim": round(self.ssim, 4)}


@dataclass
class SearchResult:
    best: Evaluation
    evaluated: list[Evaluation]
    candidates_considered: int
    reference_seconds: float

    def report(self) -> str:
        b, c = self.best, self.best.config
        lines = [f"DiT cache search: blocks {c.cache_block_start}..{c.cache_block_start + c.cache_num_blocks - 1}"
                 f" of {c.num_blocks}, cached from step {c.cache_step_start}, refresh every "
                 f"{c.cache_step_interval} steps",
                 f"speedup {b.measured_speedup:.2f}x measured ({b.predicted_speedup:.2f}x from the blocks "
                 f"skipped), PSNR {b.psnr:.2f} dB, SSIM {b.ssim:.4f} against the uncached output",
                 f"{len(self.evaluated)} of {self.candidates_considered} candidate configurations sampled"]
        return "\n".join(lines)


def latent_ssim(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """SSIM of latents ([B, C, H, W] or [B, C, T, H, W]) with channels as image channels."""
    ref, cand = reference.movedim(1, -1), candidate.movedim(1, -1)
    rng = float(reference.max() - reference.min()) or 1.0
    return metrics.ssim(ref, cand, data_range=rng)


class _Recorder:
    """Times every block and keeps a token subset of its input and output at each step."""

    def __init__(self):
        self.step: int | None = None
        self.first_call_of_step = False
        self.seen_steps: set = set()
        self.block_time: dict[int, list[float]] = {}
        self.call_times: list[float] = []
        self.states: dict = {}
        self.steps: int | None = None

    @staticmethod
    def _subset(t):
        if not isinstance(t, torch.Tensor):
            return None
        flat = t[:1].reshape(1, -1, t.shape[-1]).float()
        n = flat.shape[1]
        idx = torch.linspace(0, n - 1, min(TOKENS_KEPT, n), device=t.device).long()
        return flat[0, idx].detach().cpu()

    def block(self, ref, streams, run_original):
        ditcache._sync(streams.get("img"))
        t0 = time.perf_counter()
        out = run_original()
        ditcache._sync(out.get("img"))
        self.block_time.setdefault(ref.index, []).append(time.perf_counter() - t0)
        if self.first_call_of_step:
            self.states[(self.step, ref.index)] = (self._subset(streams.get("img")), self._subset(out.get("img")))
        return out

    def apply_model(self, executor, *args, **kwargs):
        to = args[5] if len(args) > 5 else kwargs.get("transformer_options", {})
        self.step = step_counter.step_index(to or {})
        self.steps = step_counter.num_steps(to or {}) or self.steps
        self.first_call_of_step = self.step is not None and self.step not in self.seen_steps
        self.seen_steps.add(self.step)
        t0 = time.perf_counter()
        try:
            return executor(*args, **kwargs)
        finally:
            self.call_times.append(time.perf_counter() - t0)


def profile(patcher, sample) -> Profile:
    dm = patcher.get_model_object("diffusion_model")
    fam, refs = ditcache.model_blocks(dm)
    rec = _Recorder()
    hooked = patcher.clone()
    ditcache.install_block_hooks(hooked, fam, refs, rec.block, rec)
    hooked.add_wrapper_with_key("apply_model", ditcache.KEY + ".profile", rec.apply_model)
    sample(hooked)
    if not rec.call_times or rec.steps is None:
        raise RuntimeError("the calibration sampling made no model call")
    block_time = [sum(v) / len(v) for _, v in sorted(rec.block_time.items())]
    return Profile(rec.steps, block_time, sum(rec.call_times) / len(rec.call_times), len(rec.call_times),
                   rec.states)


def predicted_speedup(prof: Profile, cfg: ditcache.DiTCacheConfig) -> float:
    """Uncached time over cached time, from the timed blocks: a reused call skips its range."""
    start, end = cfg.block_range(len(prof.block_time))
    reused = sum(1 for s in range(cfg.cache_step_start, prof.steps)
                 if (s - cfg.cache_step_start) % cfg.cache_step_interval != 0)
    calls_per_step = prof.calls / prof.steps
    total = prof.calls * prof.call_time
    saved = reused * calls_per_step * sum(prof.block_time[start:end])
    return total / max(total - saved, 1e-9)


class _ErrorModel:
    """Error proxy of caching blocks [a, b] at step t with the delta of refresh step r: the
    relative distance between the two deltas, summed per block list (a range crossing lists is
    cached as one delta per list)."""

    def __init__(self, prof: Profile, segment_of: list[int]):
        self.prof, self.segment_of = prof, segment_of
        self._pair_cache: dict = {}

    def _delta(self, step, a, b):
        return self.prof.states[(step, b)][1] - self.prof.states[(step, a)][0]

    def range_error(self, t: int, r: int, a: int, b: int) -> float:
        key = (t, r, a, b)
        if key not in self._pair_cache:
            err = 0.0
            lo = a
            for i in range(a, b + 1):   # split at block-list boundaries
                if i == b or self.segment_of[i + 1] != self.segment_of[i]:
                    if (t, lo) in self.prof.states and (r, lo) in self.prof.states:
                        d_t, d_r = self._delta(t, lo, i), self._delta(r, lo, i)
                        scale = self.prof.states[(t, i)][1].norm().clamp_min(1e-12)
                        err += float((d_t - d_r).norm() / scale) ** 2
                    lo = i + 1
            self._pair_cache[key] = err
        return self._pair_cache[key]

    def config_error(self, cfg: ditcache.DiTCacheConfig, total_blocks: int) -> float:
        a, end = cfg.block_range(total_blocks)
        total = 0.0
        for t in range(cfg.cache_step_start, self.prof.steps):
            offset = (t - cfg.cache_step_start) % cfg.cache_step_interval
            if offset:
                total += self.range_error(t, t - offset, a, end - 1)
        return math.sqrt(total)


def candidates(prof: Profile, base: ditcache.DiTCacheConfig, segment_of: list[int], target: float,
               tolerance: float = 0.1) -> list[Candidate]:
    """Configurations predicted to land in [target, (1 + tolerance) x target), lowest error first;
    when none lands there, the fastest predicted ones."""
    n, steps = len(prof.block_time), prof.steps
    model = _ErrorModel(prof, segment_of)
    inside, others = [], []
    for interval in range(2, MAX_INTERVAL + 1):
        for step_start in range(1, max(steps - 1, 2)):
            for a in range(n):
                for count in range(1, n - a + 1):
                    cfg = replace(base, mode="fixed", cache_block_start=a, cache_num_blocks=count,
                                  cache_step_start=step_start, cache_step_interval=interval)
                    speed = predicted_speedup(prof, cfg)
                    if speed < target:
                        others.append((speed, cfg))
                        continue
                    if speed < target * (1 + tolerance):
                        inside.append(Candidate(cfg, speed, model.config_error(cfg, n)))
    if inside:
        return sorted(inside, key=lambda c: c.error_proxy)
    others.sort(key=lambda sc: -sc[0])
    return [Candidate(cfg, speed, math.inf) for speed, cfg in others[:8]]


@dataclass
class Calibration:
    """The uncached references and the block profile a search compares against; one calibration
    serves searches for several targets."""
    seeds: list[int]
    references: list[torch.Tensor]
    reference_seconds: float
    profile: Profile


def _timed(sample, patcher, seed):
    t0 = time.perf_counter()
    out = sample(patcher, seed)
    return out, time.perf_counter() - t0


def calibrate(patcher, sample, seeds: list[int], tick=lambda: None) -> Calibration:
    references, seconds = [], 0.0
    for seed in seeds:
        out, s = _timed(sample, patcher, seed)
        references.append(out)
        seconds += s
        tick()
    prof = profile(patcher, lambda p: sample(p, seeds[0]))
    tick()
    # the first sampling also loaded the model: time one seed again, warm
    _, warm = _timed(sample, patcher, seeds[0])
    tick()
    return Calibration(list(seeds), references, warm * len(seeds), prof)


def search(patcher, sample, seeds: list[int], target_speedup: float = 1.5, budget: int = 4,
           base: ditcache.DiTCacheConfig | None = None, progress=None,
           calibration: Calibration | None = None) -> SearchResult:
    """`sample(patcher, seed) -> latent`; `progress(done, total)` after every sampling."""
    if target_speedup <= 1.0:
        raise ValueError(f"target_speedup must be > 1, got {target_speedup}")
    if budget < 1 or not seeds:
        raise ValueError("the search needs a budget >= 1 and at least one calibration seed")
    dm = patcher.get_model_object("diffusion_model")
    fam, refs = ditcache.model_blocks(dm)
    if fam is None:
        raise ValueError(f"{type(dm).__name__} is not a DiT family this cache knows")
    total_runs = len(seeds) * budget + (0 if calibration else len(seeds) + 2)
    done = [0]

    def tick():
        done[0] += 1
        if progress is not None:
            progress(done[0], total_runs)

    calib = calibration or calibrate(patcher, sample, seeds, tick)
    prof = calib.profile
    base = replace(base or ditcache.DiTCacheConfig(), family=fam.name, num_blocks=len(refs), steps=prof.steps)
    ranked = candidates(prof, base, [r.segment for r in refs], target_speedup)
    evaluated = []
    for cand in ranked[:budget]:
        cached = patcher.clone()
        ditcache.attach(cached, cand.config)
        outs, seconds = [], 0.0
        for seed in calib.seeds:
            out, s = _timed(sample, cached, seed)
            outs.append(out)
            seconds += s
            tick()
        ref_all, out_all = torch.cat(calib.references), torch.cat(outs)
        evaluated.append(Evaluation(cand.config, cand.predicted_speedup,
                                    calib.reference_seconds / max(seconds, 1e-9),
                                    metrics.psnr(ref_all, out_all), latent_ssim(ref_all, out_all)))
        log.info("DiT cache search: %s -> predicted %.2fx, measured %.2fx, PSNR %.2f dB",
                 cand.config.__dict__, cand.predicted_speedup, evaluated[-1].measured_speedup,
                 evaluated[-1].psnr)
    if progress is not None:
        progress(total_runs, total_runs)
    if not evaluated:
        raise RuntimeError("no cache configuration fits this model and schedule")
    reaching = [e for e in evaluated if e.measured_speedup >= 0.9 * target_speedup]
    best = max(reaching, key=lambda e: e.psnr) if reaching else max(evaluated, key=lambda e: e.measured_speedup)
    return SearchResult(best, evaluated, len(ranked), calib.reference_seconds)
