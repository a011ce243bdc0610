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
