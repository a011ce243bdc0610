"""OptimVAE in a real in-process ComfyUI: downstream VAE Decode/Encode use it; tiles blend without
seams; slicing and the out-of-memory retry; the input VAE is untouched."""
import pytest
import torch

from bench import factory
from optim.metrics import psnr


@pytest.fixture(autouse=True)
def inference_mode():
    with torch.inference_mode():   # as ComfyUI runs every node
        yield


@pytest.fixture(scope="module")
def node(comfy_nodes):
    return comfy_nodes.NODE_CLASS_MAPPINGS["OptimVAE"]


@pytest.fixture(scope="module")
def vae(comfy_nodes):
    return factory.build_vae("sd15")   # TAESD layout, generated weights


def smooth_image(h=256, w=256, batch=1):
    y, x = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    img = torch.stack([0.5 + 0.4 * torch.sin(3 * x + 1), 0.5 + 0.4 * torch.cos(2 * y), (x + y) / 2], -1)
    return img[None].repeat(batch, 1, 1, 1)


def wrap(node, vae, **kw):
    args = dict(tiling="always", tile_size=128, overlap=32, slice_size=0, vram_budget_gb=0.0)
    args.update(kw)
    return node.execute(vae=vae, **args).result[0]


def test_off_is_identical_and_the_input_vae_is_untouched(node, vae, comfy_nodes):
    z = vae.encode(smooth_image(128, 128))
    ref = vae.decode(z)
    off = wrap(node, vae, tiling="off")
    assert torch.equal(off.decode(z), ref)
    decode_node = comfy_nodes.NODE_CLASS_MAPPINGS["VAEDecode"]()
    assert torch.equal(decode_node.decode(off, {"samples": z})[0], ref)
    tiled = wrap(node, vae)
    tiled.decode(z)
    assert type(vae).__name__ == "VAE" and not hasattr(vae, "optim_tiling")
    assert torch.equal(vae.decode(z), ref)


def test_tiled_decode_through_vae_decode_node_has_no_seams(node, vae, comfy_nodes):
    """On a smooth image, one feathered pass is at least as faithful as ComfyUI's three-pass tiled
    decode at the same tile size, and its largest column-to-column jump in the error (a seam) is
    no larger."""
    z = vae.encode(smooth_image())
    ref = vae.decode(z)
    tiled = wrap(node, vae, tile_size=96, overlap=24)
    out = comfy_nodes.NODE_CLASS_MAPPINGS["VAEDecode"]().decode(tiled, {"samples": z})[0]
    assert tiled.optim_last["tile_px"] == 96
    comfy = vae.decode_tiled(z, tile_x=12, tile_y=12, overlap=3)
    assert out.shape == ref.shape == comfy.shape
    assert psnr(ref, out, data_range=1.0) > max(30.0, psnr(ref, comfy, data_range=1.0) - 0.5)

    def worst_jump(img):
        d = img - ref
        return max(float(d.diff(dim=1).abs().mean(dim=(0, 2, 3)).max()),
                   float(d.diff(dim=2).abs().mean(dim=(0, 1, 3)).max()))
    assert worst_jump(out) < 1.5 * worst_jump(comfy)


def test_tiled_encode_close_to_untiled(node, vae):
    img = smooth_image(192, 192)
    ref = vae.encode(img)
    out = wrap(node, vae, tile_size=96, overlap=24).encode(img)
    assert out.shape == ref.shape and psnr(ref, out) > 25


def test_slicing(node, vae):
    z = vae.encode(smooth_image(64, 64, batch=3))
    calls = []
    inner = vae.first_stage_model
    original = type(inner).decode

    class Counting(type(inner)):
        def decode(self, x, **kw):
            calls.append(x.shape[0])
            return original(self, x, **kw)
    counting = factory.build_vae("sd15")
    counting.first_stage_model.__class__ = Counting
    out = wrap(node, counting, tiling="off", slice_size=2).decode(z)
    assert calls == [2, 1] and torch.allclose(out, vae.decode(z), atol=1e-5)


def test_out_of_memory_retries_then_fails_clearly(node, comfy_nodes):
    flaky = factory.build_vae("sd15")
    model = flaky.first_stage_model
    original = type(model).decode
    tiles = []

    class OOMAboveEightCells(type(model)):
        def decode(self, x, **kw):
            tiles.append(tuple(x.shape[-2:]))
            if x.shape[-1] * x.shape[-2] * x.shape[0] > 8 * 8:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return original(self, x, **kw)
    model.__class__ = OOMAboveEightCells
    z = flaky.encode(smooth_image(128, 128))
    out = wrap(node, flaky, tiling="auto", tile_size=128, overlap=16, min_tile_size=32).decode(z)
    assert tiles[0] == (16, 16) and max(tiles[-1]) <= 8 and torch.isfinite(out).all()
    with pytest.raises(RuntimeError, match="floor"):   # TilingOutOfMemory, as loaded by ComfyUI
        wrap(node, flaky, tiling="auto", tile_size=128, overlap=16, min_tile_size=128).decode(z)


def test_validation(node):
    ok = dict(tiling="auto", tile_size=512, overlap=64, slice_size=0, vram_budget_gb=0.0)
    assert node.validate_inputs(**ok) is True
    assert "overlap" in node.validate_inputs(**{**ok, "overlap": 300})
    with pytest.raises(ValueError, match="OptimVAE: overlap"):
        node.execute(vae=None, **{**ok, "overlap": 300})


def test_video_vae_spatial_tiles_keep_every_frame(node, comfy_nodes):
    wan = factory.build_vae("wan21")
    z = torch.randn(1, 16, 2, 12, 12, generator=torch.Generator().manual_seed(0)) * 0.5
    ref = wan.decode(z)
    out = wrap(node, wan, tile_size=64, overlap=16).decode(z)
    assert out.shape == ref.shape and psnr(ref, out) > 20
