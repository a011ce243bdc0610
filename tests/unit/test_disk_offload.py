"""DiskStore: parameters moved to a content-keyed memory-mapped file and back."""
import torch

from optim import disk_offload


def params(seed):
    g = torch.Generator().manual_seed(seed)
    return [(f"l{i}.weight", torch.nn.Parameter(torch.randn(5, 3, generator=g).to(dt), requires_grad=False))
            for i, dt in enumerate((torch.float32, torch.bfloat16, torch.float16))]


def test_store_maps_in_place_and_releases(tmp_path):
    ps = params(0)
    values = [p.detach().clone() for _, p in ps]
    objects = [p for _, p in ps]
    store = disk_offload.DiskStore(ps, base=tmp_path)
    assert store.folder.parent == tmp_path and (store.folder / "weights.bin").exists()
    assert [p for _, p in ps] == objects                      # same Parameter objects
    assert all(torch.equal(p, v) for (_, p), v in zip(ps, values))
    assert {p.data_ptr() for _, p in ps} <= disk_offload.pointers([store]) and store.in_use()
    store.release()
    assert not store.folder.exists()
    assert all(torch.equal(p, v) for (_, p), v in zip(ps, values))
    assert not {p.data_ptr() for _, p in ps} & disk_offload.pointers([store])


def test_folders_are_keyed_by_content(tmp_path):
    a, b, a_again = params(0), params(1), params(0)
    sa, sb, sa2 = (disk_offload.DiskStore(x, base=tmp_path) for x in (a, b, a_again))
    assert sa.folder != sb.folder and sa.folder == sa2.folder
    sa.release()
    assert sa2.folder.exists()           # still used by the identical second model
    sa2.release()
    sb.release()
    assert not any(tmp_path.iterdir())


def test_file_backed_store_maps_the_models_own_file_and_rejects_changed_weights(tmp_path):
    """Weights identical to the file are mapped from it (no copy written, the file untouched even
    if a mapped weight is written to); a changed or re-typed weight is left in RAM."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(0)
    file_tensors = {"a.weight": torch.randn(4, 6, generator=g), "b.weight": torch.randn(3, generator=g),
                    "c.weight": torch.randn(2, 2, generator=g), "d.weight": torch.randn(5, generator=g)}
    path = tmp_path / "model.safetensors"
    save_file(file_tensors, str(path))
    before = path.read_bytes()
    same_a = torch.nn.Parameter(file_tensors["a.weight"].clone(), requires_grad=False)
    same_b = torch.nn.Parameter(file_tensors["b.weight"].clone(), requires_grad=False)
    edited = torch.nn.Parameter(file_tensors["c.weight"] + 0.01, requires_grad=False)       # a LoRA baked in
    retyped = torch.nn.Parameter(file_tensors["d.weight"].half(), requires_grad=False)      # another dtype
    store = disk_offload.FileBackedStore([("a", same_a, path, "a.weight"), ("b", same_b, path, "b.weight"),
                                          ("c", edited, path, "c.weight"), ("d", retyped, path, "d.weight"),
                                          ("e", same_b, path, "no.such.tensor")])
    assert sorted(store.rejected) == ["c", "d", "e"]
    assert store.nbytes == (24 + 3) * 4 and store.in_use()
    assert {same_a.data_ptr(), same_b.data_ptr()} <= disk_offload.pointers([store])
    assert torch.equal(same_a, file_tensors["a.weight"]) and torch.equal(same_b, file_tensors["b.weight"])
    assert edited.data_ptr() not in disk_offload.pointers([store])
    same_a.data.add_(1.0)                 # private mapping: the model's file never changes
    assert path.read_bytes() == before
    store.release()
    assert path.exists() and path.read_bytes() == before
    assert same_a.data_ptr() not in disk_offload.pointers([store])
    assert torch.equal(same_b, file_tensors["b.weight"])
