"""The no-op technique: a pass-through APPLY_MODEL wrapper on a patcher clone.

It exercises the same extension point the real techniques use, so benchmarking it measures the
overhead of the hook path itself (expected speedup 1.0, output bit-identical).
"""
WRAPPER_KEY = "comfyui-optim.noop"
APPLY_MODEL = "apply_model"  # comfy.patcher_extension.WrappersMP.APPLY_MODEL


def passthrough(executor, *args, **kwargs):
    return executor(*args, **kwargs)


def attach(patcher):
    """Install the pass-through wrapper on `patcher` (a clone owned by the caller) and return it."""
    patcher.add_wrapper_with_key(APPLY_MODEL, WRAPPER_KEY, passthrough)
    return patcher
