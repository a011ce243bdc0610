"""The quantisers of optim/layerwise_cast.py, without ComfyUI: int8 block scales, fp8 channel
scales, and the Rescale weight function that undoes them in ComfyUI's cast path."""
import torch

from optim import layerwise_cast as lc


def rel_rms(a, b):
    return float((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt())


def dequantize(q, scale, dtype=torch.float32):
    return lc.Rescale(scale)(q.to(dtype)) if scale is not None else q.to(dtype)


def test_int8_blocks_follow_the_flattened_inputs_and_fall_back_to_one_per_channel():
    assert lc.int8_block((640, 256)) == 128
    assert lc.int8_block((320, 320, 3, 3)) == 120        # 2880 inputs a channel: 24 blocks of 120
    assert lc.int8_block((320, 4, 3, 3)) == 36           # fewer inputs than a block: the channel
    assert lc.int8_block((8, 131)) == 131                # a prime count: one scale for the channel
    assert lc.scale_bytes((640, 256), torch.int8, True) == 640 * 2 * 2
    assert lc.scale_bytes((320, 4, 3, 3), torch.int8, True) == 320 * 2
    assert lc.scale_bytes((640, 256), torch.float8_e4m3fn, True) == 640 * 4
    assert lc.scale_bytes((640, 256), torch.float8_e4m3fn, False) == 0


def test_int8_rounds_each_weight_to_its_blocks_grid():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 512, generator=gen) * torch.logspace(-4, 0, 64).unsqueeze(1)  # wide range of rows
    q, scale = lc.quantize(w, torch.int8, scaled=True)
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.shape == (64, 4, 1)
    assert scale.dtype == torch.bfloat16 and int(q.abs().max()) == 127
    back = dequantize(q, scale)
    step = scale.float().expand(64, 4, 128).reshape(64, 512)
    assert bool(((back - w).abs() <= step / 2 + 1e-12).all())   # within half a step of its block
    # small rows keep their relative precision: a block scale, not one for the tensor
    assert rel_rms(back[:8], w[:8]) < 0.01


def test_an_all_zero_block_stays_zero():
    w = torch.randn(4, 256)
    w[1, :128] = 0
    q, scale = lc.quantize(w, torch.int8, scaled=True)
    back = dequantize(q, scale)
    assert torch.isfinite(back).all() and bool((back[1, :128] == 0).all())


def test_int8_has_about_a_third_of_e4m3s_error_on_gaussian_weights():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(256, 320, 3, 3, generator=gen) / (320 * 9) ** 0.5
    int8 = rel_rms(dequantize(*lc.quantize(w, torch.int8, scaled=True)), w)
    e4m3 = rel_rms(dequantize(*lc.quantize(w, torch.float8_e4m3fn, scaled=True)), w)
    assert e4m3 > 0.02 and int8 < 0.3 * e4m3


def test_rescale_works_in_half_precision_compute():
    w = torch.randn(32, 256)
    q, scale = lc.quantize(w, torch.int8, scaled=True)
    assert rel_rms(dequantize(q, scale, torch.bfloat16), w) < 0.01
    q8, s8 = lc.quantize(w, torch.float8_e4m3fn, scaled=True)
    assert s8.shape == (32, 1, 1) and rel_rms(dequantize(q8, s8), w) < 0.04


def test_small_weights_keep_their_precision_in_fp16_compute():
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(2)) * 1e-4   # scales ~3e-6 / ~1e-6
    for dtype in (torch.int8, torch.float8_e4m3fn):
        q, scale = lc.quantize(w, dtype, scaled=True)
        # scales cast to fp16 (subnormal there) gave 1.4-1.6x the fp32 error
        assert rel_rms(dequantize(q, scale, torch.float16), w) < 1.05 * rel_rms(dequantize(q, scale), w)


def test_scale_search_never_increases_a_channels_rounding_error():
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)) * 0.02
    errors = {}
    for search in (0, 20):
        q, scale = lc.quantize(w, torch.float8_e4m3fn, True, scale_search=search)
        errors[search] = (dequantize(q, scale) - w).pow(2).sum(dim=1)
    assert torch.all(errors[20] <= errors[0]) and errors[20].sum() < errors[0].sum()
