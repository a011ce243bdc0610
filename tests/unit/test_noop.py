"""The no-op technique registers a pass-through wrapper and nothing else."""
from optim import noop


class FakePatcher:
    def __init__(self):
        self.wrappers = []

    def add_wrapper_with_key(self, wrapper_type, key, fn):
        self.wrappers.append((wrapper_type, key, fn))


def test_attach_installs_one_passthrough_wrapper():
    p = FakePatcher()
    assert noop.attach(p) is p
    assert p.wrappers == [("apply_model", noop.WRAPPER_KEY, noop.passthrough)]


def test_passthrough_forwards_arguments_and_result():
    seen = {}

    def executor(*args, **kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        return "out"

    assert noop.passthrough(executor, 1, 2, c=3) == "out"
    assert seen == {"args": (1, 2), "kwargs": {"c": 3}}
