"""Group offload logic on plain torch modules (CPU as both devices): planning, swapping, the
call-trace prefetch and what a skipped block costs."""
from types import SimpleNamespace

import pytest
import torch

from optim import group_offload as go


class Block(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.a = torch.nn.Linear(width, width)
        self.b = torch.nn.Linear(width, width)

    def forward(self, x):
        return x + self.b(torch.relu(self.a(x)))


class Toy(torch.nn.Module):
    """Embedder, six blocks in a ModuleList, output layer; `skip` names blocks a 'cache' skips."""
    def __init__(self, width=8, depth=6):
        super().__init__()
        self.embed = torch.nn.Linear(width, width)
        self.blocks = torch.nn.ModuleList(Block(width) for _ in range(depth))
        self.out = torch.nn.Linear(width, width)
        self.skip: set[int] = set()

    def forward(self, x):
        x = self.embed(x)
        for i, blk in enumerate(self.blocks):
            if i not in self.skip:
                x = blk(x)
        return self.out(x)


def toy(seed=0):
    torch.manual_seed(seed)
    return Toy()


def patcher_of(model):
    return SimpleNamespace(model=SimpleNamespace(diffusion_model=model), load_device=torch.device("cpu"))


def run(ctl, model, x):
    return ctl.apply_model(lambda inp: model(inp), x)


def test_plan_groups_blocks_in_order_and_every_leaf_once():
    m = toy()
    groups = go.plan_groups(m, "block_level", 2)
    assert [g.name for g in groups] == ["embed", "blocks.0..blocks.1", "blocks.2..blocks.3",
                                        "blocks.4..blocks.5", "out"]
    leaves = [id(mod) for g in groups for _, mod in g.leaves]
    assert sorted(leaves) == sorted(id(mod) for _, mod in go.managed_leaves(m))
    assert len(go.plan_groups(m, "leaf_level", 1)) == 2 + 2 * 6
    assert sum(g.nbytes for g in groups) == sum(p.numel() * 4 for p in m.parameters())


def test_params_problems():
    assert go.GroupOffloadParams().problems() == []
    bad = go.GroupOffloadParams("block", 0, use_stream=False, record_stream=True, vram_budget_gb=-1)
    assert len(bad.problems()) == 4


@pytest.mark.parametrize("offload_type,use_stream", [("block_level", False), ("block_level", True),
                                                     ("leaf_level", True)])
def test_output_bit_identical_and_model_restored_between_calls(offload_type, use_stream):
    m = toy()
    x = torch.randn(3, 8)
    with torch.inference_mode():
        ref = m(x)
        params_before = {k: p for k, p in m.named_parameters()}
        ctl = go.GroupOffload(go.GroupOffloadParams(offload_type, 1, use_stream))
        ctl.inject(patcher_of(m))
        outs = [run(ctl, m, x) for _ in range(3)]
    assert all(torch.equal(o, ref) for o in outs)
    # between calls every parameter is the very object it was (nothing left swapped in)
    assert all(p is params_before[k] for k, p in m.named_parameters())
    n_groups = len(ctl.install.groups)
    assert ctl.stats.transfers == 3 * n_groups
    assert ctl.stats.bytes_moved == 3 * sum(p.numel() * 4 for p in m.parameters())
    if use_stream:   # first call in static order, later ones from the trace: one on-demand load per call
        assert ctl.stats.sync_loads == 3 and ctl.stats.prefetch_wasted == 0
    else:
        assert ctl.stats.sync_loads == ctl.stats.transfers
    ctl.eject(patcher_of(m))
    assert all(not mod._forward_pre_hooks for mod in m.modules())


def test_parameters_are_on_device_copies_only_while_their_group_runs():
    m = toy()
    seen = {}

    def probe(name):
        def hook(mod, _args):
            seen[name] = (mod.weight is not params[name], {i for i in ctl.install.onloaded})
        return hook
    params = {f"blocks.{i}.a": m.blocks[i].a.weight for i in range(6)}
    ctl = go.GroupOffload(go.GroupOffloadParams("block_level", 1, use_stream=True))
    ctl.inject(patcher_of(m))
    for i in range(6):   # registered after the offload hooks: sees the state the layer computes with
        m.blocks[i].a.register_forward_pre_hook(probe(f"blocks.{i}.a"))
    with torch.inference_mode():
        run(ctl, m, torch.randn(1, 8))
    for i in range(6):
        swapped, onloaded = seen[f"blocks.{i}.a"]
        assert swapped and onloaded == {i + 1}    # only its own group is swapped in (embed is group 0)


def test_a_skipped_block_is_not_transferred_once_the_pattern_is_known():
    """A cache that skips blocks 2-4 on every other call: after one call of each kind the
    prefetcher stops at the branch point instead of fetching a block that will not run."""
    m = toy()
    x = torch.randn(2, 8)
    ctl = go.GroupOffload(go.GroupOffloadParams("block_level", 1, use_stream=True))
    ctl.inject(patcher_of(m))
    names = [g.name for g in ctl.install.groups]
    with torch.inference_mode():
        for call in range(8):
            m.skip = {2, 3, 4} if call % 2 else set()
            ref = m(x)
            before = ctl.stats.prefetch_wasted
            assert torch.equal(run(ctl, m, x), ref)
            if call >= 2:
                assert ctl.stats.prefetch_wasted == before, f"call {call} fetched a skipped block"
    per = ctl.stats.per_group
    full_calls = 4
    for i in (2, 3, 4):   # transferred on full calls, plus at most the one guess of the first skipping call
        assert full_calls <= per[names[i + 1]] <= full_calls + 1
    assert per[names[1]] == 8


def test_pinned_copies_follow_their_source():
    """On CUDA, a pinned copy is reused only for the storage and version it was made from."""
    if not torch.cuda.is_available():
        pytest.skip("pinned memory needs CUDA")
    mover = go.Mover(torch.device("cuda"), use_stream=True, record_stream=False, low_cpu_mem_usage=False)
    w = torch.nn.Parameter(torch.randn(4, 4), requires_grad=False)
    first = mover.finish(mover.start([(("l", "weight"), w)]))[0]
    with torch.no_grad():
        w.add_(1.0)     # an in-place patch bumps the version counter
    second = mover.finish(mover.start([(("l", "weight"), w)]))[0]
    assert torch.equal(second.cpu(), w.data) and not torch.equal(first.cpu(), w.data)


def test_run_end_stats_for_the_frontend_badges():
    """The keys the web badge formats: present, and consistent with what was streamed."""
    m = toy()
    x = torch.randn(3, 8)
    sent = []
    ctl = go.GroupOffload(go.GroupOffloadParams("block_level", 2, use_stream=False), on_run_end=sent.append)
    with torch.inference_mode():
        ctl.inject(patcher_of(m))
        ctl.outer_sample(lambda: [run(ctl, m, x) for _ in range(2)])
    (stats,) = sent
    assert stats is ctl.last_stats
    n_groups = len(ctl.install.groups)
    assert stats["groups"] == n_groups == 5
    assert stats["transfers"] == 2 * n_groups
    assert stats["bytes_moved"] == 2 * sum(p.numel() * 4 for p in m.parameters())
    # no CUDA here: the key is sent, empty (the badge leaves it out)
    assert "peak_vram_bytes" in stats and stats["peak_vram_bytes"] is None
    assert stats["copy_seconds"] > 0
    assert stats["gbps"] == pytest.approx(stats["bytes_moved"] / stats["copy_seconds"] / 1e9, rel=1e-2, abs=1e-3)
    assert stats["gbps"] > 0
    # a second run counts only its own copies
    with torch.inference_mode():
        ctl.outer_sample(lambda: run(ctl, m, x))
    assert sent[1]["transfers"] == n_groups and sent[1]["bytes_moved"] == stats["bytes_moved"] // 2
