"""The no-op technique: a pass-through APPLY_MODEL wrapper on a patcher clone.

It exercises the same extension point the real techniques use, so benchmarking it measures the
overhead of the hook path itself (expected speedup 1.0, output bit-identical). It counts the model
calls it routed in each sampling run (an OUTER_SAMPLE wrapper opens and closes the run) and hands
the count to `on_run_end`, for the node's badge.
"""
WRAPPER_KEY = "comfyui-optim.noop"
APPLY_MODEL = "apply_model"    # comfy.patcher_extension.WrappersMP.APPLY_MODEL
OUTER_SAMPLE = "outer_sample"  # comfy.patcher_extension.WrappersMP.OUTER_SAMPLE


def passthrough(executor, *args, **kwargs):
    return executor(*args, **kwargs)


class NoopRun:
    """The pass-through wrapper with a call counter per sampling run."""

    def __init__(self, on_run_end=None):
        self.on_run_end = on_run_end
        self.calls = 0

    def __deepcopy__(self, memo):
        # ModelPatcher.clone() deep-copies the wrappers (bound methods): clones keep this counter
        return self

    def apply_model(self, executor, *args, **kwargs):
        self.calls += 1
        return executor(*args, **kwargs)

    def outer_sample(self, executor, *args, **kwargs):
        self.calls = 0
        try:
            return executor(*args, **kwargs)
        finally:
            if self.on_run_end is not None:
                self.on_run_end({"calls_routed": self.calls, "output_changed": False})


def attach(patcher, on_run_end=None):
    """Install the pass-through wrapper on `patcher` (a clone owned by the caller) and return it.
    With `on_run_end`, it also counts the calls of each sampling run and reports them."""
    if on_run_end is None:
        patcher.add_wrapper_with_key(APPLY_MODEL, WRAPPER_KEY, passthrough)
        return patcher
    run = NoopRun(on_run_end)
    patcher.add_wrapper_with_key(APPLY_MODEL, WRAPPER_KEY, run.apply_model)
    patcher.add_wrapper_with_key(OUTER_SAMPLE, WRAPPER_KEY, run.outer_sample)
    return patcher
