"""OptimDevicePlacement through the HTTP API: input errors in the validation response, a module
prefix the model lacks as a clear execution error, and a placed run equal to the plain run."""
import pytest

from bench import graphs
from bench.server import execution_error, read_images

from .test_ditcache_e2e import node_errors


def placement(**inputs):
    return ("OptimDevicePlacement", {"strategy": "custom", "device_map": "", "max_memory": "", **inputs})


@pytest.mark.parametrize("inputs,expected", [
    ({"device_map": '{"output_blocks": cpu}'}, "not valid JSON"),
    ({"device_map": '{"output_blocks": "cuda:9"}'}, "unknown or unavailable device 'cuda:9'"),
    ({"device_map": "output_blocks: cpu", "max_memory": '{"cpu": "-3GB"}'}, "must not be negative"),
    ({"strategy": "diagonal"}, "strategy must be one of"),
])
def test_invalid_inputs_are_validation_errors(server, inputs, expected):
    prompt = graphs.txt2img("sd15", steps=2, optim=[placement(**inputs)])
    assert expected in node_errors(server, prompt, "optim0")


def test_unknown_prefix_is_an_execution_error_and_a_placed_run_equals_the_plain_one(server):
    bad = server.run(graphs.txt2img("sd15", steps=2, optim=[placement(device_map="output_blockz: cpu")]))
    assert "unknown module prefix 'output_blockz'" in str(execution_error(bad))
    plain = server.run(graphs.txt2img("sd15", steps=2, filename_prefix="plain"))
    placed = server.run(graphs.txt2img("sd15", steps=2, filename_prefix="placed",
                                       optim=[placement(device_map='{"input_blocks": "cpu", "out": "cpu"}')]))
    assert execution_error(placed) is None
    assert (read_images(server.output_images(placed, "save")) == read_images(server.output_images(plain, "save"))).all()
