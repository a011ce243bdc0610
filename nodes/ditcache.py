"""DiT block caching nodes: OptimDiTCache (apply), OptimDiTCacheSearch (find a configuration for a
target speedup), OptimDiTCacheLoad (a saved configuration by name) and OptimDiTCacheConfig (a
configuration kept inline in the workflow, so a shared workflow carries it)."""
import logging
import math
from dataclasses import replace
from pathlib import Path

from comfy_api.latest import io, ui

from ..optim import ditcache, ditcache_search
from ..optim.cache_config_store import SUBDIR, ConfigStore, name_problem
from .messages import node_id_of, stats_sender

log = logging.getLogger("comfyui-optim")
CacheConfig = io.Custom("OPTIM_CACHE_CONFIG")


def config_store() -> ConfigStore:
    import folder_paths
    return ConfigStore(Path(folder_paths.get_user_directory()) / "default" / SUBDIR)


def _unsupported(node: str, model) -> str:
    dm = model.get_model_object("diffusion_model")
    config = getattr(model.model, "model_config", None)
    name = type(config).__name__ if config is not None else type(model.model).__name__
    return (f"{node}: {name} ({type(dm).__name__}) is not a DiT family the block "
            f"cache knows; the model passes through unchanged")


def _apply(cls, model, config: ditcache.DiTCacheConfig, node: str):
    """Clone `model` with the cache; ValueError (shown by ComfyUI) when the config does not fit."""
    dm = model.get_model_object("diffusion_model")
    fam, refs = ditcache.model_blocks(dm)
    if fam is None:
        log.warning(_unsupported(node, model))
        return model
    problems = config.problems(fam.name, len(refs))
    if problems:
        raise ValueError(f"{node}: " + "; ".join(problems))
    for m in config.mismatches(total_blocks=len(refs)):
        log.warning("%s: the configuration was made for other settings (%s)", node, m)
    patched = model.clone()
    ditcache.attach(patched, config, on_run_end=stats_sender(node_id_of(cls), "ditcache"))
    return patched


class OptimDiTCache(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OptimDiTCache",
            display_name="Optim DiT Block Cache",
            category="optim/caching",
            description="Skips a range of transformer blocks on some steps and adds the range's cached "
                        "delta instead. For Flux, Chroma, HunyuanVideo, Wan 2.1/2.2, LTXV, Qwen-Image, "
                        "SD3, Mochi, AuraFlow, HunYuanDiT, HiDream, Lumina 2, Cosmos and PixArt. A "
                        "connected config (from search, load or an inline config node) overrides the "
                        "widgets.",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("mode", options=list(ditcache.MODES), default="fixed",
                               tooltip="fixed: refresh every cache_step_interval steps. adaptive: reuse "
                                       "while the range's input changed less than threshold."),
                io.Int.Input("cache_block_start", default=1, min=0, max=1000,
                             tooltip="First cached block (Flux-like models: double blocks, then single "
                                     "blocks, in one index space)."),
                io.Int.Input("cache_num_blocks", default=-1, min=-1, max=1000,
                             tooltip="Number of cached blocks; -1: up to the last block but one."),
                io.Int.Input("cache_step_start", default=2, min=0, max=10000,
                             tooltip="Steps before this one run uncached (adaptive: warm-up)."),
                io.Int.Input("cache_step_interval", default=2, min=1, max=100,
                             tooltip="fixed: from cache_step_start, every n-th step refreshes the delta, "
                                     "the others reuse it; 1 never reuses."),
                io.Float.Input("threshold", default=0.15, min=0.001, max=10.0, step=0.005,
                               tooltip="adaptive: accumulated relative change of the range's input "
                                       "allowed before a refresh; higher is faster and less exact."),
                io.Int.Input("max_consecutive", default=3, min=1, max=100,
                             tooltip="adaptive: longest run of reused model calls."),
                io.Boolean.Input("force", default=False,
                                 tooltip="adaptive: also cache schedules under 8 steps (distilled "
                                         "models), where it otherwise steps aside."),
                io.Int.Input("delta_order", default=0, min=0, max=1, optional=True,
                             tooltip="0: reuse the delta of the last refresh (DitCacheAdaptor). 1: "
                                     "extrapolate it linearly (in sigma) from the last two refreshes."),
                CacheConfig.Input("config", optional=True,
                                  tooltip="A configuration from Search, Load or Config; overrides the "
                                          "widgets."),
            ],
            outputs=[io.Model.Output(display_name="model")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, mode, cache_num_blocks):
        # Only what ComfyUI cannot check itself: V3 combos, and 0 inside the allowed -1..1000.
        if mode not in ditcache.MODES:
            return f"mode must be one of {', '.join(ditcache.MODES)}, got {mode!r}"
        if cache_num_blocks == 0:
            return "cache_num_blocks is 0: the cached range is empty (use >= 1, or -1)"
        return True

    @classmethod
    def execute(cls, model, mode="fixed", cache_block_start=1, cache_num_blocks=-1, cache_step_start=2,
                cache_step_interval=2, threshold=0.15, max_consecutive=3, force=False, delta_order=0,
                config=None) -> io.NodeOutput:
        if config is None:
            config = ditcache.DiTCacheConfig(cache_block_start, cache_num_blocks, cache_step_start,
                                             cache_step_interval, mode, threshold, max_consecutive, force,
                                             delta_order)
        return io.NodeOutput(_apply(cls, model, config, "OptimDiTCache"))


