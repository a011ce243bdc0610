"""Sharded checkpoint nodes through the HTTP API: a folder not in the node's list (a path from the
prompt) and a malformed shard size are refused in the validation response."""
import pytest

from .test_ditcache_e2e import node_errors


def graph(folder="nowhere", max_shard_size="2GB", prefix="optim_shards/model"):
    return {"load": {"class_type": "OptimLoadShardedModel", "inputs": {"folder": folder, "weight_dtype": "default"}},
            "save": {"class_type": "OptimSaveModelShards",
                     "inputs": {"model": ["load", 0], "filename_prefix": prefix, "max_shard_size": max_shard_size,
                                "layout": "comfyui"}}}


@pytest.mark.parametrize("folder", ["../../../etc", "/tmp", "nowhere"])
def test_folder_outside_the_list_is_a_validation_error(server, folder):
    assert "unknown model folder" in node_errors(server, graph(folder=folder), "load")


def test_bad_shard_size_is_a_validation_error(server):
    assert "expected a size" in node_errors(server, graph(max_shard_size="big"), "save")
