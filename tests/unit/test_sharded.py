"""Sharded checkpoint files without ComfyUI: sizes, splitting, index checks, header-only reading,
writing shards and reading them back."""
import json

import pytest
import torch
from safetensors.torch import save_file

from optim import sharded


def test_parse_shard_size():
    assert sharded.parse_shard_size("2GB") == 2 * 10 ** 9
    assert sharded.parse_shard_size("500MB") == 500 * 10 ** 6
    assert sharded.parse_shard_size("1.5GiB") == int(1.5 * 2 ** 30)
    for bad in ("2", "-1GB", "2 parsecs", "", "10KB"):
        with pytest.raises(sharded.ShardError):
            sharded.parse_shard_size(bad)


def test_split_shards_in_order_with_oversized_tensors_alone():
    sizes = {"a": 4, "b": 4, "c": 10, "d": 1, "e": 3}
    assert sharded.split_shards(sizes, 8) == [["a", "b"], ["c"], ["d", "e"]]
    assert sharded.split_shards(sizes, 100) == [list(sizes)]


def tensors(n=6, width=16):
    g = torch.Generator().manual_seed(0)
    return {f"blocks.{i}.weight": torch.randn(width, width, generator=g) for i in range(n)}


def test_save_and_open_round_trip_with_index(tmp_path):
    sd = tensors()
    files = sharded.save_sharded(sd, tmp_path / "m", max_bytes=16 * 16 * 4 * 2)
    index = json.loads((tmp_path / "m" / sharded.INDEX_NAME).read_text())
    assert len(files) == 4 and index["metadata"]["total_size"] == 6 * 16 * 16 * 4
    assert set(index["weight_map"]) == set(sd)
    folder = sharded.open_folder(tmp_path / "m")
    assert [len(keys) for _, keys in folder.shards] == [2, 2, 2]
    meta = sharded.meta_state_dict(folder)
    assert all(meta[k].device.type == "meta" and meta[k].shape == sd[k].shape for k in sd)


def test_save_with_a_key_map_writes_slices_and_renames(tmp_path):
    fused = torch.arange(12.0).reshape(6, 2)
    key_map = {"qkv.weight": [("to_q.weight", (0, 0, 2), None), ("to_k.weight", (0, 2, 2), None),
                              ("to_v.weight", (0, 4, 2), None)]}
    sharded.save_sharded({"qkv.weight": fused}, tmp_path / "m", 1 << 20, key_map)
    folder = sharded.open_folder(tmp_path / "m")
    from safetensors import safe_open
    with safe_open(str(folder.shards[0][0]), framework="pt") as f:
        assert torch.equal(f.get_tensor("to_k.weight"), fused[2:4])
    with pytest.raises(sharded.ShardError, match="no diffusers name"):
        sharded.save_sharded({"other": fused}, tmp_path / "n", 1 << 20, key_map)


def test_single_file_folder_is_one_shard(tmp_path):
    (tmp_path / "m").mkdir()
    save_file(tensors(2), str(tmp_path / "m" / sharded.SINGLE_FILE))
    folder = sharded.open_folder(tmp_path / "m")
    assert len(folder.shards) == 1 and len(folder.shards[0][1]) == 2


@pytest.mark.parametrize("weight_map,expected", [
    ({"a": "../outside.safetensors"}, "not a .safetensors file name in the folder"),
    ({"a": "/etc/passwd"}, "not a .safetensors file name in the folder"),
    ({"a": "shard.bin"}, "not a .safetensors file name in the folder"),
    ({"a": "missing.safetensors"}, "missing"),
    ({"a": "s.safetensors", "zz": "s.safetensors"}, "lacks 1 tensor"),
    ({}, "no \"weight_map\""),
])
def test_index_is_checked(tmp_path, weight_map, expected):
    (tmp_path / "m").mkdir()
    save_file({"a": torch.zeros(2)}, str(tmp_path / "m" / "s.safetensors"))
    (tmp_path / "m" / sharded.INDEX_NAME).write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(sharded.ShardError, match=expected):
        sharded.open_folder(tmp_path / "m")


def test_broken_files_are_clear_errors(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / sharded.INDEX_NAME).write_text("{not json")
    with pytest.raises(sharded.ShardError, match="not valid JSON"):
        sharded.open_folder(tmp_path / "m")
    (tmp_path / "m" / sharded.INDEX_NAME).write_text(json.dumps({"weight_map": {"a": "s.safetensors"}}))
    (tmp_path / "m" / "s.safetensors").write_bytes(b"\x10\x00garbage")
    with pytest.raises(sharded.ShardError, match="not a readable safetensors file"):
        sharded.open_folder(tmp_path / "m")
    (tmp_path / "e").mkdir()
    with pytest.raises(sharded.ShardError, match="no diffusion_pytorch_model"):
        sharded.open_folder(tmp_path / "e")
