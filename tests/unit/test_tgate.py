"""T-GATE's semantics on a hand-computed case (no ComfyUI): a fake attention module driven
through the views, step by step."""
import torch

from optim import tgate
from optim.module_views import make_view
from optim.tgate import TGate, TGateParams

SCHEDULE = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])   # 4 steps


class Attn(torch.nn.Module):
    """Output = x + step-dependent context term, so reuse is visible in the numbers."""
    calls = 0

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(2, 2)

    def forward(self, x, context=None, value=None, mask=None, transformer_options={}):
        Attn.calls += 1
        return x + context


def opts(step, chunks=(1, 0)):
    return {"sample_sigmas": SCHEDULE, "sigmas": SCHEDULE[step:step + 1], "cond_or_uncond": list(chunks)}


def drive(ctl, view, steps=4):
    outs = []
    for s in range(steps):
        x = torch.zeros(2, 3, 2)
        context = torch.stack([torch.full((3, 2), 10.0 * s), torch.full((3, 2), 10.0 * s + 2)])  # uncond, cond
        outs.append(view(x, context=context, transformer_options=opts(s)))
    return outs


def test_gate_from_percent_or_absolute_step():
    assert TGateParams(gate_percent=0.4).gate(20) == 8
    assert TGateParams(gate_percent=1.0).gate(20) == 20
    assert TGateParams(gate_step=5).gate(20) == 5
    assert TGateParams(gate_step=50).gate(20) == 20
    assert TGateParams(gate_percent=2.0, gate_step=-3, self_attn_interval=-1).problems() == [
        "gate_percent must be within [0, 1], got 2.0",
        "gate_step must be >= 0, or -1 to use gate_percent; got -3",
        "self_attn_interval must be >= 0 (0 = off), got -1"]


def test_after_the_gate_cross_attention_is_the_cfg_average_of_the_last_computed_step():
    ctl = TGate(TGateParams(gate_percent=0.5))       # 4 steps -> gate at step 2
    view = make_view(Attn(), "T", {"forward": tgate._CROSS_FORWARD}, _tgate=ctl, _tgate_layer="l")
    ctl.run = tgate._Run()
    Attn.calls = 0
    outs = drive(ctl, view)
    # steps 0, 1 computed normally: uncond sees 10s, cond 10s + 2
    assert torch.equal(outs[1][0], torch.full((3, 2), 10.0)) and torch.equal(outs[1][1], torch.full((3, 2), 12.0))
    # steps 2, 3 reuse the average of step 1 (11) for both chunks, without calling the module
    for s in (2, 3):
        assert torch.equal(outs[s], torch.full((2, 3, 2), 11.0))
    assert Attn.calls == 2
    assert ctl.run.stats.cross_attn_computed == 2 and ctl.run.stats.cross_attn_reused == 2


def test_self_attention_interval_reuses_between_computed_steps_before_the_gate_only():
    ctl = TGate(TGateParams(gate_percent=0.75, self_attn_interval=2))   # gate at step 3
    view = make_view(Attn(), "S", {"forward": tgate._SELF_FORWARD}, _tgate=ctl, _tgate_layer="l")
    ctl.run = tgate._Run()
    Attn.calls = 0
    outs = drive(ctl, view)
    assert torch.equal(outs[1], outs[0])           # step 1 reuses step 0
    assert not torch.equal(outs[2], outs[0])       # step 2 computes (2 % 2 == 0)
    assert not torch.equal(outs[3], outs[2])       # step 3 is past the gate: computed normally
    assert Attn.calls == 3


def test_view_shares_parameters_and_keys_with_the_original():
    attn = Attn()
    view = make_view(attn, "T", {"forward": tgate._CROSS_FORWARD}, _tgate=TGate(TGateParams()), _tgate_layer="l")
    assert view.proj is attn.proj
    assert list(view.state_dict()) == list(attn.state_dict())
    assert isinstance(view, Attn)


def test_uncond_pass_is_dropped_only_after_the_gate():
    ctl = TGate(TGateParams(gate_percent=0.5))
    ctl.run = tgate._Run()
    ctl.run.cross["l"] = torch.zeros(1)
    seen = []

    def executor(model, conds, x, timestep, model_options):
        seen.append(conds)
        return [torch.ones(1) * len(seen), torch.full((1,), -1.0)]

    mo = {"transformer_options": {"sample_sigmas": SCHEDULE}}
    before = ctl.calc_cond_batch(executor, None, ["c", "u"], None, SCHEDULE[1:2], mo)
    after = ctl.calc_cond_batch(executor, None, ["c", "u"], None, SCHEDULE[2:3], mo)
    assert seen == [["c", "u"], ["c", None]]
    assert before[1].item() == -1.0
    assert torch.equal(after[0], after[1])
    assert ctl.run.stats.uncond_passes_dropped == 1