def config_stats(config: ditcache.DiTCacheConfig, name: str | None = None) -> dict:
    """The badge of a configuration node (sent once when it runs): the configuration it gave, and
    what it was made for."""
    made_for = " ".join(str(v) for v in (config.family, f"{config.steps} steps" if config.steps else None,
                                         config.sampler) if v)
    out = {"note": ditcache_search.describe(config)}
    if made_for:
        out["made_for"] = made_for
    if name:
        out["name"] = name
    return out


class OptimDiTCacheConfig(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OptimDiTCacheConfig",
            display_name="Optim DiT Cache Config (inline)",
            category="optim/caching",
            description="A DiT cache configuration kept in the workflow itself: paste the JSON a search "
                        "printed (the frontend fills an empty one after a search), and the workflow "
                        "reproduces the caching anywhere, without saved files.",
            inputs=[io.String.Input("config_json", multiline=True, default="",
                                    tooltip="The configuration JSON from OptimDiTCacheSearch.")],
            outputs=[CacheConfig.Output(display_name="config")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, config_json):
        try:
            problems = ditcache.DiTCacheConfig.from_json(config_json).problems()
        except ValueError as e:
            return str(e)
        return "; ".join(problems) if problems else True

    @classmethod
    def execute(cls, config_json) -> io.NodeOutput:
        config = ditcache.DiTCacheConfig.from_json(config_json)
        stats_sender(node_id_of(cls), "ditcache_config")(config_stats(config))
        return io.NodeOutput(config)


class OptimDiTCacheLoad(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        names = config_store().names()
        return io.Schema(
            node_id="OptimDiTCacheLoad",
            display_name="Optim DiT Cache Load",
            category="optim/caching",
            description=f"A configuration saved by OptimDiTCacheSearch (user/default/{SUBDIR.as_posix()}).",
            inputs=[io.Combo.Input("name", options=names or [""],
                                   tooltip="Saved configurations; run a search with save_as to add one.")],
            outputs=[CacheConfig.Output(display_name="config")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, name):
        problem = name_problem(name)
        if problem:
            return problem
        try:
            config_store().load(name)
        except ValueError as e:
            return str(e)
        return True

    @classmethod
    def fingerprint_inputs(cls, name):
        path = config_store().folder / f"{name}.json"   # re-run when the saved file changes
        return path.stat().st_mtime if name_problem(name) is None and path.is_file() else None

    @classmethod
    def execute(cls, name) -> io.NodeOutput:
        config = config_store().load(name)
        stats_sender(node_id_of(cls), "ditcache_config")(config_stats(config, name))
        return io.NodeOutput(config)


def _samplers():
    import comfy.samplers
    return comfy.samplers.KSampler.SAMPLERS, comfy.samplers.KSampler.SCHEDULERS


def _calibration_sampler(positive, negative, latent, steps, cfg, sampler_name, scheduler):
    import comfy.sample

    def run(model, seed):
        latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
        noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
        return comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative,
                                   latent_image, noise_mask=latent.get("noise_mask"), disable_pbar=True,
                                   seed=seed)
    return run


def search_stats(result, config: ditcache.DiTCacheConfig) -> dict:
    """The search node's badge: configurations sampled, the one chosen (block range, from which step,
    how often refreshed), its measured speedup and PSNR against the uncached output. The samplings
    downstream with the chosen cache send their own `ditcache` stats from the same node."""
    b = result.best
    start, end = config.block_range(config.num_blocks) if config.num_blocks else (config.cache_block_start, None)
    out = {"configs_tried": len(result.evaluated), "candidates_scored": result.candidates_considered,
           "blocks": f"{start}..{end - 1}" + (f" of {config.num_blocks}" if config.num_blocks else "")
           if end else f"from {start}",
           "mode": config.mode, "cache_step_start": config.cache_step_start,
           "measured_speedup": round(b.measured_speedup, 3), "predicted_speedup": round(b.predicted_speedup, 3),
           "psnr_db": round(b.psnr, 2) if math.isfinite(b.psnr) else None, "ssim": round(b.ssim, 4), "reference_seconds": round(result.reference_seconds, 3)}
    if config.mode == "adaptive":
        out["threshold"] = config.threshold
    else:
        out["cache_step_interval"] = config.cache_step_interval
    return out


class OptimDiTCacheSearch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        samplers, schedulers = _samplers()
        return io.Schema(
            node_id="OptimDiTCacheSearch",
            display_name="Optim DiT Cache Search",
            category="optim/caching",
            description="Samples with these settings uncached, profiles every block, then tries the "
                        "cache configurations predicted to reach target_speedup and returns the one "
                        "closest to the uncached output, the model patched with it and a report. Set "
                        "save_as to keep it for OptimDiTCacheLoad.",
            inputs=[
                io.Model.Input("model"),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent_image"),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True),
                io.Int.Input("steps", default=20, min=2, max=10000),
                io.Float.Input("cfg", default=4.0, min=0.0, max=100.0, step=0.1, round=0.01),
                io.Combo.Input("sampler_name", options=list(samplers), default="euler"),
                io.Combo.Input("scheduler", options=list(schedulers), default="simple"),
                io.Float.Input("target_speedup", default=1.5, min=1.05, max=10.0, step=0.05),
                io.Int.Input("budget", default=4, min=1, max=64,
                             tooltip="Configurations sampled for real (each once per calibration seed)."),
                io.Int.Input("calibration_seeds", default=1, min=1, max=16,
                             tooltip="Seeds seed, seed+1, ...: more seeds keep the configuration from "
                                     "being tuned to one image."),
                io.String.Input("save_as", default="",
                                tooltip="Name to save the configuration under (empty: not saved)."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Allow replacing a saved configuration made for another model."),
            ],
            outputs=[io.Model.Output(display_name="model"), CacheConfig.Output(display_name="config"),
                     io.String.Output(display_name="report"), io.String.Output(display_name="config_json")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, sampler_name, scheduler, save_as):
        samplers, schedulers = _samplers()
        if sampler_name not in samplers:
            return f"sampler_name {sampler_name!r} is not a ComfyUI sampler"
        if scheduler not in schedulers:
            return f"scheduler {scheduler!r} is not a ComfyUI scheduler"
        if save_as:
            problem = name_problem(save_as)
            if problem:
                return problem
        return True

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler,
                target_speedup=1.5, budget=4, calibration_seeds=1, save_as="", overwrite=False) -> io.NodeOutput:
        import comfy.utils
        dm = model.get_model_object("diffusion_model")
        if not ditcache.supports(dm):   # say so, pass the model through, run nothing
            report = _unsupported("OptimDiTCacheSearch", model) + " (nothing was searched)"
            log.warning(report)
            config = ditcache.DiTCacheConfig()
            return io.NodeOutput(model, config, report, config.to_json(), ui={"text": [report]})
        bar = comfy.utils.ProgressBar(1, node_id=node_id_of(cls))
        result = ditcache_search.search(
            model, _calibration_sampler(positive, negative, latent_image, steps, cfg, sampler_name, scheduler),
            seeds=[seed + i for i in range(calibration_seeds)], target_speedup=target_speedup, budget=budget,
            progress=lambda done, total: bar.update_absolute(done, total))
        config = replace(result.best.config, sampler=sampler_name, scheduler=scheduler)
        report = result.report()
        if save_as:
            path, note = config_store().save(save_as, config, overwrite=overwrite)
            report += f"\nsaved as {save_as!r} ({path})" + (f"; {note}" if note else "")
        log.info(report)
        stats_sender(node_id_of(cls), "ditcache_search")(search_stats(result, config))
        patched = _apply(cls, model, config, "OptimDiTCacheSearch")
        return io.NodeOutput(patched, config, report, config.to_json(),
                             ui={"text": [report], "config_json": [config.to_json()]})
