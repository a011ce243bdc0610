import math

import pytest
import torch

from optim import vae_tiling as vt


def upscale(t):  # a "decoder" with no receptive field: tiles must blend back to the exact image
    return t.repeat_interleave(8, -1).repeat_interleave(8, -2) * 2.0


@pytest.mark.parametrize("length,tile,overlap", [(64, 32, 8), (100, 32, 8), (33, 32, 8), (20, 32, 8),
                                                 (256, 64, 16), (65, 64, 0)])
def test_spans_cover_evenly_with_the_fewest_tiles(length, tile, overlap):
    spans = vt.tile_spans(length, tile, overlap)
    assert spans[0][0] == 0 and spans[-1][1] == length
    sizes = {e - s for s, e in spans}
    assert len(sizes) == 1 and sizes.pop() <= tile
    for (s0, e0), (s1, e1) in zip(spans, spans[1:]):
        assert s0 < s1 and e0 - s1 >= overlap   # overlap at least as asked, no gap
    if length > tile:
        assert len(spans) == math.ceil((length - overlap) / (tile - overlap))


def test_fewer_decoded_cells_than_comfyui_three_passes():
    # 512 px (64 latent), tile 256 px / overlap 64 px: ComfyUI decodes ~21760 latent cells in three
    # passes (see comfy.utils.tiled_scale), one even pass decodes 81 x 81
    spans = vt.tile_spans(64, 32, 8)
    assert sum(e - s for s, e in spans) == 81


def test_feather_weights_cross_fade_to_one():
    spans = vt.tile_spans(100, 32, 8)
    total = torch.zeros(100 * 8)
    for i, (s, e) in enumerate(spans):
        total[s * 8:e * 8] += vt.feather(spans, i, 8)
    assert torch.all(total > 0)
    # in every overlap the two ramps add to one
    for (s0, e0), (s1, _) in zip(spans, spans[1:]):
        assert torch.allclose(total[s1 * 8:e0 * 8], torch.ones((e0 - s1) * 8))


@pytest.mark.parametrize("shape", [(2, 4, 20, 37), (1, 4, 3, 19, 21)])
def test_tiled_decode_of_a_local_function_is_exact(shape):
    z = torch.randn(shape)
    out = vt.tiled(z, upscale, tuple(shape[-2:]), 1, 8, 8, 2)
    assert torch.allclose(out, upscale(z), atol=1e-5)


def test_tiled_encode_direction():
    px = torch.randn(1, 3, 96, 160)
    pool = lambda t: torch.nn.functional.avg_pool2d(t, 8)  # noqa: E731
    out = vt.tiled(px, pool, (12, 20), 8, 1, 8, 2)
    assert torch.allclose(out, pool(px), atol=1e-5)


def test_plan_auto_tiles_only_over_budget_and_slices():
    est = lambda n, h, w: n * h * w * 1000.0   # noqa: E731
    p = vt.TilingParams("auto", tile_size=256, overlap=32)
    assert vt.plan(p, (64, 64), 4, 8, est, budget=1e9).tile is None
    big = vt.plan(p, (64, 64), 4, 8, est, budget=2e6)
    assert big.tile == 32 and big.overlap == 4 and big.slice_size == 1
    assert vt.plan(vt.TilingParams("always", 256, 32), (64, 64), 4, 8, est, 1e12).tile == 32
    assert vt.plan(vt.TilingParams("off", 256, 32, slice_size=3), (64, 64), 8, 8, est, 1.0).slice_size == 3
    assert vt.plan(p, (64, 64), 8, 8, est, budget=64 * 64 * 1000.0 * 3).slice_size == 3


def test_slicing_calls_per_slice():
    seen = []

    def call(batch, plan):
        seen.append(batch.shape[0])
        return upscale(batch)
    z = torch.randn(5, 4, 8, 8)
    out = vt.run_sliced(z, vt.Plan(None, 0, 2), call)
    assert seen == [2, 2, 1] and torch.equal(out, upscale(z))


def oom_above(cells):
    calls = []

    def call(batch, plan):
        calls.append((plan.tile, plan.slice_size, batch.shape[0]))

        def fn(t):
            if t.shape[0] * t.shape[-1] * t.shape[-2] > cells:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return upscale(t)
        if plan.tile is None:
            return fn(batch)
        return vt.tiled(batch, fn, tuple(batch.shape[-2:]), 1, 8, plan.tile, plan.overlap)
    return call, calls


def test_out_of_memory_retries_with_one_sample_then_smaller_tiles():
    z = torch.randn(2, 4, 64, 64)
    call, calls = oom_above(20 * 20)
    out = vt.with_oom_retry(z, vt.Plan(None, 4, 2), call, (64, 64), min_tile=8)
    assert [c[:2] for c in calls] == [(None, 2), (None, 1), (32, 1), (16, 1), (16, 1)]
    assert torch.allclose(out, upscale(z), atol=1e-5)


def test_out_of_memory_below_the_floor_is_a_clear_error():
    call, _ = oom_above(4)
    with pytest.raises(vt.TilingOutOfMemory, match="ran out of memory even with 8x8-cell tiles"):
        vt.with_oom_retry(torch.randn(1, 4, 64, 64), vt.Plan(32, 4, 1), call, (64, 64), min_tile=8)


def test_other_errors_are_not_retried():
    def call(batch, plan):
        raise ValueError("bad latent")
    with pytest.raises(ValueError, match="bad latent"):
        vt.with_oom_retry(torch.randn(1, 4, 8, 8), vt.Plan(None, 0, 1), call, (8, 8), min_tile=2)


def test_params_validation():
    assert vt.TilingParams().problems() == []
    assert any("overlap" in p for p in vt.TilingParams(tile_size=256, overlap=128).problems())
    assert any("tiling" in p for p in vt.TilingParams(tiling="sometimes").problems())
    assert any("min_tile_size" in p for p in vt.TilingParams(tile_size=256, min_tile_size=16).problems())
    assert vt.TilingParams(tile_size=256, min_tile_size=512).floor_cells(8) == 32


def test_temporal_chunk_bounds_follow_the_wan_frame_groups():
    from optim.vae_temporal import chunk_bounds
    assert chunk_bounds(5, 2) == [(0, 2), (2, 4), (4, 5)]                  # latent frames
    assert chunk_bounds(3, 8) == [(0, 3)]
    # pixel frames grouped 1, 4, 4, ...: 2 latent frames = 5 pixel frames first, then 8 each
    assert chunk_bounds(17, 2, step=4) == [(0, 5), (5, 13), (13, 17)]
    assert chunk_bounds(19, 2, step=4) == [(0, 5), (5, 13), (13, 17)]      # 2 trailing frames dropped
    assert chunk_bounds(0, 2) == []


def test_temporal_chunk_on_a_vae_without_a_carried_cache_warns_and_is_off(caplog):
    from types import SimpleNamespace
    from optim import vae_tiling
    vae = SimpleNamespace(first_stage_model=torch.nn.Conv3d(1, 1, 1))
    params = vae_tiling.TilingParams(temporal_chunk=2)
    assert vae_tiling._temporal_chunk(vae, params, 4) == 0                # images: nothing to chunk
    with caplog.at_level("WARNING", logger="comfyui-optim"):
        assert vae_tiling._temporal_chunk(vae, params, 5) == 0
    assert "Conv3d" in caplog.text and "temporal_chunk has no effect" in caplog.text
    assert "temporal_chunk" in vae_tiling.TilingParams(temporal_chunk=-1).problems()[0]
