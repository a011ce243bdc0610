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
    retried = wrap(node, flaky, tiling="auto", tile_size=128, overlap=16, min_tile_size=32)
    out = retried.decode(z)
    assert tiles[0] == (16, 16) and max(tiles[-1]) <= 8 and torch.isfinite(out).all()
    assert retried.optim_last["passes"] == 2 and retried.optim_last["tile_size"] == 64   # the badge's figures
    with pytest.raises(RuntimeError, match="floor"):   # TilingOutOfMemory, as loaded by ComfyUI
        wrap(node, flaky, tiling="auto", tile_size=128, overlap=16, min_tile_size=128).decode(z)


def test_validation(node):
    ok = dict(tiling="auto", tile_size=512, overlap=64, slice_size=0, vram_budget_gb=0.0)
    assert node.validate_inputs(**ok) is True
    assert "overlap" in node.validate_inputs(**{**ok, "overlap": 300})
    with pytest.raises(ValueError, match="OptimVAE: overlap"):
        node.execute(vae=None, **{**ok, "overlap": 300})


def test_video_vae_spatial_tiles_keep_every_frame(node, wan):
    z = torch.randn(1, 16, 2, 12, 12, generator=torch.Generator().manual_seed(0)) * 0.5
    ref = wan.decode(z)
    out = wrap(node, wan, tile_size=64, overlap=16).decode(z)
    assert out.shape == ref.shape and psnr(ref, out) > 20


@pytest.fixture(scope="module")
def wan(comfy_nodes):
    return factory.build_vae("wan21")   # Wan 2.1 VAE at its real size, generated weights


def video_latent(frames, side=4):
    return torch.randn(1, 16, frames, side, side, generator=torch.Generator().manual_seed(0)) * 0.5


def test_temporal_chunks_carry_the_causal_cache_so_decode_is_unchanged(node, wan):
    z = video_latent(4)
    ref = wan.decode(z)
    for chunk in (1, 3):
        chunked = wrap(node, wan, tiling="off", temporal_chunk=chunk)
        out = chunked.decode(z)
        assert torch.equal(out, ref), f"chunk {chunk}: max diff {float((out - ref).abs().max())}"
        assert chunked.optim_last["temporal_chunks"] == -(-4 // chunk)
    decoder = wan.first_stage_model.decoder
    assert not decoder._forward_pre_hooks and not decoder._forward_hooks   # hooks only during a call
    # the control: a chunk decoded on its own (the cache not carried) starts a new video: its first
    # latent frame gives 1 frame, not 4, and the last latent frame's 4 frames differ
    alone = wan.decode(z[:, :, 2:])
    assert alone.shape[1] == 5 and float((alone[:, -4:] - ref[:, -4:]).abs().max()) > 1e-3


def test_temporal_chunks_with_spatial_tiles_equal_the_unchunked_tiled_decode(node, wan):
    z = video_latent(2, side=10)
    tiled = wrap(node, wan, tile_size=64, overlap=16)
    chunked = wrap(node, wan, tile_size=64, overlap=16, temporal_chunk=1)
    out = chunked.decode(z)
    assert chunked.optim_last["tiles"] == 4 and chunked.optim_last["temporal_chunks"] == 2
    assert torch.equal(out, tiled.decode(z))


def test_temporal_chunks_encode_equal_the_whole_video_encode(node, wan):
    pixels = torch.rand(9, 32, 32, 3, generator=torch.Generator().manual_seed(1))   # 9 frames -> 3 latent
    ref = wan.encode(pixels)
    chunked = wrap(node, wan, tiling="off", temporal_chunk=1)
    out = chunked.encode(pixels)
    assert out.shape == ref.shape == (1, 16, 3, 4, 4)
    assert torch.equal(out, ref) and chunked.optim_last["temporal_chunks"] == 3
    # with spatial tiles: each tile is encoded as its own chunked video
    pixels = torch.rand(5, 80, 80, 3, generator=torch.Generator().manual_seed(2))
    tiled = wrap(node, wan, tile_size=64, overlap=16).encode(pixels)
    chunked = wrap(node, wan, tile_size=64, overlap=16, temporal_chunk=1)
    assert torch.equal(chunked.encode(pixels), tiled) and chunked.optim_last["tiles"] == 4


def test_temporal_chunk_validation_and_images_ignore_it(node, vae):
    ok = dict(tiling="auto", tile_size=512, overlap=64, slice_size=0, vram_budget_gb=0.0)
    assert node.validate_inputs(**ok, temporal_chunk=4) is True
    assert "temporal_chunk" in node.validate_inputs(**ok, temporal_chunk=-1)
    z = vae.encode(smooth_image(64, 64))
    assert torch.equal(wrap(node, vae, tiling="off", temporal_chunk=2).decode(z), vae.decode(z))


def test_run_stats_are_sent_to_the_frontend(node, vae, wan, server):
    from comfy_api.latest import io
    clone = node.PREPARE_CLASS_CLONE({io.Hidden.unique_id: "5"})
    args = dict(tiling="always", tile_size=64, overlap=16, slice_size=0, vram_budget_gb=0.0)
    clone.execute(vae=vae, **args).result[0].decode(vae.encode(smooth_image(128, 128)))
    clone.execute(vae=wan, **{**args, "tiling": "off", "temporal_chunk": 2}).result[0].decode(video_latent(3))
    sent = [(event, data) for event, data, _ in server.sent]
    assert [(e, d["node"], d["technique"]) for e, d in sent] == [("comfyui-optim.stats", "5", "vae")] * 2
    image, video = sent[0][1]["stats"], sent[1][1]["stats"]
    assert image["tiles"] == 9 and image["passes"] == 1 and image["tile_size"] == 64 and image["temporal_chunks"] == 0
    assert video["tiles"] == 1 and video["tile_size"] == 0 and video["temporal_chunks"] == 2
    assert "peak_memory_bytes" not in image   # CPU: no allocator peak to report


def test_wan22_vae_chunks_carry_the_cache_and_first_chunk_flag(comfy_nodes):
    """Wan 2.2's VAE keeps its cache on the module and flags a call's first frame `first_chunk`;
    chunked decode and encode still equal one call (a small Wan 2.2 VAE, generated weights)."""
    from comfy.ldm.wan.vae2_2 import WanVAE
    from optim import vae_temporal as vt
    model = factory.fill_module(WanVAE(dim=16, dec_dim=16, z_dim=8, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
                                       temperal_downsample=[False, True, True]), 0).eval()
    assert vt.supports(model)
    z = torch.randn(1, 8, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    ref = model.decode(z)
    out = vt.run_chunked(z, vt.chunk_bounds(3, 2), vt.CarriedCache(model.decoder),
                         model.decode, "cpu", out_frames=lambda n: 4 * n - 3)
    # float noise only (its 1x1x1 conv2 runs on 2 frames instead of 3: ~1e-7); a cut cache is ~1e-2
    assert float((out - ref).abs().max()) < 1e-5
    pixels = torch.rand(1, 3, 9, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    out = vt.run_chunked(pixels, vt.chunk_bounds(9, 1, step=4), vt.CarriedCache(model.encoder),
                         model.encode, "cpu", out_frames=lambda n: (n + 3) // 4,
                         dummy_after_first=True)
    assert float((out - model.encode(pixels)).abs().max()) < 1e-5
