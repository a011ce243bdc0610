"""Device placement logic: input parsing and validation, planners, and the hooks that move weights
and activations, checked with a fake second device (float64 stands for device "fake:1", float32
for the main device) under a torch-function mode that fails any operation mixing the two, which is
what a real second device would do."""
from types import SimpleNamespace

import pytest
import torch
from torch.overrides import TorchFunctionMode

from optim import device_placement as dp

DEVICES = ["cuda:0", "cuda:1", "cpu"]


class Block(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.a = torch.nn.Linear(width, width)
        self.b = torch.nn.Linear(width, width)

    def forward(self, x, scale=None):
        h = self.b(torch.relu(self.a(x)))
        return x + h * (1 if scale is None else scale)


class Toy(torch.nn.Module):
    """Embedder, blocks, an output layer, and model code between them that mixes tensors (a
    residual over all blocks, as a UNet's skips do)."""
    def __init__(self, width=8, depth=6):
        super().__init__()
        self.embed = torch.nn.Linear(width, width)
        self.blocks = torch.nn.ModuleList(Block(width) for _ in range(depth))
        self.out = torch.nn.Linear(width, width)

    def forward(self, x):
        x = self.embed(x)
        skip = x
        scale = torch.full((1,), 0.5)
        for blk in self.blocks:
            x = blk(x, scale=scale)
        return self.out(x + skip)


def toy(seed=0):
    torch.manual_seed(seed)
    return Toy()


# ---- a fake second device: dtype as the device tag ---------------------------------------------

FAKE = torch.float64


def fake_transfer(t, device):
    if not t.is_floating_point():
        return t
    return t.to(FAKE if str(device) == "fake:1" else torch.float32)


class NoMixing(TorchFunctionMode):
    """Fails an operation whose floating tensor arguments are on both 'devices'. `allow(func, args)`
    exempts operations a model mixes the dtypes in on purpose (outside any unit)."""
    def __init__(self, allow=None):
        super().__init__()
        self.allow = allow or (lambda func, args: False)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        seen = set()

        def visit(o):
            if isinstance(o, torch.Tensor) and o.is_floating_point() and o.dim() > 0:
                seen.add(o.dtype)
            elif isinstance(o, (list, tuple)):
                for i in o:
                    visit(i)
        visit(args)
        visit(list(kwargs.values()))
        # moving (`.to`) and re-homing a parameter (`p.data = ...`) legitimately see both
        if {FAKE, torch.float32} <= seen and func is not torch.Tensor.to and getattr(func, "__name__", "") != "__set__" \
                and not self.allow(func, args):
            raise RuntimeError(f"{func} mixes devices {seen}")
        return func(*args, **kwargs)


def patcher_of(model):
    return SimpleNamespace(model=SimpleNamespace(diffusion_model=model))


# ---- parsing ------------------------------------------------------------------------------------

def test_parse_size():
    assert dp.parse_size("2GB") == 2 * 10 ** 9
    assert dp.parse_size("512MiB") == 512 * 2 ** 20
    assert dp.parse_size("1.5 gb") == 1_500_000_000
    assert dp.parse_size(1024) == 1024
    for bad in ("-1GB", -5, "ten GB", "3 parsecs", True):
        with pytest.raises(dp.PlacementError):
            dp.parse_size(bad)


def test_normalize_device():
    assert dp.normalize_device(1, DEVICES) == "cuda:1"
    assert dp.normalize_device("0", DEVICES) == "cuda:0"
    assert dp.normalize_device("CUDA", DEVICES) == "cuda:0"
    assert dp.normalize_device(" cpu ", DEVICES) == "cpu"
    with pytest.raises(dp.PlacementError, match="available: cuda:0, cuda:1, cpu"):
        dp.normalize_device("cuda:7", DEVICES)
    with pytest.raises(dp.PlacementError, match="unknown"):
        dp.normalize_device("meta", DEVICES)
    with pytest.raises(dp.PlacementError, match="offload_to_disk"):
        dp.normalize_device("disk", DEVICES)


def test_parse_map_text_json_and_lines():
    assert dp.parse_map_text('{"blocks.0": 1, "out": "cpu"}') == {"blocks.0": 1, "out": "cpu"}
    assert dp.parse_map_text("blocks.0: cuda:1\n# comment\nout = cpu,\n") == {"blocks.0": "cuda:1", "out": "cpu"}
    assert dp.parse_map_text("  ") == {}
    with pytest.raises(dp.PlacementError, match="not valid JSON"):
        dp.parse_map_text('{"blocks.0": 1,}')
    with pytest.raises(dp.PlacementError, match="JSON object"):
        dp.parse_map_text('["blocks"]')
    with pytest.raises(dp.PlacementError, match="line 2"):
        dp.parse_map_text("blocks.0: cpu\nnonsense")
    with pytest.raises(dp.PlacementError, match="twice"):
        dp.parse_map_text("out: cpu\nout: cuda:0")


def test_parse_max_memory():
    assert dp.parse_max_memory('{"0": "1GB", "cpu": 2048}', DEVICES) == {"cuda:0": 10 ** 9, "cpu": 2048}
    with pytest.raises(dp.PlacementError, match="negative"):
        dp.parse_max_memory('{"cpu": "-1GB"}', DEVICES)
    with pytest.raises(dp.PlacementError, match="unknown"):
        dp.parse_max_memory('{"cuda:5": "1GB"}', DEVICES)
    with pytest.raises(dp.PlacementError, match="twice"):
        dp.parse_max_memory('{"0": "1GB", "cuda:0": "2GB"}', DEVICES)


# ---- planning -----------------------------------------------------------------------------------

def test_units_in_execution_order_and_every_parameter_in_one_unit():
    m = toy()
    units = dp.units_of(m)
    assert [u.path for u in units] == ["embed"] + [f"blocks.{i}" for i in range(6)] + ["out"]
    assert sum(u.nbytes for u in units) == sum(p.numel() * 4 for p in m.parameters())


def test_plan_custom_longest_prefix_and_errors():
    units = dp.units_of(toy())
    plan = dp.plan_custom(units, {"blocks": "cpu", "blocks.5": 1}, "cuda:0", DEVICES)
    assert plan.devices["embed"] == "cuda:0" and plan.devices["out"] == "cuda:0"
    assert [plan.devices[f"blocks.{i}"] for i in range(6)] == ["cpu"] * 5 + ["cuda:1"]
    with pytest.raises(dp.PlacementError, match="unknown module prefix 'blockz'"):
        dp.plan_custom(units, {"blockz": "cpu"}, "cuda:0", DEVICES)
    with pytest.raises(dp.PlacementError, match="part of 'blocks.2'"):
        dp.plan_custom(units, {"blocks.2.a": "cpu"}, "cuda:0", DEVICES)
    with pytest.raises(dp.PlacementError, match="unknown or unavailable device"):
        dp.plan_custom(units, {"blocks": "cuda:3"}, "cuda:0", DEVICES)
    with pytest.raises(dp.PlacementError, match="more than its max_memory"):
        dp.plan_custom(units, {"blocks": "cpu"}, "cuda:0", DEVICES, {"cpu": 100})


def test_plan_balanced_even_contiguous_and_capped():
    units = dp.units_of(toy())
    sizes = {u.path: u.nbytes for u in units}
    total = sum(sizes.values())
    no_cap = lambda d: None  # noqa: E731
    plan = dp.plan_balanced(units, "cuda:0", DEVICES, capacity=no_cap)
    per = plan.bytes_per_device()
    assert set(per) == {"cuda:0", "cuda:1"} and abs(per["cuda:0"] - per["cuda:1"]) <= max(sizes.values())
    order = list(plan.devices.values())
    assert order == sorted(order)                 # contiguous runs in execution order
    # max_memory caps a GPU: the rest spills over to the CPU, named devices only
    cap = total // 3
    plan = dp.plan_balanced(units, "cuda:0", DEVICES, {"cuda:0": cap, "cpu": total}, capacity=no_cap)
    per = plan.bytes_per_device()
    assert set(per) == {"cuda:0", "cpu"} and per["cuda:0"] <= cap
    with pytest.raises(dp.PlacementError, match="does not fit"):
        dp.plan_balanced(units, "cuda:0", DEVICES, {"cuda:0": cap}, capacity=no_cap)
    # a CPU-only machine: one device
    plan = dp.plan_balanced(units, "cpu", ["cpu"], capacity=no_cap)
    assert set(plan.devices.values()) == {"cpu"} and not plan.placed()


def test_make_plan_validates_strategy_and_map_use():
    m = toy()
    assert dp.make_plan(m, "none", "", "", "cpu") is None
    with pytest.raises(dp.PlacementError, match="strategy"):
        dp.make_plan(m, "greedy", "", "", "cpu")
    with pytest.raises(dp.PlacementError, match="needs a device_map"):
        dp.make_plan(m, "custom", "", "", "cpu")
    with pytest.raises(dp.PlacementError, match="only read with strategy 'custom'"):
        dp.make_plan(m, "balanced", '{"out": "cpu"}', "", "cpu")
    with pytest.raises(dp.PlacementError, match="not valid JSON"):
        dp.make_plan(m, "none", "", "{bad", "cpu")       # inputs are checked even for a reset
    plan = dp.make_plan(m, "custom", "blocks.1: cpu", "", "cpu")
    assert plan.devices["blocks.1"] == "cpu"


def test_compact_map():
    units = dp.units_of(toy())
    plan = dp.plan_custom(units, {"blocks": "cpu", "blocks.5": 1}, "cuda:0", DEVICES)
    assert plan.compact() == {"embed": "cuda:0", **{f"blocks.{i}": "cpu" for i in range(5)},
                              "blocks.5": "cuda:1", "out": "cuda:0"}
    plan = dp.plan_custom(units, {"blocks": "cpu"}, "cuda:0", DEVICES)
    assert plan.compact() == {"embed": "cuda:0", "blocks": "cpu", "out": "cuda:0"}


# ---- running on a (fake) second device ----------------------------------------------------------

def _fake_plan(model, mapping):
    return dp.plan_custom(dp.units_of(model), mapping, "cpu", ["cpu", "fake:1"])


@pytest.mark.parametrize("mapping", [{"blocks": "fake:1"}, {"blocks.1": "fake:1", "blocks.4": "fake:1"},
                                     {"embed": "fake:1", "out": "fake:1"}])
def test_hooks_run_each_unit_on_its_device_and_return_to_main(mapping):
    m = toy()
    x = torch.randn(3, 8)
    with torch.inference_mode():
        ref = m(x)
    ctl = dp.DevicePlacement(_fake_plan(m, mapping), transfer=fake_transfer)
    nbytes = {u.path: u.nbytes for u in dp.units_of(m)}
    ctl.inject(patcher_of(m))
    seen = {}     # probes run after the placement's own pre-hooks
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear):
            mod.register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__(
                name, (args[0].dtype, mod.weight.dtype)))
    with torch.inference_mode(), NoMixing():
        out = m(x)
    placed = [p for p, d in ctl.plan.devices.items() if d == "fake:1"]
    for name, (x_dtype, w_dtype) in seen.items():
        on_fake = any(name == p or name.startswith(p + ".") for p in placed)
        assert (x_dtype, w_dtype) == ((FAKE,) * 2 if on_fake else (torch.float32,) * 2), name
    assert out.dtype == torch.float32                   # back on the main device
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert ctl.stats.moved_bytes == sum(nbytes[p] for p in placed)
    ctl.eject(patcher_of(m))
    # everything back where it was, no hook left
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert all(len(mod._forward_pre_hooks) <= (1 if isinstance(mod, torch.nn.Linear) else 0)
               and not mod._forward_hooks for mod in m.modules())
    with torch.inference_mode():
        assert torch.equal(m(x), ref)


