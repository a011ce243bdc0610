"""optim.steps: the per-step hit string the frontend's strip and the log read."""
from optim.steps import StepClock, hit_string


def test_one_character_per_step_by_how_many_calls_reused():
    per_step = {0: (2, 0), 1: (2, 2), 2: (2, 1), 4: (1, 1)}
    assert hit_string(per_step) == "01p-1"


def test_the_schedule_length_pads_steps_that_saw_no_call():
    assert hit_string({0: (1, 0), 1: (1, 1)}, steps=4) == "01--"
    assert hit_string({}, steps=None) == ""


def test_calls_outside_a_step_are_not_counted():
    assert hit_string({None: (3, 0), 0: (1, 1)}) == "1"


def test_step_clock_compares_the_run_with_every_step_at_a_full_steps_cost():
    clock = StepClock()
    for step, seconds in enumerate([5.0, 2.0, 1.0, 2.0, 1.0]):   # step 0: warm-up, excluded
        clock.add(step, seconds)
    clock.add(None, 100.0)                                         # outside a step: not counted
    assert clock.timed_speedup({0, 1, 3}) == round(2.0 * 5 / 11.0, 3)


def test_step_clock_uses_the_first_step_only_when_it_is_the_only_full_one():
    clock = StepClock()
    clock.add(0, 3.0)
    clock.add(1, 1.0)
    clock.add(1, 0.5)   # a second call of the same step (cond and uncond split)
    assert clock.timed_speedup({0}) == round(3.0 * 2 / 4.5, 3)
    assert clock.timed_speedup(set()) is None
    assert StepClock().timed_speedup({0}) is None
