"""The shipped reference models through a real server: stock loaders, CLIPTextEncode, KSampler,
VAEDecode, with and without the pack's caches, as an API client submits them."""
import numpy as np

from bench.reference import adherence as ad
from bench.reference import dataset as ds
from bench.reference import graphs
from bench.reference.evaluate import run_prompts
from bench.techniques import technique


def test_reference_graph_follows_prompts_headless(server):
    graphs.install(server.base_dir / "models")
    prompts = ds.PROMPTS[:2]
    plain, _ = run_prompts(server, prompts, prefix="e2e-ref")
    assert plain.shape == (2, ds.SIDE, ds.SIDE, 3)
    assert ad.adherence(plain, prompts)["adherence"] >= 0.5
    stack = [(n, dict(p)) for n, p in technique("ditcache_wide").stack]
    cached, _ = run_prompts(server, prompts, optim=stack, prefix="e2e-ref-cached")
    diff = np.abs(cached.astype(np.float32) - plain.astype(np.float32))
    assert 0 < diff.mean() < 20  # the cache changes the images, and only a little
    assert ad.adherence(cached, prompts)["adherence"] >= 0.5


def test_reference_unet_graph_follows_prompts_headless(server):
    """The SD1.5 reference UNet (expanded from its shipped slim form) through the stock graph,
    plain and with OptimDeepCache."""
    graphs.install(server.base_dir / "models")
    prompts = ds.PROMPTS[:2]
    plain, _ = run_prompts(server, prompts, prefix="e2e-ref-unet", model="unet")
    assert plain.shape == (2, ds.SIDE, ds.SIDE, 3)
    assert ad.adherence(plain, prompts)["adherence"] >= 0.5
    stack = [(n, dict(p)) for n, p in technique("deepcache3").stack]
    cached, _ = run_prompts(server, prompts, optim=stack, prefix="e2e-ref-unet-cached", model="unet")
    diff = np.abs(cached.astype(np.float32) - plain.astype(np.float32))
    assert 0 < diff.mean() < 20
    assert ad.adherence(cached, prompts)["adherence"] >= 0.5