def test_without_output_hooks_the_fake_device_is_caught():
    """The checker itself: a unit left on the other device without moving activations fails."""
    m = toy()
    m.blocks[2].to(FAKE)
    with torch.inference_mode(), NoMixing(), pytest.raises(RuntimeError):
        m(torch.randn(3, 8))


def test_parameters_keep_identity_and_a_replaced_parameter_goes_back_too():
    m = toy()
    before = {k: p for k, p in m.named_parameters()}
    ctl = dp.DevicePlacement(_fake_plan(m, {"blocks.3": "fake:1"}), transfer=fake_transfer)
    ctl.inject(patcher_of(m))
    assert all(p is before[k] for k, p in m.named_parameters())
    # ComfyUI replaced a parameter meanwhile (LoRA patch): the one there now comes back home
    m.blocks[3].a.weight = torch.nn.Parameter(m.blocks[3].a.weight.data.clone(), requires_grad=False)
    ctl.eject(patcher_of(m))
    assert m.blocks[3].a.weight.dtype == torch.float32


ORDER = {d: i for i, d in enumerate(DEVICES)}


def test_accelerate_plans_balanced_when_installed():
    """With accelerate importable, `balanced` is planned by its infer_auto_device_map (every unit
    unsplittable): contiguous, over both GPUs, within max_memory. (accelerate is not installed with
    ComfyUI, so CI usually skips this.)"""
    pytest.importorskip("accelerate")
    m = toy()
    units = dp.units_of(m)
    total = sum(u.nbytes for u in units)
    no_cap = lambda d: None  # noqa: E731
    plan = dp.plan_accelerate(m, units, "cuda:0", DEVICES, capacity=no_cap)
    assert plan.planner == "accelerate" and set(plan.devices) == {u.path for u in units}
    order = [ORDER[d] for d in plan.devices.values()]
    assert order == sorted(order) and {"cuda:0", "cuda:1"} <= set(plan.devices.values())
    cap = total // 3
    plan = dp.plan_accelerate(m, units, "cuda:0", DEVICES, {"cuda:0": cap, "cpu": total}, capacity=no_cap)
    per = plan.bytes_per_device()
    assert per["cuda:0"] <= cap and per["cpu"] > 0 and "cuda:1" not in per
    with pytest.raises(dp.PlacementError, match="does not fit"):
        dp.plan_accelerate(m, units, "cuda:0", DEVICES, {"cuda:0": cap}, capacity=no_cap)
    assert dp.plan_accelerate(m, units, "cpu", ["cpu"], capacity=no_cap) is None   # nothing to balance


def test_without_accelerate_our_planner_plans(monkeypatch):
    monkeypatch.setattr(dp, "accelerate_available", lambda: False)
    m = toy()
    assert dp.plan_accelerate(m, dp.units_of(m), "cuda:0", DEVICES) is None
    plan = dp.make_plan(m, "balanced", "", "", "cuda:0", available=DEVICES, capacity=lambda d: None)
    assert plan.planner == "balanced" and {"cuda:0", "cuda:1"} <= set(plan.devices.values())
