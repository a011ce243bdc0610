"""optim.steps: the per-step hit string the frontend's strip and the log read."""
from optim.steps import hit_string


def test_one_character_per_step_by_how_many_calls_reused():
    per_step = {0: (2, 0), 1: (2, 2), 2: (2, 1), 4: (1, 1)}
    assert hit_string(per_step) == "01p-1"


def test_the_schedule_length_pads_steps_that_saw_no_call():
    assert hit_string({0: (1, 0), 1: (1, 1)}, steps=4) == "01--"
    assert hit_string({}, steps=None) == ""


def test_calls_outside_a_step_are_not_counted():
    assert hit_string({None: (3, 0), 0: (1, 1)}) == "1"
