"""OptimNoop: a patch node that changes nothing (a control for benchmarks and tests)."""
from comfy_api.latest import io

from ..optim import noop
from .messages import node_id_of, stats_sender


class OptimNoop(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OptimNoop",
            display_name="Optim No-op (control)",
            category="optim/debug",
            description="Clones the model and routes every model call through a pass-through hook. "
                        "Output is bit-identical to the input model's; use it to measure the cost "
                        "of the hook path, or as a control in A/B comparisons.",
            inputs=[io.Model.Input("model")],
            outputs=[io.Model.Output(display_name="model")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        return io.NodeOutput(noop.attach(model.clone(), on_run_end=stats_sender(node_id_of(cls), "noop")))
