"""Search for a fixed DiT cache configuration that reaches a target speedup with the least error.

1. Reference: sample uncached with each calibration seed (the fidelity targets), and time one
   seed again once the model is loaded.
2. Profile: one more uncached sampling with every block hooked: each block's time, each call's
   time, and at every step the hidden state entering and leaving each block (a fixed subset of
   tokens, enough to compare deltas).
3. Candidates: every (block range, first cached step, interval, delta order). The profile predicts
   each one's time (a call that reuses the range saves exactly the range's timed blocks) and its
   error proxy: how far the range's delta at each reused step is from what the cache adds instead
   (the refresh step's delta, or its extrapolation from the two last refreshes), relative to the
   hidden state's size.
4. Evaluation, `budget` samplings per calibration seed: half go to the fixed candidates predicted
   to land in [target, 1.1 x target) with the lowest error proxy (at most one per kind of schedule
   while others remain), half to the adaptive mode, its threshold moved until a run lands in that
   window. Each is timed and compared with the references (PSNR, SSIM of the latents). The best
   PSNR among those that reach the target (0.95 x by the profile's block times and 0.9 x by the
   clock) wins; if none does, the fastest.

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
    step_weight: list = field(default_factory=list)  # per step: its share of the sigma range (1 = mean)
    sigmas: list = field(default_factory=list)        # the schedule (empty: unknown, steps are evenly spaced)


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
        lines = [f"DiT cache search: {describe(c)}",
                 f"speedup {b.measured_speedup:.2f}x measured ({b.predicted_speedup:.2f}x from the blocks "
                 f"skipped), PSNR {b.psnr:.2f} dB, SSIM {b.ssim:.4f} against the uncached output",
                 f"{len(self.evaluated)} configurations sampled ({self.candidates_considered} fixed "
                 f"candidates scored)"]
        return "\n".join(lines)


def describe(c: ditcache.DiTCacheConfig) -> str:
    start, end = c.block_range(c.num_blocks) if c.num_blocks else (c.cache_block_start, None)
    blocks = f"blocks {start}..{end - 1}" + (f" of {c.num_blocks}" if c.num_blocks else "") if end else \
        f"blocks from {start}"
    if c.mode == "adaptive":
        return (f"{blocks}, adaptive (threshold {c.threshold:g}, at most {c.max_consecutive} reuses in a row, "
                f"from step {c.cache_step_start})")
    return (f"{blocks}, cached from step {c.cache_step_start}, refresh every {c.cache_step_interval} steps"
            + (", delta extrapolated" if c.delta_order else ""))


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
        self.schedule = None

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
        if self.schedule is None and (to or {}).get("sample_sigmas") is not None:
            self.schedule = to["sample_sigmas"].detach().float().cpu()
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
                   rec.states, step_weights(rec.schedule, rec.steps),
                   [] if rec.schedule is None else [float(x) for x in rec.schedule])


def step_weights(schedule, steps: int) -> list[float]:
    """How much an error in step t's prediction moves the result: a first-order sampler moves the
    latent by (sigma_t - sigma_t+1) x prediction, so steps weigh by their sigma decrement."""
    if schedule is None or len(schedule) < steps + 1:
        return [1.0] * steps
    d = (schedule[:steps] - schedule[1:steps + 1]).abs()
    mean = float(d.mean()) or 1.0
    return [float(x) / mean for x in d]


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
    """Error proxy of a cached range [a, b] at step t: the relative distance between the range's
    true delta at t and what the cache adds instead (the delta of the refresh step, or its linear
    extrapolation from the two last refreshes), summed per block list (a range crossing lists is
    cached as one delta per list)."""

    def __init__(self, prof: Profile, segment_of: list[int]):
        self.prof, self.segment_of = prof, segment_of
        self._memo: dict = {}

    def _delta(self, step, a, b):
        return self.prof.states[(step, b)][1] - self.prof.states[(step, a)][0]

    def range_error(self, t: int, used: tuple, a: int, b: int) -> float:
        """`used`: ((step, weight), ...), the combination of refresh deltas the cache adds at t."""
        key = (t, used, a, b)
        if key not in self._memo:
            err, lo = 0.0, a
            for i in range(a, b + 1):   # split at block-list boundaries
                if i == b or self.segment_of[i + 1] != self.segment_of[i]:
                    if all((s, lo) in self.prof.states for s in (t, *[s for s, _ in used])):
                        approx = sum(w * self._delta(s, lo, i) for s, w in used)
                        scale = self.prof.states[(t, i)][1].norm().clamp_min(1e-12)
                        err += float((self._delta(t, lo, i) - approx).norm() / scale) ** 2
                    lo = i + 1
            self._memo[key] = err
        return self._memo[key]

    def _position(self, a: int, b: int) -> float:
        sig = self.prof.sigmas
        if len(sig) > max(a, b) and sig[a] != sig[b]:
            return sig[a] - sig[b]
        return float(a - b)

    def config_error(self, cfg: ditcache.DiTCacheConfig, total_blocks: int) -> float:
        a, end = cfg.block_range(total_blocks)
        total, start, k = 0.0, cfg.cache_step_start, cfg.cache_step_interval
        for t in range(start, self.prof.steps):
            offset = (t - start) % k
            if not offset:
                continue
            r = t - offset
            r0 = r - k if r - k >= start else r - 1   # steps before the start all refresh
            if cfg.delta_order == 1 and r0 >= 0:
                f = self._position(t, r) / self._position(r, r0)   # as the cache does: in sigma
                used = ((r, 1.0 + f), (r0, -f))
            else:
                used = ((r, 1.0),)
            weight = self.prof.step_weight[t] if t < len(self.prof.step_weight) else 1.0
            total += weight ** 2 * self.range_error(t, used, a, end - 1)
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
                        for order in (0, 1):
                            c = replace(cfg, delta_order=order)
                            inside.append(Candidate(c, speed, model.config_error(c, n)))
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

    def evaluate(config, predicted=None):
        cached = patcher.clone()
        ctl = ditcache.attach(cached, config)
        outs, seconds = [], 0.0
        for seed in calib.seeds:
            out, s = _timed(sample, cached, seed)
            outs.append(out)
            seconds += s
            tick()
        if predicted is None:   # adaptive: what it skipped, costed with the profile's block times
            predicted = realised_speedup(prof, ctl)
        ref_all, out_all = torch.cat(calib.references), torch.cat(outs)
        e = Evaluation(config, predicted, calib.reference_seconds / max(seconds, 1e-9),
                       metrics.psnr(ref_all, out_all), latent_ssim(ref_all, out_all))
        evaluated.append(e)
        log.info("DiT cache search: %s -> predicted %.2fx, measured %.2fx, PSNR %.2f dB",
                 config.__dict__, e.predicted_speedup, e.measured_speedup, e.psnr)
        return e

    adaptive_budget = budget // 2 if prof.steps >= ditcache.FEW_STEPS else 0
    for cand in with_anchor(ranked, len(refs), budget - adaptive_budget):
        evaluate(cand.config, cand.predicted_speedup)
    probe_adaptive(base, target_speedup, adaptive_budget, evaluate)
    if progress is not None:
        progress(total_runs, total_runs)
    if not evaluated:
        raise RuntimeError("no cache configuration fits this model and schedule")
    # reaching the target: by the profile's block times and, since timing is noisy, by the clock
    reaching = [e for e in evaluated if e.predicted_speedup >= 0.95 * target_speedup
                and e.measured_speedup >= 0.9 * target_speedup]
    best = max(reaching, key=lambda e: e.psnr) if reaching else max(evaluated, key=lambda e: e.predicted_speedup)
    return SearchResult(best, evaluated, len(ranked), calib.reference_seconds)


def diverse(ranked: list[Candidate], n: int) -> list[Candidate]:
    """The n best-scored candidates, at most one per (interval, delta order) while others remain:
    the proxy ranks well within a kind of schedule, less well across kinds."""
    picked, kinds = [], set()
    for c in ranked:
        kind = (c.config.cache_step_interval, c.config.delta_order)
        if kind not in kinds and len(picked) < n:
            picked.append(c)
            kinds.add(kind)
    for c in ranked:
        if len(picked) >= n:
            break
        if c not in picked:
            picked.append(c)
    return picked


def with_anchor(ranked: list[Candidate], total_blocks: int, n: int) -> list[Candidate]:
    """`diverse(ranked, n)`, led by the best-scored candidate that caches everything but the first
    and last block (refreshed as often as the target allows): the shape that did best by measured
    PSNR in our sweeps, which the proxy alone does not always rank first."""
    first = 1 if total_blocks >= 4 else 0
    wide = [c for c in ranked if c.config.block_range(total_blocks) == (first, total_blocks - 1)]
    if not wide or n < 2:
        return diverse(ranked, n)
    anchor = min(wide, key=lambda c: (c.config.cache_step_interval, c.error_proxy))
    return [anchor] + diverse([c for c in ranked if c is not anchor], n - 1)


def realised_speedup(prof: Profile, ctl: ditcache.DiTCache) -> float:
    """Speedup of a cached run (its last sampling), from what it skipped and the profile's block
    times."""
    stats = ctl.last_stats or {}
    total = (stats.get("calls") or prof.calls) * prof.call_time
    saved = stats.get("calls_cached", 0) * sum(prof.block_time[ctl.start:ctl.end])
    return total / max(total - saved, 1e-9)


def probe_adaptive(base: ditcache.DiTCacheConfig, target: float, budget: int, evaluate) -> None:
    """Adaptive mode over the same range as the fixed default, its threshold moved geometrically
    until a run lands within [target, 1.1 x target) by the profile's block times."""
    lo, hi, threshold = None, None, 0.2
    first = 1 if (base.num_blocks or 0) >= 4 else 0   # keep the first block computed when there are enough
    for _ in range(budget):
        e = evaluate(replace(base, mode="adaptive", threshold=threshold, cache_block_start=first,
                             cache_num_blocks=-1, cache_step_start=2, max_consecutive=3, delta_order=0))
        if e.predicted_speedup < target:
            lo = threshold
        elif e.predicted_speedup >= target * 1.1:
            hi = threshold
        else:
            return
        threshold = math.sqrt(lo * hi) if lo is not None and hi is not None else \
            (threshold * 2.5 if hi is None else threshold / 2.5)
