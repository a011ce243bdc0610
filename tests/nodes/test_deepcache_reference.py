"""Reference equivalence: OptimDeepCache on a ComfyUI UNet gives, step by step, what the reference
`DeepCache` package (DeepCacheSDHelper) gives on the same UNet built in diffusers."""
import math

import pytest
import torch

from bench import factory

diffusers = pytest.importorskip("diffusers", reason="reference test needs diffusers (make setup installs it)")
reference = pytest.importorskip("DeepCache.extension.deepcache",
                                reason="reference test needs the DeepCache package (make setup installs it)")

CHANNELS, HEADS, CONTEXT = 32, 8, 32  # ComfyUI's SD15 config fixes 8 heads
STEPS = 10
TIMESTEPS = [999 - 100 * i for i in range(STEPS)]


def build_pair():
    import comfy.utils
    unet_cfg = factory.sd_unet_config(CHANNELS, [1, 2, 2, 2], 2, [1, 1, 1, 0], 1, CONTEXT, False, heads=HEADS)
    ref = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(CHANNELS, 2 * CHANNELS, 2 * CHANNELS, 2 * CHANNELS),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=CONTEXT, attention_head_dim=HEADS, norm_num_groups=8)
    factory.fill_module(ref, seed=7)
    ref.eval()
    ours = factory.build_model("sd15", unet_config=unet_cfg, calibrate=False)
    # Norm groups: ComfyUI's UNet uses 32 groups; match the diffusers model's.
    for m in ours.model.diffusion_model.modules():
        if isinstance(m, torch.nn.GroupNorm):
            m.num_groups = 8
    key_map = comfy.utils.unet_to_diffusers(unet_cfg)
    ref_sd = ref.state_dict()
    ours_sd = {comfy_key: ref_sd[diff_key] for diff_key, comfy_key in key_map.items() if diff_key in ref_sd}
    missing = set(ours.model.diffusion_model.state_dict()) - set(ours_sd)
    assert not missing, f"unmapped ComfyUI keys: {sorted(missing)[:5]}"
    ours.model.diffusion_model.load_state_dict(ours_sd)
    return ref, ours


class FakePipe:
    def __init__(self, unet):
        self.unet = unet
        self.scheduler = type("S", (), {"timesteps": torch.tensor(TIMESTEPS)})()


def run_reference(ref, inputs, context, interval, branch):
    helper = reference.DeepCacheSDHelper(pipe=FakePipe(ref))
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        with torch.no_grad():
            return [ref(x, torch.tensor(t), encoder_hidden_states=context).sample
                    for x, t in zip(inputs, TIMESTEPS)]
    finally:
        helper.disable()


def run_ours(ours, inputs, context, interval, branch, control=None):
    from optim import deepcache
    patched = ours.clone()
    ctl = deepcache.attach(patched, deepcache.DeepCacheParams(cache_interval=interval, cache_branch_id=branch))
    patched.patch_model()
    try:
        ctl.run = deepcache._Run(ctl.params, sigma_start=math.inf, sigma_end=-1.0)
        sigmas = torch.linspace(14.0, 0.0, STEPS + 1)   # stands for the run's schedule
        dm = patched.model.diffusion_model
        outs = []
        with torch.no_grad():
            for i, (x, t) in enumerate(zip(inputs, TIMESTEPS)):
                to = {"wrappers": patched.wrappers, "patches": patched.model_options["transformer_options"].get("patches", {}),
                      "sample_sigmas": sigmas, "sigmas": sigmas[i:i + 1], "cond_or_uncond": [0]}
                ctrl = None if control is None else {k: list(v) for k, v in control.items()}  # popped per call
                outs.append(dm(x, timesteps=torch.tensor([t]), context=context, control=ctrl,
                               transformer_options=to))
        return outs, ctl.run.stats
    finally:
        patched.unpatch_model()


@pytest.fixture(scope="module")
def pair(comfy_nodes):
    return build_pair()


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(1, 4, 16, 16, generator=gen) for _ in range(STEPS)]
    return xs, torch.randn(1, 6, CONTEXT, generator=gen)


def test_uncached_models_agree(pair, inputs):
    ref, ours = pair
    xs, ctx = inputs
    a = run_reference(ref, xs, ctx, interval=1, branch=0)
    b, _ = run_ours(ours, xs, ctx, interval=1, branch=0)
    for i, (ra, rb) in enumerate(zip(a, b)):
        torch.testing.assert_close(rb, ra, rtol=1e-4, atol=1e-4, msg=f"step {i}")


@pytest.mark.parametrize("interval,branch", [(2, 0), (3, 0), (3, 1), (4, 2), (3, 5), (5, 3)])
def test_every_step_matches_the_reference(pair, inputs, interval, branch):
    ref, ours = pair
    xs, ctx = inputs
    expected = run_reference(ref, xs, ctx, interval, branch)
    got, stats = run_ours(ours, xs, ctx, interval, branch)
    for i, (e, g) in enumerate(zip(expected, got)):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4, msg=f"step {i} (interval {interval}, branch {branch})")
    assert stats.full_calls == len(range(0, STEPS, interval))
    assert stats.shallow_calls == STEPS - stats.full_calls
    # the cache changes the output on shallow steps (so the comparison above is not vacuous)
    plain, _ = run_ours(ours, xs, ctx, 1, 0)
    assert not torch.allclose(got[1], plain[1], atol=1e-3)


def test_controlnet_calls_run_the_whole_unet(pair, inputs):
    """ControlNet residuals reach the deep blocks, which a shallow step would skip: such calls fall
    back to full steps, so the output is exactly the uncached one."""
    _, ours = pair
    xs, ctx = inputs
    control = {"input": [None] * 12, "middle": [None], "output": [None] * 12}
    plain, _ = run_ours(ours, xs, ctx, 1, 0, control=control)
    cached, stats = run_ours(ours, xs, ctx, 3, 0, control=control)
    for a, b in zip(plain, cached):
        assert torch.equal(a, b)
    assert stats.shallow_calls == 0 and stats.fallbacks == STEPS - 4
